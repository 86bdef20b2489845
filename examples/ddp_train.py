"""Data-parallel ReFT training: launch with torchrun, one process per device.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER               # base replicated (DDP)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER --shard-base  # base sharded (FSDP2)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER --bank        # a bank of two sets

Each process trains on its share of every global batch; DDP averages the Φs' gradients, and
reftlens normalises the loss by the global batch's completion tokens, so the result equals one
process training on the whole global batch. With ``--shard-base`` each process holds only its
shard of the frozen base (:func:`reftlens.training.shard_base`). ``--resume-from-step K`` trains K
steps with checkpoints, then resumes from the checkpoint to the end (what a restarted job does).
``--bank`` trains a bank of two sets for two epochs (the smaller set's run ends first; a process's
share of a step may hold no example of a set). Rank 0 saves the trained interventions.
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
# a bank's data: set "fox" on every example, set "dog" on half of them (its run ends first)
BANK_DATA = [{**e, "adapter": "fox"} for e in DATA] + [{**e, "adapter": "dog"} for e in DATA[:6]]
BANK_RUN = dict(epochs=2)  # fox: 12 examples / (4 × 2 processes) → 2 steps per epoch; dog: 1


def build(model_name: str = "tiny-llama", shard: bool = False, bank: bool = False) -> ReftModel:
    model = reftlens.load_model(model_name)
    if shard:
        reftlens.training.shard_base(model)
    torch.manual_seed(0)
    d = model.cfg.d_model
    if bank:
        fox = Intervention(LoReFT(d, 8), layers=[1], positions="f2+l2")
        return ReftModel(model, {"fox": fox, "dog": Intervention(LoReFT(d, 8), layers=[2], positions="f2+l2")})
    return ReftModel(model, Intervention(LoReFT(d, 8), layers=[1, 2], positions="f2+l2"))


def main(out: str, shard: bool = False, resume_from_step: int | None = None, bank: bool = False) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo")  # "nccl" on GPUs
    torch.set_num_threads(1)
    reft = build(shard=shard, bank=bank)
    kw = dict(batch_size=4, lr=1e-2, group_by_length=False, seed=1, progress=False)
    if resume_from_step is not None:  # a job stopped after K steps, restarted from its checkpoint
        kw["schedule"] = "constant"  # the stopped part ran max_steps=K; a decaying schedule would differ
        ckpt = os.path.join(out, "checkpoints")
        reftlens.train(reft, DATA, max_steps=resume_from_step, checkpoint_dir=ckpt, checkpoint_every=1, **kw)
        reft = build(shard=shard)  # a fresh process state: new Φs, resumed from the checkpoint
        kw.update(checkpoint_dir=ckpt, resume=True)
    if bank:
        history = reftlens.train(reft, BANK_DATA, **BANK_RUN, **kw)
    else:
        history = reftlens.train(reft, DATA, max_steps=4, **kw)
    rank = dist.get_rank()
    print(f"rank {rank}: trained", flush=True)  # where each rank got to, should a launch fail
    if rank == 0:
        reft.save(os.path.join(out, "reft"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(history.losses, f)
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    resume = [int(a.split("=")[1]) for a in sys.argv[2:] if a.startswith("--resume-from-step=")]
    flags = sys.argv[2:]
    main(
        sys.argv[1],
        shard="--shard-base" in flags,
        resume_from_step=resume[0] if resume else None,
        bank="--bank" in flags,
    )
    # Everything is saved and the process group is gone. Leave without the interpreter's teardown:
    # with gloo (and FSDP2) a C++ worker thread still alive while the interpreter finalizes can abort
    # the process ("terminate called without an active exception", SIGABRT), failing a finished job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
