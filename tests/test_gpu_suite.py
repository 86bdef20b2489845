"""benchmarks/gpu_suite.py cannot rot: its CPU run at tiny size completes and its parity checks pass."""

import importlib.util
import json
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
