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
    command = (
        "bash scripts/install.sh && HF_HUB_OFFLINE=1 python3 -m pytest -q && python3 -m mkdocs build --strict --quiet"
    )
    assert command in readme.splitlines() and command in ci.splitlines()  # whole lines, identical


def test_analyses_register_no_hooks_of_their_own():
    """Analyses are strategies over the engine: they build interventions, never hooks."""
    for path in sorted((ROOT / "reftlens" / "analysis").glob("*.py")):
        text = path.read_text()
        for call in ("add_hook(", "register_forward_hook(", "register_forward_pre_hook(", ".hooks(", "run_with_hooks("):
            assert call not in text, f"{path.name} calls {call}"


def test_public_names_are_the_real_functions():
    import inspect

    import reftlens
    from reftlens import errors

    for name in ("train", "to_hf", "save_hf", "load_hf", "load_pyreft", "save_pyreft", "load_model"):
        params = inspect.signature(getattr(reftlens, name)).parameters
        assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()), name
    family = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ReftError)]
    assert len(family) >= 9 and all(getattr(reftlens, c.__name__) is c for c in family)


def test_deprecated_aliases_warn_and_call_the_new_name():
    """The pre-0.2 export names still work: each warns with its new name and calls the new function."""
    import pytest

    import reftlens

    for old, new in [("to_peft", "save_peft"), ("to_pyreft", "save_pyreft"), ("from_pyreft", "load_pyreft")]:
        fn = getattr(reftlens, old)
        assert fn.__name__ == old and fn.__wrapped__ is getattr(reftlens, new)
        with pytest.deprecated_call(match=rf"reftlens\.{old} is deprecated; use reftlens\.{new}"):
            with pytest.raises(TypeError, match="missing"):  # reached the new function, which wants arguments
                fn()
