"""Forward with a LoReFT set vs the plain TransformerLens bridge forward, same batch.

The set is the paper's instruction-tuning setup: LoReFT rank 4 at layers 3;9;18;24 (scaled to
the model's depth for the tiny models), positions f5+l5. Timings interleave the two paths and
report medians, so drifting machine load hits both alike.

    python benchmarks/forward_overhead.py --models tiny-llama tiny-gpt2 smollm2-135m --reps 15
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import environment_line, headline

import reftlens
from reftlens import Intervention, LoReFT, ReftModel


def layers_for(n_layers: int) -> list[int]:
    if n_layers >= 25:
        return [3, 9, 18, 24]
    return sorted({max(0, round(n_layers * f) - 1) for f in (0.125, 0.375, 0.625, 0.875)})


def bench(name: str, batch: int, seq: int, reps: int) -> dict:
    model = reftlens.load_model(name)
    torch.manual_seed(0)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(3, vocab, (batch, seq))
    reft = ReftModel(
        model,
        Intervention(
            LoReFT(model.cfg.d_model, 4, init="random"), layers=layers_for(model.cfg.n_layers), positions="f5+l5"
        ),
    )
    plain_t, reft_t = [], []
    with torch.no_grad():
        for _ in range(3):  # warm up
            model(tokens)
            reft(tokens)
        for _ in range(reps):
            t = time.perf_counter()
            model(tokens)
            plain_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            reft(tokens)
            reft_t.append(time.perf_counter() - t)
    p, r = statistics.median(plain_t), statistics.median(reft_t)
    paired = statistics.median(b / a for a, b in zip(plain_t, reft_t))  # per adjacent pair: robust to drift
    return dict(
        model=name,
        layers=layers_for(model.cfg.n_layers),
        plain_ms=1e3 * p,
        reft_ms=1e3 * r,
        ratio=paired,
        overhead_ms=1e3 * statistics.median(b - a for a, b in zip(plain_t, reft_t)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-gpt2", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    print(f"# forward overhead, batch {args.batch} x {args.seq}, fp32, {torch.get_num_threads()} threads")
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformer-lens {__import__('importlib.metadata').metadata.version('transformer-lens')}, "
        f"reftlens {reftlens.__version__}"
    )
    print(
        "| model | layers | plain bridge (ms) | with LoReFT set (ms) | median paired ratio | median paired overhead (ms) |"
    )
    print("|---|---|---|---|---|---|")
    print(environment_line())
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
