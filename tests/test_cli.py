"""The main job runs end to end (on the tiny model, a few steps, to stay quick)."""

import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "reftlens",
            "demo",
            "--model",
            "tiny-llama",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "saved"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "before training" in out.stdout and "after training" in out.stdout
    assert "reloaded: same generations = True" in out.stdout
    assert (tmp_path / "saved" / "reft_config.json").is_file()


def test_tour_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "reftlens", "tour", "--model", "tiny-gpt2"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layer  3" in out.stdout
