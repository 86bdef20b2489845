"""Data-parallel training with 2 CPU processes (gloo) equals one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reftlens

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.parametrize(
    "flags",
    [[], ["--shard-base"], ["--shard-base", "--resume-from-step=2"], ["--bank"]],
    ids=["replicated", "sharded", "sharded-resumed", "bank"],
)
def test_two_processes_match_one(tmp_path, flags):
    """DDP with the base replicated, FSDP2 with the base sharded (and a sharded run stopped after 2
    steps and resumed from its checkpoint), a bank of two sets whose runs end at different steps
    (a process's share may hold none of a set's examples): each equals one process on the same
    global batch."""
    import ddp_train

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "examples" / "ddp_train.py"),
        str(tmp_path),
        *flags,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-1500:]}\nstderr:\n{run.stderr[-3000:]}"
    assert run.stdout.count(": done") == 2, run.stdout  # both ranks finished their work
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())

    bank = "--bank" in flags
    single = ddp_train.build(bank=bank)
    schedule = "constant" if any(f.startswith("--resume") for f in flags) else "linear"
    history = reftlens.train(
        single,
        ddp_train.BANK_DATA if bank else ddp_train.DATA,
        **(ddp_train.BANK_RUN if bank else dict(max_steps=4)),
        batch_size=8,
        lr=1e-2,
        group_by_length=False,
        seed=1,
        progress=False,
        schedule=schedule,
    )
    assert ddp_losses == pytest.approx(history.losses, abs=1e-5)
    loaded = reftlens.ReftModel.load(tmp_path / "reft", single.model)
    for a, b in zip(single.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_shard_base_needs_a_process_group(tiny_models):
    with pytest.raises(reftlens.TrainingError, match="init_process_group"):
        reftlens.training.shard_base(tiny_models["tiny-llama"])
