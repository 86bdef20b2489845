"""Data-parallel ReFT training: launch with torchrun, one process per device.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT_FOLDER

Each process trains on its share of every global batch; DDP averages the gradients, and
reftlens normalises the loss by the global batch's completion tokens, so the result equals one
process training on the whole global batch. Rank 0 saves the trained interventions.
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


def build(model_name: str = "tiny-llama") -> ReftModel:
    model = reftlens.load_model(model_name)
    torch.manual_seed(0)
    return ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 8), layers=[1, 2], positions="f2+l2"))


def main(out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo")  # "nccl" on GPUs
    torch.set_num_threads(1)
    reft = build()
    history = reftlens.train(
        reft, DATA, max_steps=4, batch_size=4, lr=1e-2, group_by_length=False, seed=1, progress=False
    )
    if dist.get_rank() == 0:
        reft.save(os.path.join(out, "reft"))
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(history.losses, f)
    dist.barrier()  # no rank tears gloo down while another still uses it (seen: SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
