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
    [[], ["--shard-base"], ["--shard-base", "--resume-from-step=2"]],
    ids=["replicated", "sharded", "sharded-resumed"],
)
def test_two_processes_match_one(tmp_path, flags):
    """DDP with the base replicated, FSDP2 with the base sharded (and a sharded run stopped after 2
    steps and resumed from its checkpoint): each equals one process on the same global batch."""
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
    assert run.returncode == 0, run.stderr[-3000:]
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())

    single = ddp_train.build()
    schedule = "constant" if any(f.startswith("--resume") for f in flags) else "linear"
    history = reftlens.train(
        single,
        ddp_train.DATA,
        max_steps=4,
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
