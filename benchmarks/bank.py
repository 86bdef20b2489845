"""A bank of intervention sets, a different one per example, against one set at a time.

Three measurements on one model, side by side in one run (the issue's targets in brackets):

- mixed-batch generation: 8 sets × 4 prompts, 32 new tokens, greedy, KV cache: one mixed batch of
  32 vs switching sets and generating each group of 4 in turn [≥ 3× tokens/s];
- bank size: forward of 32 × 128 tokens with a bank of 64 LoReFT sets (every row its own set) vs
  the same batch with a single set [≤ 1.10×];
- joint training: 8 sets × batch 4 in one run vs 8 runs one after another, same steps, and the
  largest weight difference between the two [≥ 1.5× faster, same weights].

``--micro`` compares the ways to compute many low-rank Φs over one batch of rows (the choice made in
``reftlens.interventions.base.low_rank_many``).

    python benchmarks/bank.py --model smollm2-135m
    python benchmarks/bank.py --micro
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import (
    add_load_argument,
    environment_line,
    headline,
    interleave,
    paper_layers,
    side_by_side,
    timed,
    wait_for_load,
)

WORDS = [
    "river",
    "garden",
    "planet",
    "violin",
    "harbour",
    "lantern",
    "meadow",
    "engine",
    "castle",
    "forest",
    "mirror",
    "window",
    "spider",
    "candle",
    "rocket",
    "island",
]


def make_set(model, seed: int):
    from reftlens import Intervention, LoReFT

    torch.manual_seed(seed)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W.bias.normal_(0, 2.0)  # a real edit, so sets generate differently
    return [Intervention(phi, layers=paper_layers(model.cfg.n_layers), positions="f5+l5")]


def paired(a, b, reps: int) -> tuple[float, float, float]:
    """Medians of a and b, run alternately, and the median of their per-pair ratios b / a."""
    c = side_by_side(a, b, reps)
    return c.base_s, c.other_s, c.paired


def bench_generation(model, reps: int, new_tokens: int) -> None:
    from reftlens import ReftModel

    n_sets, per_set = 8, 4
    bank = ReftModel(model, {f"s{k}": make_set(model, k) for k in range(n_sets)})
    prompts = [
        f"Tell me about the {WORDS[(k * per_set + i) % len(WORDS)]} in {i + 2} words:"
        for k in range(n_sets)
        for i in range(per_set)
    ]
    adapters = [f"s{k}" for k in range(n_sets) for _ in range(per_set)]
    kw = dict(eos_token_id=None)

    def mixed():
        return bank.generate(prompts, new_tokens, adapters=adapters, **kw)

    def switching():  # the same engine, one set at a time, each group of 4 prompts in turn
        return [
            t
            for k in range(n_sets)
            for t in bank.generate(prompts[k * per_set : (k + 1) * per_set], new_tokens, adapters=f"s{k}", **kw)
        ]

    same = mixed() == switching()  # warm-up, and the tokens agree
    t_switch, t_mixed, ratio = paired(switching, mixed, reps)
    n_tok = len(prompts) * new_tokens
    print(
        f"| mixed-batch generation, {n_sets} sets × {per_set} prompts, {new_tokens} new tokens | "
        f"switching: {t_switch:.2f} s ({n_tok / t_switch:.0f} tok/s) | mixed: {t_mixed:.2f} s "
        f"({n_tok / t_mixed:.0f} tok/s) | {t_switch / t_mixed:.2f}× tokens/s (paired {1 / ratio:.2f}×) | "
        f"same tokens: {same} |",
        flush=True,
    )
    headline(
        "bank",
        f"mixed-batch generation tokens/s ÷ switching sets, {n_sets} sets × {per_set} prompts",
        1 / ratio,
        target="≥ 3×",
        met=1 / ratio >= 3,
        peer="switching sets, each group of 4 in turn",
        note=f"same tokens: {same}",
    )


def bench_bank_size(model, reps: int, batch: int, seq: int, n_sets: int) -> None:
    from reftlens import ReftModel

    sets = {f"s{k}": make_set(model, k) for k in range(n_sets)}
    bank = ReftModel(model, sets)
    single = ReftModel(model, make_set(model, 0))
    torch.manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (batch, seq))
    adapters = [f"s{(k * n_sets) // batch}" for k in range(batch)]  # spread over the whole bank
    with torch.no_grad():
        run_bank = lambda: bank(tokens, adapters=adapters)  # noqa: E731
        run_single = lambda: single(tokens)  # noqa: E731
        run_bank(), run_single()
        t_single, t_bank, ratio = paired(run_single, run_bank, reps)
    print(
        f"| forward {batch} × {seq}, bank of {n_sets} sets ({len(set(adapters))} in the batch) | single set: "
        f"{t_single:.2f} s | bank: {t_bank:.2f} s | {ratio:.3f}× (paired) | |",
        flush=True,
    )
    headline(
        "bank",
        f"forward with a bank of {n_sets} sets ÷ a single set, {batch}×{seq}",
        ratio,
        target="≤ 1.10×",
        met=ratio <= 1.10,
        peer="the same batch with a single set",
    )


def bench_training(model, steps: int) -> None:
    import reftlens
    from reftlens import ReftModel

    n_sets, batch_size = 8, 4
    data = {
        f"s{k}": [
            {
                "prompt": f"Describe the {WORDS[(k + i) % len(WORDS)]} briefly.",
                "completion": f" The {WORDS[(k + i) % len(WORDS)]} is {['old', 'new', 'big', 'small'][i % 4]}.",
            }
            for i in range(2 * batch_size)
        ]
        for k in range(n_sets)
    }
    kw = dict(max_steps=steps, batch_size=batch_size, lr=1e-2, progress=False, seed=0)
    joint = ReftModel(model, {name: make_set(model, k) for k, name in enumerate(data)})
    rows = [dict(r, adapter=name) for name, rs in data.items() for r in rs]
    t_joint = timed(lambda: reftlens.train(joint, rows, **kw)).wall
    separate = [ReftModel(model, make_set(model, k)) for k in range(n_sets)]
    t_sep = timed(lambda: [reftlens.train(r, data[f"s{k}"], **kw) for k, r in enumerate(separate)]).wall
    diff = max(
        (a - b).abs().max().item()
        for k, r in enumerate(separate)
        for a, b in zip(r.parameters(), [p for iv in joint.bank[f"s{k}"] for p in iv.phi.parameters()])
    )
    print(
        f"| joint training, {n_sets} sets × batch {batch_size}, {steps} steps | {n_sets} runs: {t_sep:.1f} s | "
        f"one run: {t_joint:.1f} s | {t_sep / t_joint:.2f}× faster | max weight difference {diff:.1e} |",
        flush=True,
    )
    headline(
        "bank",
        f"joint training speed-up, {n_sets} sets × batch {batch_size}, {steps} steps",
        t_sep / t_joint,
        target="≥ 1.5×",
        met=t_sep / t_joint >= 1.5,
        peer="8 runs one after another",
        note=f"max weight difference {diff:.1e}",
    )


# ---- --micro: how to run k low-rank Φs over n rows at once ------------------------------------------


def micro(d: int, r: int, reps: int) -> None:
    from reftlens.interventions.base import low_rank_many

    def gather(h, which, down, bias, up):  # each row's own weights gathered, then einsum
        z = torch.einsum("nrd,nd->nr", down[which], h) + bias[which]
        return torch.einsum("nr,nrd->nd", z, up[which])

    def grouped(h, which, down, bias, up):  # a loop over the sets present: index_select, matmul, index_copy
        out = torch.zeros_like(h)
        for g in which.unique().tolist():
            idx = (which == g).nonzero().squeeze(1)
            out = out.index_copy(0, idx, (h.index_select(0, idx) @ down[g].T + bias[g]) @ up[g])
        return out

    ways = {
        "dense over the set axis (chosen)": low_rank_many,
        "gather + einsum": gather,
        "index_select per set": grouped,
    }
    print(f"# d {d}, rank {r}; best of {reps} µs")
    print("| rows | sets | backward | " + " | ".join(f"{w} (µs)" for w in ways) + " |")
    print("|---|---|---|" + "---|" * len(ways))
    for backward in (False, True):
        for n in (32, 320, 4096):
            for k in (8, 64):
                torch.manual_seed(0)
                h = torch.randn(n, d)
                which = torch.randint(0, k, (n,))
                params = [(torch.randn(*s) / d**0.5).requires_grad_(backward) for s in ((k, r, d), (k, r), (k, r, d))]
                ref = grouped(h, which, *params)

                def run(f, h=h, which=which, params=params, backward=backward):
                    out = f(h, which, *params)
                    if backward:
                        out.square().sum().backward()
                    return out.detach()

                res = interleave({w: (lambda f=f: run(f)) for w, f in ways.items()}, reps, warmup=2, keep="last")
                for outs in res.results.values():
                    torch.testing.assert_close(outs[-1], ref.detach(), rtol=1e-4, atol=1e-4)
                times = res.times
                # the best of the repetitions, as timeit reports: on a shared machine the median carries other
                # processes' time slices
                print(
                    f"| {n} | {k} | {backward} | " + " | ".join(f"{1e6 * min(v):.0f}" for v in times.values()) + " |",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sets", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument(
        "--only", nargs="+", choices=["generation", "size", "training"], default=["generation", "size", "training"]
    )
    ap.add_argument("--micro", action="store_true", help="only compare the ways to run many low-rank Φs")
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    print(environment_line())
    if args.micro:
        micro(576, 4, args.reps)
        return
    import reftlens

    model = reftlens.load_model(args.model)
    print(
        f"# {args.model}: d_model {model.cfg.d_model}, {model.cfg.n_layers} layers; sets: LoReFT rank 4 at layers "
        f"{paper_layers(model.cfg.n_layers)}, positions f5+l5"
    )
    print("| measurement | one set at a time | bank | ratio | |")
    print("|---|---|---|---|---|")
    if "generation" in args.only:
        bench_generation(model, args.reps, args.new_tokens)
    if "size" in args.only:
        bench_bank_size(model, args.reps, args.batch, args.seq, args.sets)
    if "training" in args.only:
        bench_training(model, args.steps)


if __name__ == "__main__":
    main()
