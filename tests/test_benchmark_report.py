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
    return {
        "name": name,
        "command": f"python benchmarks/{name}.py --x",
        "wall_s": 1.0,
        "returncode": rc,
        "stdout": "# a comment line\n## a section\n" + table + "\n" + buf.getvalue(),
        "stderr_tail": "boom",
    }


def test_report_gathers_headlines_targets_and_failures(tmp_path):
    report = load("report")
    runs = [
        fake_run(
            "patching_vs_tl",
            [dict(metric="speed-up", value=14.8, target="≥ 10×", met=True, peer="TL")],
            "| a | b |\n|---|---|",
        ),
        fake_run("epoch_bbc", [dict(metric="pyreft / reftlens", value=1.18, target="≥ 1.25×", met=False)], "", rc=1),
    ]
    env = {
        "date": "d",
        "machine": "m",
        "torch_threads": 2,
        "cuda": "none",
        "python": "3",
        "torch": "t",
        "transformers": "x",
        "transformer-lens": "4.3",
        "reftlens": "0.1",
    }
    assert report.draw(runs, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 1000
    text = report.render(runs, env, quick=False, plot="r.png")
    rows = [l for l in text.splitlines() if l.startswith("| patching_vs_tl") or l.startswith("| epoch_bbc")]
    assert rows[0].startswith(
        "| patching_vs_tl | speed-up | 14.8 | ≥ 10× | yes | TL | `python benchmarks/patching_vs_tl.py --x` |"
    )
    assert "| 1.180 | ≥ 1.25× | **no** |" in rows[1]
    assert "::headline::" not in text  # the raw lines are folded into the table
    assert "> a comment line" in text and "#### a section" in text  # a benchmark's own headers stay below the report's
    assert "Benchmarks that failed (exit status ≠ 0): `epoch_bbc`" in text and "boom" in text


def test_add_replaces_one_benchmark_in_an_earlier_report_and_marks_another_machine():
    """``report.py --add``: the new run's rows and section replace the old ones (or join them) in the
    suite's order, the rest of the report is kept, a run from another machine is marked, and adding
    the same run again changes nothing."""
    report = load("report")
    env = {
        "date": "d",
        "machine": "CPU A (x86_64, AVX2), 2 cores, 1.0 GiB",
        "torch_threads": 2,
        "cuda": "none",
        "python": "3",
        "torch": "t",
        "transformers": "x",
        "transformer-lens": "4.3",
        "reftlens": "0.1",
    }
    old_runs = [
        fake_run("patching_vs_tl", [dict(metric="speed-up", value=14.8, target="≥ 10×", met=True)], "| p |"),
        fake_run("bank", [dict(metric="tokens/s", value=4.7, target="≥ 3×", met=True)], "| bank table |"),
    ]
    old = report.render(old_runs, env, quick=False, plot=None)
    new_run = fake_run("quality_bbc", [dict(metric="accuracy gap", value=-0.02)], "| quality table |")
    elsewhere = dict(env, machine="CPU B (x86_64, AVX512), 2 cores, 1.0 GiB", date="e")
    text = report.splice(old, [new_run], elsewhere)
    rows = [l.split(" | ")[0] for l in text.splitlines() if l.startswith("| ") and " | " in l and "---" not in l][1:]
    assert rows == ["| patching_vs_tl", "| quality_bbc†", "| bank"]  # the suite's order
    names = [l[3:] for l in text.splitlines() if l.startswith("## ") and l != "## Headline ratios"]
    assert names == ["patching_vs_tl", "quality_bbc", "bank"]
    assert "| p |" in text and "| bank table |" in text and "| quality table |" in text
    assert "Run on CPU B (x86_64, AVX512), 2 cores, 1.0 GiB, e" in text and "† run on another machine" in text
    assert report.splice(text, [new_run], elsewhere) == text
    again = report.splice(text, [fake_run("quality_bbc", [dict(metric="accuracy gap", value=0.01)], "| q2 |")], env)
    assert "| q2 |" in again and "| quality table |" not in again and "| 0.010 |" in again
    assert "| quality_bbc |" in again and "Run on CPU" not in again and "†" not in again  # the header's machine


def test_a_headline_names_its_command_from_the_repository_root(monkeypatch):
    """Started by absolute path (as report.py does) or from benchmarks/, the command is the same."""
    common = load("common")
    for argv0 in [str(BENCH / "bank.py"), str(BENCH / "." / "bank.py")]:
        monkeypatch.setattr(sys, "argv", [argv0, "--reps", "3"])
        assert common.command() == "python benchmarks/bank.py --reps 3"
    monkeypatch.chdir(BENCH)
    monkeypatch.setattr(sys, "argv", ["bank.py", "--reps", "3"])
    assert common.command() == "python benchmarks/bank.py --reps 3"
