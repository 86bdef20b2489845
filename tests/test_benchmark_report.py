"""benchmarks/report.py: headline lines from each benchmark become one table, with targets."""

import importlib.util
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def fake_run(name, records, table, rc=0):
    """A benchmark's captured run: its table plus the headline lines common.headline prints."""
    common = load("common")
    buf = io.StringIO()
    with redirect_stdout(buf):
        for r in records:
            common.headline(name, **r)
    return {"name": name, "command": f"python benchmarks/{name}.py --x", "wall_s": 1.0, "returncode": rc,
            "stdout": "# a comment line\n## a section\n" + table + "\n" + buf.getvalue(), "stderr_tail": "boom"}


def test_report_gathers_headlines_targets_and_failures(tmp_path):
    report = load("report")
    runs = [
        fake_run("patching_vs_tl", [dict(metric="speed-up", value=14.8, target="≥ 10×", met=True, peer="TL")], "| a | b |\n|---|---|"),
        fake_run("epoch_bbc", [dict(metric="pyreft / reftlens", value=1.18, target="≥ 1.25×", met=False)], "", rc=1),
    ]
    env = {"date": "d", "machine": "m", "torch_threads": 2, "cuda": "none", "python": "3", "torch": "t",
           "transformers": "x", "transformer-lens": "4.3", "reftlens": "0.1"}
    assert report.draw(runs, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 1000
    text = report.render(runs, env, quick=False, plot="r.png")
    rows = [l for l in text.splitlines() if l.startswith("| patching_vs_tl") or l.startswith("| epoch_bbc")]
    assert rows[0].startswith("| patching_vs_tl | speed-up | 14.8 | ≥ 10× | yes | TL | `python benchmarks/patching_vs_tl.py --x` |")
    assert "| 1.180 | ≥ 1.25× | **no** |" in rows[1]
    assert "::headline::" not in text  # the raw lines are folded into the table
    assert "> a comment line" in text and "#### a section" in text  # a benchmark's own headers stay below the report's
    assert "Benchmarks that failed (exit status ≠ 0): `epoch_bbc`" in text and "boom" in text
