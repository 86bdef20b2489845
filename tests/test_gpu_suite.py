"""benchmarks/gpu_suite.py and benchmarks/scale.py cannot rot: their CPU runs at tiny size complete (and the
suite's parity checks pass)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_the_suite_runs_on_cpu_at_tiny_size_and_its_parity_checks_pass(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SUITE), "--device", "cpu", "--tiny", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "parity: all pass" in out.stdout
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert len(results) == 2
    for res in results.values():
        parity, speed = res["parity"], res["speed"]
        assert parity["pass"] and parity["KV cache == recomputation (tokens)"] == 1.0
        assert parity["to_hf vs hooked"] <= 1e-4 and parity["merge vs hooked"] <= 1e-4
        assert parity["bank row vs the set alone"] <= 1e-4 and parity["set edits the logits (rel)"] > 1e-3
        ratios = [v for k, v in speed.items() if isinstance(v, float)]
        assert len(ratios) >= 5 and all(0 < v < float("inf") for v in ratios)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path of a machine without CUDA")
def test_the_suite_skips_cleanly_without_cuda():
    out = subprocess.run([sys.executable, str(SUITE)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "skipped (no CUDA device" in out.stdout


def test_bootstrap_names_the_bundle_script_when_modules_and_wheels_are_missing(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    monkeypatch.setattr(suite, "NEEDED", ("reftlens_no_such_module",))
    with pytest.raises(SystemExit, match="make_gpu_bundle.sh"):
        suite.bootstrap(tmp_path / "gpu_wheels")


def test_transformer_lens_loads_and_patches_with_the_datasets_placeholders():
    """The bundle leaves out `datasets` (pyarrow does not fit 64 MiB): TransformerLens must still load a
    model and run its patching with the suite's placeholders in place of the real package."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("suite", {str(SUITE)!r})
suite = importlib.util.module_from_spec(spec); spec.loader.exec_module(suite)
suite.stub_datasets()
import reftlens
from transformer_lens import patching
m = reftlens.load_model("tiny-llama")
clean = m.to_tokens("the quick brown fox")
corrupt = clean.clone(); corrupt[0, -1] = 5
_, cache = m.run_with_cache(clean)
out = patching.get_act_patch_resid_pre(m, corrupt, cache, lambda l: l[0, -1, 5])
assert out.shape == (m.cfg.n_layers, clean.shape[1]), out.shape
assert type(sys.modules["datasets"].load_dataset).__name__ == "function"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# --------------------------------------------------------------------------- benchmarks/scale.py

SCALE = SUITE.parent / "scale.py"


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_under_test", SCALE)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    return scale


def test_scale_runs_both_sizes_at_tiny_size_with_every_ratio_and_the_sweep_budget(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCALE), "--tiny", "--out", str(tmp_path / "s.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    record = json.loads((tmp_path / "s.json").read_text())
    assert set(record["results"]) == {"135m", "1b", "135m@bfloat16"}  # the 135M size also with a bf16 base
    assert (
        record["results"]["135m@bfloat16"]["time"]["train"]["losses"]["reftlens"]
        != (record["results"]["135m"]["time"]["train"]["losses"]["reftlens"])
    )  # a bf16 base is another computation, not the float32 one relabelled
    for size, res in record["results"].items():
        ratios = record["ratios"][size]
        assert len(ratios) == 4 and all(0 < v < float("inf") for v in ratios.values()), ratios
        # the same tokens through both arms: every arm ran its reps and the losses are finite numbers
        assert len(res["time"]["train"]["losses"]["reftlens"]) == 2 == len(res["time"]["train"]["losses"]["floor"])
        for strategy in ("replay", "batch"):
            w = res[f"sweep_{strategy}"]
            assert w["finite"] and w["shape"][1] == 6 and w["shape"][0] * 6 == w["cells"]  # layers x positions
            assert 1 <= w["batch_size"] <= w["cells"] and w["budget_mb"] == 0.002 * 1024
    # the scaled-down llama-1b has a 4096-token vocabulary: the 2 MiB budget binds (fewer rows than cells)
    assert record["results"]["1b"]["sweep_batch"]["batch_size"] < record["results"]["1b"]["sweep_batch"]["cells"]
    lines = [line for line in out.stdout.splitlines() if line.startswith("::headline::")]
    assert len(lines) == 18  # 4 ratios + 2 sweeps, at each of the three runs


def test_scale_sweep_batch_size_is_the_rows_the_budget_holds():
    """At Llama-3.2-1B's shape the estimate of the chosen rows fits the budget, and one more row would not."""
    from types import SimpleNamespace

    scale = _scale_module()
    cfg = SimpleNamespace(d_model=2048, d_mlp=8192, d_vocab=128256, n_layers=16, n_heads=32)
    for budget in (0.25, 1.0):
        r = scale.sweep_rows(cfg, 12, budget)
        assert r["batch_size"] == r["rows_fit"] < r["cells"]
        fixed, per_row = scale.fixed_bytes(cfg, 12), scale.row_bytes(cfg, 12)
        assert fixed + r["batch_size"] * per_row <= budget * 2**30 < fixed + (r["batch_size"] + 1) * per_row
    assert scale.sweep_rows(cfg, 12, 1e-6)["batch_size"] == 1  # a budget below one row: one row at a time


def test_scale_rejects_a_non_positive_count():
    out = subprocess.run(
        [sys.executable, str(SCALE), "--tiny", "--reps", "0"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "--reps must be positive; got 0" in out.stderr
