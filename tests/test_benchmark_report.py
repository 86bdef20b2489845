"""benchmarks/report.py: headline lines from each benchmark become one table, with targets."""

import importlib.util
import io
import json
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

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


# --------------------------------------------------------------------------- the harness (benchmarks/common.py)


def test_interleave_rotates_the_first_arm_and_keeps_only_measured_reps():
    common = load("common")
    calls = []
    arms = {name: (lambda x, name=name: calls.append((name, x)) or f"{name}{x}") for name in "ab"}
    r = common.interleave(arms, 3, warmup=1, inputs=[10, 20], keep="all")
    assert calls == [("a", 10), ("b", 10), ("b", 20), ("a", 20), ("a", 10), ("b", 10), ("b", 20), ("a", 20)]
    assert r.results == {"a": ["a20", "a10", "a20"], "b": ["b20", "b10", "b20"]}  # the warm-up rep is dropped
    assert [len(v) for v in r.times.values()] == [3, 3] and [len(v) for v in r.cpu.values()] == [3, 3]
    assert common.interleave(arms, 3, keep="last", inputs=[1]).results == {"a": ["a1"], "b": ["b1"]}
    assert common.interleave(arms, 3, inputs=[1]).results == {"a": [], "b": []}  # by default none is kept
    with pytest.raises(ValueError, match="clock must be one of"):
        common.interleave(arms, 1, clock="gpu")
    with pytest.raises(ValueError, match="keep must be"):
        common.interleave(arms, 1, keep="some")


def test_compare_gives_ratio_of_medians_paired_ratio_and_difference():
    c = load("common").compare([1.0, 4.0, 10.0], [2.0, 5.0, 30.0])
    assert (c.base_s, c.other_s, c.ratio, c.paired, c.delta_s) == (4.0, 5.0, 1.25, 2.0, 1.0)


def test_wait_for_load_waits_until_quiet_and_gives_up_after_its_tries(monkeypatch, capsys):
    common = load("common")
    seen = iter([3.0, 2.5, 0.5])
    monkeypatch.setattr(common, "load1", lambda: next(seen))
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    log = []
    assert common.wait_for_load(1.0, tries=5, log=log) == [3.0, 2.5, 0.5]
    assert [e["load1"] for e in log] == [3.0, 2.5, 0.5]
    monkeypatch.setattr(common, "load1", lambda: 4.0)
    assert common.wait_for_load(1.0, tries=2) == [4.0, 4.0, 4.0]
    assert "measuring anyway" in capsys.readouterr().err
    assert common.wait_for_load(None) == [4.0]  # None: look once, never wait


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_sees_memory_touched_inside_the_call():
    common = load("common")
    m = common.peak_rss(lambda: len(bytearray(b"\x01") * (64 * 2**20)))  # 64 MiB written, then freed
    assert m["result"] == 64 * 2**20 and m["peak_rss_delta_mb"] >= 48


def test_machine_line_reads_this_machine_and_older_records():
    common = load("common")
    old = {"cpu": "Xeon", "arch": "x86_64", "cores": 2, "mem_gib": 23.5, "threads": 2, "amx_bf16": True}
    assert common.machine_line(old) == "Xeon (x86_64, AMX-bf16), 2 cores, 23.5 GiB, 2 torch threads"
    m = common.machine()
    assert common.machine_line(m).startswith(f"{m['cpu']} ({m['arch']}, {m['isa']}), {m['cores']} cores")


def test_no_measured_ratio_is_copied_outside_the_report():
    """benchmarks/REPORT.md holds the measured numbers; the READMEs and docs name its rows. A ratio
    figure outside it is allowed only as a target (≥ 14×, ≤ 1.02×)."""
    root = BENCH.parent
    pages = [root / "README.md", BENCH / "README.md"] + [
        p for p in (root / "docs").glob("*.md") if p.name not in ("changelog.md", "report.md")
    ]
    figure = re.compile(r"(\d+(?:\.\d+)?)\s?×(?!\s*\d)")
    copied = [
        f"{p.relative_to(root)}:{i}: {line.strip()[:100]}"
        for p in pages
        for i, line in enumerate(p.read_text().splitlines(), 1)
        for m in figure.finditer(line)
        if not re.search(r"[≥≤≈=]\s?$", line[: m.start(1)])
    ]
    assert copied == []
    assert figure.search("**14.4× faster**") and not re.search(r"[≥≤≈=]\s?$", "**")  # what it would catch


# --------------------------------------------------------------------------- benchmarks/compare_commits.py


@pytest.mark.multiprocess  # worker processes (and so in the slow tier)
def test_compare_commits_worker_times_a_workload_from_its_own_tree(tmp_path):
    """One worker on this checkout: it imports reftlens from the tree it was given, builds a
    workload and answers its time and an output digest; a tree without reftlens is refused."""
    import argparse

    cc = load("compare_commits")
    args = argparse.Namespace(threads=1, tiny=True)
    w = cc.Worker("after", BENCH.parent, "tiny-llama", args, tmp_path / "w.log")
    try:
        assert w.ask(op="setup", workload="forward") == {"ok": True}
        runs = [w.ask(op="run", workload="forward") for _ in range(2)]
    finally:
        w.close()
    assert all(r["wall"] > 0 for r in runs) and runs[0]["digest"] == runs[1]["digest"] > 0  # deterministic
    assert cc.same(runs[0]["digest"], runs[0]["digest"] * (1 + 1e-6)) and not cc.same(1.0, 1.1)
    assert cc.same(None, 1.0) is None
    with pytest.raises(SystemExit, match="reftlens"):
        cc.Worker("before", tmp_path, "tiny-llama", args, tmp_path / "x.log")


