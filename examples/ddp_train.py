"""Data-parallel ReFT training: launch with torchrun, one process per device.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER               # base replicated (DDP)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER --shard-base  # base sharded (FSDP2)

Each process trains on its share of every global batch; DDP averages the Φs' gradients, and
reftlens normalises the loss by the global batch's completion tokens, so the result equals one
process training on the whole global batch. With ``--shard-base`` each process holds only its
shard of the frozen base (:func:`reftlens.training.shard_base`). ``--resume-from-step K`` trains K
steps with checkpoints, then resumes from the checkpoint to the end (what a restarted job does).
Rank 0 saves the trained interventions.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import reftlens
from reftlens import Intervention, LoReFT, ReftModel

WORDS = ["quick", "lazy", "brown", "red", "old", "new", "big", "small", "dark", "cold", "warm", "slow"]
DATA = [{"prompt": f"the {w} fox", "completion": f" jumps over the {w} dog"} for w in WORDS]


def build(model_name: str = "tiny-llama", shard: bool = False) -> ReftModel:
    model = reftlens.load_model(model_name)
    if shard:
        reftlens.training.shard_base(model)
    torch.manual_seed(0)
    return ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 8), layers=[1, 2], positions="f2+l2"))


def main(out: str, shard: bool = False, resume_from_step: int | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo")  # "nccl" on GPUs
    torch.set_num_threads(1)
    reft = build(shard=shard)
    kw = dict(batch_size=4, lr=1e-2, group_by_length=False, seed=1, progress=False)
    if resume_from_step is not None:  # a job stopped after K steps, restarted from its checkpoint
        kw["schedule"] = "constant"  # the stopped part ran max_steps=K; a decaying schedule would differ
        ckpt = os.path.join(out, "checkpoints")
        reftlens.train(reft, DATA, max_steps=resume_from_step, checkpoint_dir=ckpt, checkpoint_every=1, **kw)
        reft = build(shard=shard)  # a fresh process state: new Φs, resumed from the checkpoint
        kw.update(checkpoint_dir=ckpt, resume=True)
    history = reftlens.train(reft, DATA, max_steps=4, **kw)
    if dist.get_rank() == 0:
        reft.save(os.path.join(out, "reft"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(history.losses, f)
    dist.barrier()  # no rank tears gloo down while another still uses it (seen: SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    resume = [int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--resume-from-step=")]
    main(sys.argv[1], shard="--shard-base" in sys.argv[2:], resume_from_step=resume[0] if resume else None)
