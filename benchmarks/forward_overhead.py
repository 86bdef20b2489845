"""Forward with a LoReFT set vs the plain TransformerLens bridge forward, same batch.

The set is the paper's instruction-tuning setup: LoReFT rank 4 at layers 3;9;18;24 (scaled to
the model's depth for the tiny models), positions f5+l5. Timings interleave the two paths and
report medians, so drifting machine load hits both alike.

    python benchmarks/forward_overhead.py --models tiny-llama tiny-gpt2 smollm2-135m --reps 15
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, paper_layers, side_by_side, wait_for_load

import reftlens
from reftlens import Intervention, LoReFT, ReftModel


def bench(name: str, batch: int, seq: int, reps: int) -> dict:
    model = reftlens.load_model(name)
    torch.manual_seed(0)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(3, vocab, (batch, seq))
    reft = ReftModel(
        model,
        Intervention(
            LoReFT(model.cfg.d_model, 4, init="random"), layers=paper_layers(model.cfg.n_layers), positions="f5+l5"
        ),
    )
    with torch.no_grad():
        c = side_by_side(lambda: model(tokens), lambda: reft(tokens), reps, warmup=3)
    return dict(
        model=name,
        layers=paper_layers(model.cfg.n_layers),
        plain_ms=1e3 * c.base_s,
        reft_ms=1e3 * c.other_s,
        ratio=c.paired,  # per adjacent pair: robust to drift
        overhead_ms=1e3 * c.delta_s,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-gpt2", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    print(f"# forward overhead, batch {args.batch} x {args.seq}, fp32, {torch.get_num_threads()} threads")
    print(environment_line())
    print(
        "| model | layers | plain bridge (ms) | with LoReFT set (ms) | median paired ratio | median paired overhead (ms) |"
    )
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        r = bench(name, args.batch, args.seq, args.reps)
        print(
            f"| {r['model']} | {r['layers']} | {r['plain_ms']:.1f} | {r['reft_ms']:.1f} | {r['ratio']:.3f} | {r['overhead_ms']:.2f} |",
            flush=True,
        )
        rows.append(r)
    for r in rows:
        real = r["model"] == "smollm2-135m"
        headline(
            "forward_overhead",
            f"forward with a LoReFT set / plain bridge, {r['model']} {args.batch}×{args.seq}",
            r["ratio"],
            target="≤ 1.02×" if real else "",
            met=r["ratio"] <= 1.02 if real else None,
            peer="plain TransformerLens bridge (pyreft: 1.001–1.008× plain HF)",
        )


if __name__ == "__main__":
    main()
