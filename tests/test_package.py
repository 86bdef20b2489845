"""The package as a user meets it: a light import, and a README whose quickstart runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = "import sys, reftlens; print(sorted(m for m in ('transformer_lens', 'transformers', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quickstart saves a folder
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block, "README quickstart", "exec"), {})


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = ("bash scripts/install.sh && HF_HUB_OFFLINE=1 python3 -m pytest -q "
               "&& python3 -m mkdocs build --strict --quiet")
    assert command in readme.splitlines() and command in ci.splitlines()  # whole lines, identical
