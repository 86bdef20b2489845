"""Serving a bank on a GPU: one mixed batch, every prompt with its own set, against the base model.

256 LoReFT sets (rank 4, the paper's layers, positions f5+l5) in one bank, a batch of 256 prompts,
each with a different set, 32 new tokens greedy with the KV cache: tokens/s of the mixed batch
against the same 256 prompts on the base model alone (the same generation path, no set), in one run.
The set's edits sit on the prompt, so decoding costs the base model's; what the bank adds is the
prefill's edits and the per-call planning.

Needs CUDA; elsewhere it prints a 'skipped' line and exits 0.

    python benchmarks/gpu_bank.py --model smollm2-135m --sets 256 --batch 256
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sets", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_bank: skipped (no CUDA device here; run it on a machine with a GPU)")
        return 0

    from common import environment_line, headline, interleave, paper_layers

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel

    print(environment_line())
    dtype = getattr(torch, args.dtype)
    model = reftlens.load_model(args.model, device="cuda", dtype=dtype)
    n = model.cfg.n_layers
    layers = paper_layers(n)

    def make(k: int) -> Intervention:
        torch.manual_seed(k)
        phi = LoReFT(model.cfg.d_model, 4, init="random")
        with torch.no_grad():
            phi.W.bias.normal_(0, 2.0)
        return Intervention(phi.to(dtype), layers=layers, positions="f5+l5")

    bank = ReftModel(model, {f"s{k}": make(k) for k in range(args.sets)})
    words = ["river", "garden", "planet", "violin", "harbour", "lantern", "meadow", "engine"]
    prompts = [f"Write about the {words[i % len(words)]} number {i}:" for i in range(args.batch)]
    mixed = [f"s{i % args.sets}" for i in range(args.batch)]
    base = [None] * args.batch

    def run(adapters: list) -> None:
        bank.generate(prompts, args.new_tokens, adapters=adapters, eos_token_id=None)
        torch.cuda.synchronize()  # each arm ends synchronised, so the next one's clock starts on an idle device

    torch.cuda.synchronize()
    r = interleave({"mixed": lambda: run(mixed), "base": lambda: run(base)}, args.reps, warmup=1)
    t_mixed, t_base = r.times["mixed"], r.times["base"]
    tokens = args.batch * args.new_tokens
    m, b = tokens / min(t_mixed), tokens / min(t_base)
    print(
        f"| {args.model} {args.dtype} | {args.sets} sets, batch {args.batch}, {args.new_tokens} new tokens | "
        f"mixed bank: {m:.0f} tok/s | base model: {b:.0f} tok/s | {m / b:.3f}× |"
    )
    headline(
        "gpu_bank",
        f"mixed-batch tokens/s ÷ base model, {args.sets} sets × batch {args.batch}",
        m / b,
        peer="the base model alone, same prompts and path",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
