"""reftlens at 135M and at ~1B parameters, side by side with their floors, in one run: how each ratio moves with size.

Two models, the same workload on each (float32, CPU):

- ``135m``: SmolLM2-135M-Instruct (``reftlens.load_model("smollm2-135m")``);
- ``1b``: a random model of Llama-3.2-1B's shape (``reftlens.models.random_model("llama-1b")``,
  1.24B parameters, ~5 GB in float32; random weights: for time and memory only).

For each, as ratios measured in this run (reftlens / its floor):

1. forward: a ReftModel with a LoReFT rank-4 set at the paper's layers (``common.paper_layers``),
   positions f5+l5, vs the plain TransformerLens model, same tokens (``--batch`` × ``--seq``);
2. training step: ``reftlens.train``'s step on that set vs the plain-transformers floor (the
   transformers model + a zero vector added at the same layers, forward + backward + AdamW; both
   from ``floor.py``, the floor ``train_vs_pyreft.py`` and ``gpu_suite.py`` use), same batch;
3. peak training memory (RSS above the loaded model, over ``--mem-steps`` steps) vs the floor's,
   each arm in its own child process so the peaks do not mix;
4. generation: ``reft.generate`` vs transformers' ``generate`` (greedy, KV cache, the same prompts,
   EOS does not stop either);
5. ``patch_sweep`` (resid_pre, every layer × position of a ``--sweep-seq``-token prompt) within a
   stated memory budget (``--sweep-budget-gib``): ``batch_size`` = the rows that fit the budget, one
   row's forward estimated from d_model, d_mlp, heads, layers, vocabulary and the prompt length
   (:func:`row_bytes`); each strategy (``--strategies``: "replay", which "auto" picks at both sizes, and
   "batch") in its own child process; reported: the budget, the measured peak RSS above the loaded
   model, and whether the peak stayed within the budget.

Every part runs in a child process of this script (the parent loads no model). Targets (issue 23):
time ratios ≤ 1.02×, memory ≤ 1.05× at both sizes.

    python benchmarks/scale.py --out .bench/scale.json          # both sizes (estimated ~10-15 min on 2 cores)
    python benchmarks/scale.py --sizes 1b --out .bench/scale_1b.json
    python benchmarks/scale.py --tiny                           # smoke run (tiny models, one child per size)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent / "reftlens" / "__init__.py").is_file():  # run from a checkout: measure the source tree
    sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402 (after the path and environment)
    add_load_argument,
    compare,
    environment_line,
    headline,
    interleave,
    machine,
    paper_layers,
    peak_rss,
    table,
    versions,
    wait_for_load,
)

SIZES = ("135m", "1b")
LABELS = {
    "135m": "SmolLM2-135M-Instruct",
    "1b": "random Llama-3.2-1B shape",
    "135m-tiny": "tiny-llama (stands in for 135M)",
    "1b-tiny": "random llama-1b shape, scaled down (4 layers, d 128)",
}
TINY_1B = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
TINY_1B["vocab_size"] = 4096
PARTS = ("time", "mem_reftlens", "mem_floor", "sweep_replay", "sweep_batch")
LR = 4e-3
RANK = 4
TIME_TARGET, MEM_TARGET = 1.02, 1.05
# defaults sized so that both models together take an estimated ~10-15 min on 2 CPU cores (from FLOP counts)
DEFAULTS = dict(
    batch=2,
    seq=64,
    reps=7,
    train_reps=5,
    warmup=1,
    mem_steps=2,
    gen_batch=2,
    gen_prompt=16,
    new_tokens=16,
    gen_reps=3,
    sweep_seq=12,
    sweep_budget_gib=0.25,
)
TINY = dict(
    batch=2,
    seq=16,
    reps=2,
    train_reps=2,
    warmup=1,
    mem_steps=2,
    gen_batch=2,
    gen_prompt=8,
    new_tokens=4,
    gen_reps=1,
    sweep_seq=6,
    sweep_budget_gib=0.002,
)


# --------------------------------------------------------------------------- models and inputs


def load(size: str, tiny: bool, dtype: str = "float32"):
    """The bridge of one size in ``dtype``, every weight paged in."""
    import torch

    import reftlens
    from reftlens.models import random_model

    dt = getattr(torch, dtype)
    if size == "135m":
        model = reftlens.load_model("tiny-llama" if tiny else "smollm2-135m", dtype=dt)
    else:
        model = random_model("llama-1b", dtype=dt, **(TINY_1B if tiny else {}))
    with torch.no_grad():  # mmap'ed weights: first-use page faults are not training memory
        sum(float(p.float().sum()) for p in model.parameters())
    return model


def plain_hf(model):
    """The same weights as a plain transformers model (shared, not copied), transformers' default
    attention, frozen: the floor's model."""
    from reftlens.runtime.compat import fast_attention
    from reftlens.runtime.hf_backend import pristine_hf

    hf = pristine_hf(model, share=True)
    fast_attention(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf.eval()


def loreft_set(model):
    """A ReftModel with one float32 LoReFT rank-4 set at the paper's layers, positions f5+l5
    (seeded); over a bf16 base with ``cast=True`` (the dtype policy: the edit runs in float32)."""
    import torch

    from reftlens import Intervention, LoReFT, ReftModel

    torch.manual_seed(0)
    phi = LoReFT(model.cfg.d_model, RANK, init="random")
    low = next(model.parameters()).dtype != torch.float32
    iv = Intervention(phi, layers=paper_layers(model.cfg.n_layers), positions="f5+l5")
    return ReftModel(model, iv, cast=low)


def token_ids(model, batch: int, seq: int, seed: int):
    """Random ids every tokenizer here knows (a random model's tokenizer has ~400 tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(model.cfg.d_vocab, 400), (batch, seq), generator=g)


def train_batch(model, args) -> dict:
    """One batch: the first half of each row is the prompt (no loss, where f5+l5 resolve), the second the completion."""
    import torch

    ids = token_ids(model, args.batch, args.seq, seed=1)
    prompt = (torch.arange(args.seq) < args.seq // 2).long().expand_as(ids)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.masked_fill(prompt.bool(), -100),
        prompt_mask=prompt.clone(),
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def row_bytes(cfg, seq: int, dtype_bytes: int = 4) -> int:
    """Bytes one row of a patch sweep's forward needs (an estimate, no_grad): the logits twice (the
    forward's and the sweep's buffer for the metric), the MLP and attention activations of one
    layer alive at once, the keys and values a replayed row carries through every layer, and the
    attention scores."""
    d, m, v, layers, heads = cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.n_layers, cfg.n_heads
    floats = 2 * seq * v + seq * (3 * m + 6 * d) + 2 * layers * seq * d + 2 * heads * seq * seq
    return dtype_bytes * floats


def fixed_bytes(cfg, seq: int, dtype_bytes: int = 4) -> int:
    """Bytes a sweep of one prompt holds whatever its ``batch_size`` (an estimate, fitted on a
    16-layer model with Llama-3.2-1B's vocabulary): five single-row logits (the clean run, the
    corrupted run, replay's check run, and the copies the metric is probed on) and each layer's
    recorded residual stream, keys and values."""
    return dtype_bytes * (5 * seq * cfg.d_vocab + 4 * cfg.n_layers * seq * cfg.d_model)


def sweep_rows(cfg, seq: int, budget_gib: float, dtype_bytes: int = 4) -> dict:
    """The sweep's ``batch_size``: the rows that fit the budget after the fixed part (at least 1,
    at most every cell)."""
    per_row, fixed = row_bytes(cfg, seq, dtype_bytes), fixed_bytes(cfg, seq, dtype_bytes)
    cells = cfg.n_layers * seq
    fit = int(max(0, budget_gib * 2**30 - fixed) // per_row)
    return dict(
        row_mb=per_row / 2**20,
        fixed_mb=fixed / 2**20,
        rows_fit=fit,
        batch_size=max(1, min(fit, cells)),
        cells=cells,
        estimate_mb=(fixed + max(1, min(fit, cells)) * per_row) / 2**20,
    )


# --------------------------------------------------------------------------- parts (child processes)


def part_time(model, args) -> dict:
    """Forward, training step and generation, each interleaved with its floor (rotating order)."""
    import torch
    from floor import add_zero_vectors, floor_step, hf_greedy, reft_step

    out: dict = {}
    reft = loreft_set(model).eval()
    ids = token_ids(model, args.batch, args.seq, seed=0)
    with torch.no_grad():
        r = interleave({"plain": lambda: model(ids), "reftlens": lambda: reft(ids)}, args.reps, warmup=args.warmup)
    c = compare(r.times["plain"], r.times["reftlens"])
    out["forward"] = dict(plain_s=c.base_s, reftlens_s=c.other_s, ratio=c.paired, times=r.times)

    b = train_batch(model, args)
    hf = plain_hf(model)
    vecs, handles = add_zero_vectors(hf, paper_layers(model.cfg.n_layers))
    arms = {"floor": floor_step(hf, vecs, LR), "reftlens": reft_step(reft, LR)}
    r = interleave({k: (lambda f=f: f(b)) for k, f in arms.items()}, args.train_reps, warmup=args.warmup, keep="all")
    for h in handles:  # generation's floor is the plain model
        h.remove()
    c = compare(r.times["floor"], r.times["reftlens"])
    out["train"] = dict(floor_s=c.base_s, reftlens_s=c.other_s, ratio=c.paired, times=r.times, losses=r.results)

    reft.eval()
    prompts = token_ids(model, args.gen_batch, args.gen_prompt, seed=2)
    mask = torch.ones_like(prompts)
    k, n, pad = args.new_tokens, prompts.shape[1], reft.pad_token_id
    made: dict = {}

    def ours():
        made["reftlens"] = reft.generate(prompts, k, attention_mask=mask, eos_token_id=None)[:, n:]

    def theirs():
        made["transformers"] = hf_greedy(hf, prompts, mask, k, pad)

    r = interleave({"transformers": theirs, "reftlens": ours}, args.gen_reps, warmup=args.warmup)
    assert made["reftlens"].shape == made["transformers"].shape == (args.gen_batch, k), {
        a: tuple(t.shape) for a, t in made.items()
    }
    c = compare(r.times["transformers"], r.times["reftlens"])
    out["generate"] = dict(transformers_s=c.base_s, reftlens_s=c.other_s, ratio=c.paired, times=r.times)
    return out


def part_mem(model, args, arm: str) -> dict:
    """Peak RSS above the loaded model (and the arm's step built) over ``mem_steps`` training steps."""
    from floor import add_zero_vectors, floor_step, reft_step

    b = train_batch(model, args)
    if arm == "reftlens":
        step = reft_step(loreft_set(model), LR)
    else:
        hf = plain_hf(model)
        step = floor_step(hf, add_zero_vectors(hf, paper_layers(model.cfg.n_layers))[0], LR)
    m = peak_rss(lambda: [step(b) for _ in range(args.mem_steps)])  # the first step (warm-up) included
    return dict(
        rss_before_mb=m["rss_before_mb"],
        peak_rss_mb=m["peak_rss_mb"],
        peak_rss_delta_mb=m["peak_rss_delta_mb"],
        losses=m["result"],
    )


def part_sweep(model, args, strategy: str) -> dict:
    """``patch_sweep`` within ``--sweep-budget-gib``: its peak RSS above the loaded model, and time."""
    import torch

    from reftlens.analysis import patch_sweep

    rows = sweep_rows(model.cfg, args.sweep_seq, args.sweep_budget_gib, dtype_bytes=4 if args.dtype == "float32" else 2)
    clean = token_ids(model, 1, args.sweep_seq, seed=3)
    corrupt = clean.clone()
    corrupt[0, 1:3] = token_ids(model, 1, 2, seed=4)[0]
    target = int(clean[0, -1])

    def sweep():
        with torch.no_grad():
            return patch_sweep(
                model,
                clean,
                corrupt,
                lambda logits: logits[..., -1, target],
                batched=True,
                batch_size=rows["batch_size"],
                strategy=strategy,
                progress=False,
            )

    t0 = time.perf_counter()
    m = peak_rss(sweep)
    seconds = time.perf_counter() - t0
    values = m["result"].values
    budget_mb = args.sweep_budget_gib * 1024
    return dict(
        strategy=strategy,
        budget_mb=budget_mb,
        **rows,
        rss_before_mb=m["rss_before_mb"],
        peak_rss_mb=m["peak_rss_mb"],
        peak_rss_delta_mb=m["peak_rss_delta_mb"],
        within_budget=m["peak_rss_delta_mb"] <= budget_mb,
        seconds=seconds,
        shape=list(values.shape),
        finite=bool(torch.isfinite(values).all()),
    )


def run_parts(size: str, parts: list[str], args) -> dict:
    """In this (child) process: load the model of ``size`` and run ``parts`` in order."""
    import torch

    t0 = time.perf_counter()
    model = load(size, args.tiny, args.dtype)
    out: dict = {
        "params": n_params(model),
        "layers": paper_layers(model.cfg.n_layers),
        "load_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    for part in parts:
        t1 = time.perf_counter()
        if part == "time":
            out[part] = part_time(model, args)
        elif part.startswith("mem_"):
            out[part] = part_mem(model, args, part[len("mem_") :])
        elif part.startswith("sweep_"):
            out[part] = part_sweep(model, args, part[len("sweep_") :])
        else:
            raise SystemExit(f"scale.py: unknown part {part!r}; parts are {', '.join(PARTS)}")
        out[part]["part_s"] = time.perf_counter() - t1
    return out


def child(size: str, parts: list[str], args, argv: list[str]) -> dict:
    """Run ``parts`` of ``size`` in a fresh process of this script; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
        cmd += ["--size", size, "--parts", ",".join(parts), "--child-out", str(path)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            raise SystemExit(
                f"scale.py: the child for {size} {parts} failed ({done.returncode}):\n"
                + done.stdout[-2000:]
                + done.stderr[-4000:]
            )
        print(f"# {size} {','.join(parts)}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return json.loads(path.read_text())


# --------------------------------------------------------------------------- the report


def ratios(res: dict) -> dict:
    """metric -> ratio (reftlens / floor) of one size's results."""
    t = res["time"]
    floor_mb = res["mem_floor"]["peak_rss_delta_mb"]
    return {
        "forward with a LoReFT set / plain model": t["forward"]["ratio"],
        "training step / plain-transformers floor": t["train"]["ratio"],
        "peak training memory / floor": res["mem_reftlens"]["peak_rss_delta_mb"] / max(floor_mb, 1e-9),
        "generation / transformers generate": t["generate"]["ratio"],
    }


def report(results: dict, args) -> str:
    sizes = list(results)
    per = {s: ratios(results[s]) for s in sizes}
    lines = [
        f"# batch {args.batch} × {args.seq} (forward, training), generation {args.gen_batch} × {args.gen_prompt} + "
        f"{args.new_tokens} tokens, sweep over a {args.sweep_seq}-token prompt, float32 unless marked; ratios are medians of "
        "per-rep ratios (rotating order)",
        "",
    ]
    header = ["ratio (reftlens / floor)"] + [
        f"{size_label(s, args)} ({results[s]['params'] / 1e6:.0f}M)" for s in sizes
    ]
    fp32 = [s for s in sizes if "@" not in s]  # the change with size is read between float32 runs
    if len(fp32) > 1:
        header.append(f"change {fp32[0]} → {fp32[-1]} (float32)")
    header += ["target", "met at every size"]
    rows = []
    for metric in per[sizes[0]]:
        vals = [per[s][metric] for s in sizes]
        target = MEM_TARGET if "memory" in metric else TIME_TARGET
        row = [metric, *(f"{v:.3f}" for v in vals)]
        if len(fp32) > 1:
            row.append(f"{per[fp32[-1]][metric] - per[fp32[0]][metric]:+.3f}")
        row += [f"≤ {target:.2f}×", "yes" if all(v <= target for v in vals) else "no"]
        rows.append(row)
    lines.append(table(header, rows))
    lines += ["", "Absolute times (median seconds) and memory (MB above the loaded model):", ""]
    rows = []
    for s in sizes:
        t, r = results[s]["time"], results[s]
        rows.append(
            [
                size_label(s, args),
                f"{t['forward']['plain_s']:.3f} / {t['forward']['reftlens_s']:.3f}",
                f"{t['train']['floor_s']:.3f} / {t['train']['reftlens_s']:.3f}",
                f"{r['mem_floor']['peak_rss_delta_mb']:.0f} / {r['mem_reftlens']['peak_rss_delta_mb']:.0f}",
                f"{t['generate']['transformers_s']:.3f} / {t['generate']['reftlens_s']:.3f}",
            ]
        )
    lines.append(
        table(
            [
                "model",
                "forward plain / reftlens",
                "train step floor / reftlens",
                "peak MB floor / reftlens",
                "generate transformers / reftlens",
            ],
            rows,
        )
    )
    lines += [
        "",
        f"patch_sweep (resid_pre, every layer × position) within a budget of {args.sweep_budget_gib} GiB:",
        "",
    ]
    rows = []
    for s in sizes:
        for strategy in args.strategies:
            w = results[s][f"sweep_{strategy}"]
            rows.append(
                [
                    size_label(s, args),
                    strategy,
                    f"{w['row_mb']:.1f}",
                    f"{w['batch_size']} of {w['cells']}",
                    f"{w['budget_mb']:.0f}",
                    f"{w['estimate_mb']:.0f}",
                    f"{w['peak_rss_delta_mb']:.0f}",
                    "yes" if w["within_budget"] else "**no**",
                    f"{w['seconds']:.1f}",
                ]
            )
    lines.append(
        table(
            [
                "model",
                "strategy",
                "est. MB / row",
                "batch_size (rows) of cells",
                "budget MB",
                "estimate MB",
                "peak MB",
                "within",
                "s",
            ],
            rows,
        )
    )
    return "\n".join(lines)


def key(size: str, args) -> str:
    return f"{size}-tiny" if args.tiny else size


def size_label(run: str, args) -> str:
    """A run's row label; a run is ``size`` (float32 base) or ``size@dtype``."""
    size, _, dtype = run.partition("@")
    return LABELS[key(size, args)] + (f", {dtype} base" if dtype else "")


def headlines(results: dict, args) -> None:
    for s, res in results.items():
        label = size_label(s, args)
        for metric, value in ratios(res).items():
            target = MEM_TARGET if "memory" in metric else TIME_TARGET
            headline(
                "scale",
                f"{metric}, {label}",
                value,
                target="" if args.tiny else f"≤ {target:.2f}×",
                met=None if args.tiny else value <= target,
                peer="plain TransformerLens model" if metric.startswith("forward") else "plain transformers",
            )
        for strategy in args.strategies:
            w = res[f"sweep_{strategy}"]
            headline(
                "scale",
                f"patch_sweep ({strategy}) peak memory / stated budget ({args.sweep_budget_gib} GiB), {label}",
                w["peak_rss_delta_mb"] / w["budget_mb"],
                target="" if args.tiny else "≤ 1×",
                met=None if args.tiny else w["within_budget"],
                note=f"batch_size {w['batch_size']} rows of {w['cells']} cells",
            )


# --------------------------------------------------------------------------- main


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny-llama and a scaled-down llama-1b, few reps: a smoke run")
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    ap.add_argument("--strategies", nargs="+", choices=("replay", "batch"), default=["replay", "batch"])
    for name, value in DEFAULTS.items():
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=None,
            help=f"default {value} ({TINY[name]} with --tiny)",
        )
    ap.add_argument(
        "--bf16",
        nargs="*",
        choices=SIZES,
        default=["135m"],
        help="sizes also run with a bfloat16 base (the LoReFT set stays float32, cast=True); default 135m",
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    add_load_argument(ap)
    ap.add_argument("--size", choices=SIZES, help=argparse.SUPPRESS)  # a child: this size's parts
    ap.add_argument("--parts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in DEFAULTS:
        v = getattr(args, name)
        if not (v >= 0 if name == "warmup" else v > 0):
            ap.error(f"--{name.replace('_', '-')} must be {'≥ 0' if name == 'warmup' else 'positive'}; got {v}")
    if args.seq < 12 and not args.tiny:
        ap.error("--seq must be at least 12 (f5+l5 on a prompt of half the sequence)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.size:  # a child process
        out = run_parts(args.size, args.parts.split(","), args)
        Path(args.child_out).write_text(json.dumps(out))
        return 0

    loads = wait_for_load(args.max_load, args.load_tries)
    print(environment_line())
    passed = argv  # a child takes the same arguments (it writes no --out and waits for no load)
    parts = ["time", "mem_reftlens", "mem_floor", *(f"sweep_{s}" for s in args.strategies)]
    t0 = time.perf_counter()
    results: dict = {}
    runs = [(size, "float32") for size in args.sizes] + [(size, "bfloat16") for size in args.bf16]
    for size, dtype in runs:
        run = size if dtype == "float32" else f"{size}@{dtype}"
        argv_run = [*passed, "--dtype", dtype]
        if args.tiny:  # one child per size: quick, so its memory figures are not one arm's alone
            results[run] = child(size, parts, args, argv_run)
        else:  # every part in its own process: each peak RSS is that arm's alone
            results[run] = {}
            for part in parts:
                res = child(size, [part], args, argv_run)
                results[run] = {**res, **results[run], part: res[part]}
    total = time.perf_counter() - t0
    print(report(results, args))
    print(f"\ntotal {total:.0f} s")
    headlines(results, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = dict(
            args={k: v for k, v in vars(args).items() if k not in ("size", "parts", "child_out")},
            machine=machine(),
            versions=versions(),
            load1=loads,
            total_s=total,
            results=results,
            ratios={s: ratios(r) for s, r in results.items()},
        )
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