# --------------------------------------------------------------------------- benchmarks/steering_axbench.py


def _axbench_record(label, rows, aurocs=(), partial=False):
    """A steering_axbench --out record: ``rows`` maps (method, seed) to [(concept_id, aggregate)]."""
    steering = {}
    for (method, seed), items in rows.items():
        steering.setdefault(method, {})[seed] = [
            {"concept_id": cid, "alpha": 1.0, "concept": agg, "fluency": 1.0, "relevance": 1.0, "aggregate": agg}
            for cid, agg in items
        ]
    args = dict(label=label, steer_layer=12, positions="all", train_positions="all", n_val=3, n_test=5)
    args.update(new_tokens=24, steps=16, batch=4, lr=0.01, rank=4, seeds=[0])
    return {"args": args, "steering": steering, "aurocs": list(aurocs), "train_seconds": {}, "partial": partial}


def test_steering_axbench_merges_shards_seeds_and_ablations():
    """Shards of one configuration pool their concepts; a concept's extra seeds are averaged before
    the mean over concepts; the spread over seeds uses only concepts every seed ran; an ablation row
    is compared with the default on its own concepts."""
    ax = load("steering_axbench")
    lm, dm = "LoReFT (LM)", "DiffMean"
    shard0 = _axbench_record(
        "default",
        {(dm, "fixed"): [("s:0", 0.5), ("s:1", 0.7)], (lm, "0"): [("s:0", 0.4), ("s:1", 0.8)]},
        aurocs=[{"concept_id": "s:0", "seed": "0", "method": "ReFT-r1", "auroc": 0.8}],
    )
    shard1 = _axbench_record("default", {(dm, "fixed"): [("s:2", 0.3)], (lm, "0"): [("s:2", 0.6)]})
    seeds = _axbench_record("default", {(lm, "1"): [("s:0", 0.6)]})
    ablation = _axbench_record("rank=16", {(lm, "0"): [("s:1", 0.9)]})
    r1 = _axbench_record("steps=48", {}, aurocs=[{"concept_id": "s:0", "seed": "0", "method": "ReFT-r1", "auroc": 0.9}])
    out = io.StringIO()
    with redirect_stdout(out):
        summary = ax.summarize([shard0, shard1, seeds], "default")
        ax.ablations({"default": [shard0, shard1, seeds], "rank=16": [ablation], "steps=48": [r1]})
    text = out.getvalue()
    assert summary[dm] == pytest.approx((0.5 + 0.7 + 0.3) / 3)
    assert summary[lm] == pytest.approx(((0.4 + 0.6) / 2 + 0.8 + 0.6) / 3)  # s:0's two seeds averaged first
    lm_row = next(line for line in text.splitlines() if line.startswith(f"| {lm} |"))
    assert "| 0.100 (1) |" in lm_row  # seeds 0 and 1 on s:0 only: 0.4 vs 0.6
    assert "| rank=16 | LoReFT (LM) | 1 | 0.900 | 1.000 | 1.000 | 0.900 | 0.800 | +0.100 |" in text
    assert "ReFT-r1 detection AUROC (steps=48, 1 concepts, seed 0): 0.900, the default's 0.800" in text
    assert "3 concepts" in text and "partial" not in text
    assert "preference / LoReFT (LM) / DiffMean" not in text  # no preference arm, no headline


def test_steering_axbench_shard_and_concepts_are_checked():
    ax = load("steering_axbench")
    assert ax.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(SystemExit, match="--shard"):
            ax.parse_shard(bad)
    assert ax.parse_concepts(None) is None
    assert list(ax.parse_concepts("3")) == [0, 1, 2] and list(ax.parse_concepts("5:8")) == [5, 6, 7]
    for bad in ("0", "5:5", "-1:3", "a", "1:2:3", "2.5"):
        with pytest.raises(SystemExit, match="--concepts"):
            ax.parse_concepts(bad)


def test_steering_axbench_merge_refuses_runs_of_another_configuration(tmp_path):
    """Runs under one --label are pooled, so they must share every option but which concepts, seeds
    and methods they cover; a file that is not a record is named."""
    ax = load("steering_axbench")
    a = _axbench_record("default", {("DiffMean", "fixed"): [("s:0", 0.5)]})
    b = _axbench_record("default", {("DiffMean", "fixed"): [("s:1", 0.6)]})
    b["args"].update(seeds=[1, 2], steps=48)
    paths = []
    for name, rec in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(rec))
        paths.append(tmp_path / name)
    with pytest.raises(SystemExit, match=r"differ in steps; runs of another configuration need their own --label"):
        ax.load_runs(paths)
    b["args"]["steps"] = a["args"]["steps"]  # other seeds alone: the same configuration
    paths[1].write_text(json.dumps(b))
    assert [len(v) for v in ax.load_runs(paths).values()] == [2]
    paths[1].write_text(json.dumps(a))  # one concept, seed and method in two runs: it would count twice
    with pytest.raises(SystemExit, match=r"DiffMean seed fixed on s:0 is in two runs labelled 'default'"):
        ax.load_runs(paths)
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(SystemExit, match="c.json is not a steering_axbench --out record"):
        ax.load_runs([tmp_path / "c.json"])
