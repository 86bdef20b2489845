"""Causal tracing (ROME): reftlens.analysis.causal_trace vs a hand-written PyTorch trace on the
plain transformers model, same weights, same tokens, same noise.

The peer is ROME's procedure (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", §2.1) written here in plain PyTorch on ``LlamaForCausalLM`` — no TransformerLens, no
reftlens runtime — and made as fast as a careful hand-written version would be:

- corrupt: ``samples`` copies of the prompt in one batch, Gaussian noise (σ = noise × std of the
  token-embedding entries) added to the subject tokens' embeddings. The noise tensor is drawn
  exactly as reftlens's ``Noise`` Φ draws it (one ``[samples × subject tokens, d_model]`` draw
  from a CPU generator seeded with ``seed``, rows sample-major), so both grids see the same
  corruption and can be compared number for number;
- restore, for every (layer, position) cell: the clean block output of that layer (``resid``),
  or the clean MLP / attention outputs of ROME's window of layers
  ``max(0, i − w//2) … min(L, i + ⌈w/2⌉) − 1`` (``mlp``, ``attn``), at that position, in every
  noisy copy;
- skip what a restoration cannot change: each cell runs only from its first restored layer
  (the corrupted run's hidden states are kept), only on positions from the subject on (the
  earlier positions' keys and values come from the corrupted run's KV cache), and only the
  last position is normed and unembedded. Cells that share their positions run as rows of one
  forward (up to ``--batch-size`` rows); rows whose first layer is higher join the batch there.

``--plain-start cell`` also gives the peer reftlens's last trick (replay each cell only from
its own position on, with the corrupted keys and values of the positions before it), so the
two sides then do the same arithmetic and the ratio is the engine's overhead alone.

Both sides pick the model's own greedy answer; timings include each side's clean and corrupted
runs. Reported per hook: wall time of each side (median over ``--reps``, sides alternating),
reftlens / plain in wall time and in this process's CPU time, and the largest |Δ| between the two
probability grids. On a machine shared with other jobs, wall time swings with their load; with
``--threads 1`` the CPU time is the work done, whatever the load (with 2 threads it also counts
OpenMP threads spinning while their partner waits for a core).

    python benchmarks/causal_trace_vs_rome.py --prompts 1 --samples 10 --window 10 --plain-start subject cell
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import (
    add_load_argument,
    environment,
    environment_line,
    headline,
    interleave,
    load1,
    table,
    wait_for_load,
)
from torch import Tensor

import reftlens
from reftlens.analysis import causal_trace, subject_span

HERE = Path(__file__).resolve().parent
HOOKS = ("resid_post", "mlp_out", "attn_out")

# (prompt, subject): ROME-style factual prompts, the subject at the start or in the middle
PROMPTS = [
    ("The Eiffel Tower is in the city of", "The Eiffel Tower"),
    ("The Space Needle is in downtown", "The Space Needle"),
    ("Michael Jordan played the sport of", "Michael Jordan"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("The Colosseum is located in the city of", "The Colosseum"),
    ("Steve Jobs was the co-founder of", "Steve Jobs"),
]


# ---------------------------------------------------------------------------------------------
# the plain trace


def plain_model(name: str, attn: str):
    """The same weights as ``reftlens.load_model(name)``, as an independent plain transformers model."""
    from transformers import AutoModelForCausalLM

    if name.startswith("tiny-"):
        hf, _ = reftlens.models.tiny_hf_model(name, seed=0)
        hf.set_attn_implementation(attn)
        return hf
    folder = reftlens.models.smollm2_dir() if name in reftlens.models.SMOLLM2_NAMES else Path(name)
    return AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, attn_implementation=attn
    ).eval()


def rome_window(layer: int, hook: str, window: int, n_layers: int) -> range:
    """ROME's restored layers for the cell at ``layer`` (a single layer for the residual stream)."""
    if hook == "resid_post":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(n_layers, layer + math.ceil(window / 2)))


@torch.no_grad()
def plain_trace(
    hf,
    tokens: Tensor,
    span: tuple[int, int],
    *,
    hook: str,
    window: int,
    noise: float,
    samples: int,
    seed: int,
    batch_size: int,
    start_at: str = "subject",
) -> dict:
    """ROME's causal trace on a plain ``LlamaForCausalLM``; ``values[layer, pos]`` as in reftlens."""
    from transformers import DynamicCache

    body, layers = hf.model, hf.model.layers
    L, S = len(layers), tokens.shape[1]
    s0, s1 = span

    # clean run: every layer's input (the block output of the layer below) and module outputs
    inputs: list[Tensor] = []
    mlp_out: dict[int, Tensor] = {}
    attn_out: dict[int, Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0]), with_kwargs=True) for layer in layers
    ]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: inputs.append(out)))
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_out.__setitem__(i, out)))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, out, i=i: attn_out.__setitem__(i, out[0])))
    try:
        clean_logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    clean_in = inputs  # clean_in[k]: input of layer k (k = L: the last block's output)
    clean_mod = mlp_out if hook == "mlp_out" else attn_out
    target = int(clean_logits[0, -1].argmax())

    def p_answer(last_hidden: Tensor, n_cells: int) -> Tensor:
        logits = hf.lm_head(body.norm(last_hidden))
        return logits.float().softmax(-1)[:, target].view(n_cells, samples).mean(1)

    # corrupted run: noise drawn as reftlens's Noise Φ draws it: one [samples·n, d] draw, sample-major
    emb = body.embed_tokens(tokens).expand(samples, -1, -1).clone()
    std = noise * float(body.embed_tokens.weight.float().std())
    eps = torch.randn((samples * (s1 - s0), emb.shape[-1]), generator=torch.Generator().manual_seed(seed))
    emb[:, s0:s1] += (std * eps).view(samples, s1 - s0, -1).to(emb.dtype)
    inputs = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0]), with_kwargs=True) for layer in layers
    ]
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: inputs.append(out)))
    try:
        out = hf(inputs_embeds=emb, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    corr_in = inputs
    cache = out.cache
    corr_kv = [(cache.layers[k].keys, cache.layers[k].values) for k in range(L)]
    corrupted = float(out.logits[:, -1].float().softmax(-1)[:, target].mean())

    # cells, grouped by the first position they must recompute, then by the first layer they change
    values = torch.full((L, S), corrupted)
    groups: dict[int, list[tuple[int, int, int]]] = {}  # start → [(first layer, layer, pos)]
    for pos in range(s0, S):
        for layer in range(L):
            first = layer + 1 if hook == "resid_post" else rome_window(layer, hook, window, L).start
            groups.setdefault(s0 if start_at == "subject" else pos, []).append((first, layer, pos))

    edits: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer → (rows, cols, clean values)

    def restore(module, args, output, k):
        if k in edits:  # in place: the module's output is a fresh tensor
            rows, cols, vals = edits[k]
            (output[0] if isinstance(output, tuple) else output)[rows, cols] = vals

    modules = [(layer.mlp if hook == "mlp_out" else layer.self_attn) for layer in layers]
    handles = (
        []
        if hook == "resid_post"
        else [m.register_forward_hook(lambda mod, a, o, k=k: restore(mod, a, o, k)) for k, m in enumerate(modules)]
    )
    per = max(1, batch_size // samples)
    try:
        for start, cells in groups.items():
            cells.sort()
            width = S - start
            position_ids = torch.arange(start, S).unsqueeze(0)
            # additive causal mask for queries start.. over keys 0..S−1
            mask = torch.full((width, S), torch.finfo(emb.dtype).min).triu(start + 1)[None, None]
            for c0 in range(0, len(cells), per):
                chunk = cells[c0 : c0 + per]
                sample_of_row = torch.arange(samples).repeat(len(chunk))
                kv = DynamicCache(config=hf.config)
                h = None
                for k in range(chunk[0][0], L + 1):
                    joiners = [c for c in chunk if c[0] == k]
                    if joiners:
                        x = corr_in[k][:, start:].repeat(len(joiners), 1, 1)
                        if hook == "resid_post":  # the restored block output enters the next layer
                            for j, (_, _, pos) in enumerate(joiners):
                                x[j * samples : (j + 1) * samples, pos - start] = clean_in[k][0, pos]
                        h = x if h is None else torch.cat([h, x])
                    if k == L or h is None:
                        continue
                    n = h.shape[0]
                    if hook != "resid_post":
                        rows, cols, vals = [], [], []
                        for c, (_, layer, pos) in enumerate(chunk[: n // samples]):
                            if k in rome_window(layer, hook, window, L):
                                rows.append(torch.arange(c * samples, (c + 1) * samples))
                                cols += [pos - start] * samples
                                vals.append(clean_mod[k][0, pos].expand(samples, -1))
                        if rows:
                            edits[k] = (torch.cat(rows), torch.tensor(cols), torch.cat(vals))
                        else:
                            edits.pop(k, None)
                    if start:
                        pk, pv = corr_kv[k]
                        rows_k = sample_of_row[:n]
                        kv.update(pk[rows_k, :, :start], pv[rows_k, :, :start], k)
                    pe = body.rotary_emb(h, position_ids=position_ids)
                    h = layers[k](
                        h,
                        attention_mask=mask,
                        position_ids=position_ids,
                        cache=kv if start else None,
                        position_embeddings=pe,
                    )
                probs = p_answer(h[:, -1], len(chunk))
                for (_, layer, pos), p in zip(chunk, probs):
                    values[layer, pos] = p
                edits.clear()
    finally:
        for h in handles:
            h.remove()
    clean = float(clean_logits[0, -1].float().softmax(-1)[target])
    return {"values": values, "clean": clean, "corrupted": corrupted, "answer_id": target}


# ---------------------------------------------------------------------------------------------
# the benchmark


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or tiny-llama for a smoke run")
    ap.add_argument("--prompts", type=int, default=3, help=f"how many of the {len(PROMPTS)} factual prompts")
    ap.add_argument("--samples", type=int, default=10, help="noise samples (ROME: 10)")
    ap.add_argument("--window", type=int, default=10, help="mlp/attn restoration window (ROME: 10)")
    ap.add_argument("--noise", type=float, default=3.0, help="noise σ in embedding stds (ROME: 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1, help="timed runs of each side (alternating), median reported")
    ap.add_argument("--batch-size", type=int, default=256, help="rows per forward, both sides (reftlens's default)")
    ap.add_argument("--hooks", nargs="+", default=list(HOOKS), choices=HOOKS)
    ap.add_argument(
        "--plain-attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="attention kernel of the plain model (transformers' default: sdpa)",
    )
    ap.add_argument(
        "--plain-start",
        nargs="+",
        default=["subject"],
        choices=["subject", "cell"],
        help="positions the plain trace recomputes: from the subject on (the ROME baseline) and/or "
        "from each cell's position on (reftlens's algorithm)",
    )
    ap.add_argument("--threads", type=int, default=2)
    add_load_argument(ap)
    ap.add_argument("--out", default=str(HERE.parent / ".bench" / "causal_trace_vs_rome.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = reftlens.load_model(args.model)
    hf = plain_model(args.model, args.plain_attn)
    prompts = PROMPTS[: args.prompts]
    arms = ["reftlens"] + [f"plain:{s}" for s in args.plain_start]
    cfg = dict(window=args.window, noise=args.noise, samples=args.samples, seed=args.seed)

    def run(arm: str, hook: str, prompt: str, subject: str):
        if arm == "reftlens":
            res = causal_trace(model, prompt, subject, hook=hook, batch_size=args.batch_size, **cfg)
            return {"values": res.values, "clean": res.clean, "corrupted": res.corrupted, "answer_id": res.answer_id}
        tokens, span = subject_span(model, prompt, subject)  # reftlens's tokens (start token included)
        return plain_trace(hf, tokens, span, hook=hook, batch_size=args.batch_size, start_at=arm.split(":")[1], **cfg)

    # warm-up: one cheap trace (1 sample) per arm, so no side's first-call costs land in a timing
    warm = dict(cfg, samples=1)
    causal_trace(model, *prompts[0], hook="resid_post", batch_size=args.batch_size, **warm)
    tokens, span = subject_span(model, *prompts[0])
    for arm in arms[1:]:
        plain_trace(hf, tokens, span, hook="resid_post", batch_size=args.batch_size, start_at=arm.split(":")[1], **warm)

    load = wait_for_load(args.max_load, args.load_tries)
    print(
        f"# causal trace (ROME) on {args.model}: reftlens.analysis.causal_trace vs a hand-written PyTorch trace on "
        f"the plain transformers model ({args.plain_attn} attention)"
    )
    print(environment_line())
    print(
        f"# {len(prompts)} prompt(s), samples {args.samples}, window {args.window}, noise {args.noise}, "
        f"batch {args.batch_size} rows, reps {args.reps}; 1-min load before: {load[-1]:.2f}"
    )
    results = []
    for hook in args.hooks:
        times = {a: [] for a in arms}
        cpu = {a: [] for a in arms}
        diffs = {a: 0.0 for a in arms[1:]}
        per_prompt = []
        for prompt, subject in prompts:
            rows = {}
            # CPU time counts every thread's work and not the time other jobs hold the cores, so it stays
            # comparable on a busy machine
            r = interleave(
                {arm: functools.partial(run, arm, hook, prompt, subject) for arm in arms}, args.reps, keep="last"
            )
            for arm in arms:
                times[arm] += [(prompt, t) for t in r.times[arm]]
                cpu[arm] += [(prompt, c) for c in r.cpu[arm]]
                rows[arm] = r.results[arm][-1]
            ref = rows["reftlens"]
            entry = {
                "prompt": prompt,
                "subject": subject,
                "answer": model.tokenizer.decode([ref["answer_id"]]),
                "clean": ref["clean"],
                "corrupted": ref["corrupted"],
                "grid": list(ref["values"].shape),
            }
            for arm in arms[1:]:
                if rows[arm]["answer_id"] != ref["answer_id"]:
                    raise SystemExit(f"{arm} and reftlens pick different answers for {prompt!r}")
                d = float((rows[arm]["values"] - ref["values"]).abs().max())
                diffs[arm] = max(diffs[arm], d)
                entry[f"max_abs_diff[{arm}]"] = d
                entry[f"corrupted_diff[{arm}]"] = abs(rows[arm]["corrupted"] - ref["corrupted"])
            per_prompt.append(entry)

        # per prompt: median over reps; per hook: the sum over prompts
        def summed(ts):
            return {a: sum(statistics.median(t for p, t in ts[a] if p == q) for q, _ in prompts) for a in arms}

        total, total_cpu = summed(times), summed(cpu)
        results.append(
            {
                "hook": hook,
                "seconds": total,
                "cpu_seconds": total_cpu,
                "max_abs_diff": diffs,
                "prompts": per_prompt,
                "raw_seconds": {a: [t for _, t in times[a]] for a in arms},
                "raw_cpu_seconds": {a: [t for _, t in cpu[a]] for a in arms},
            }
        )
        print(
            f"# {hook}: " + ", ".join(f"{a} {total[a]:.2f} s ({total_cpu[a]:.2f} CPU s)" for a in arms),
            file=sys.stderr,
            flush=True,
        )
    load_after = load1()

    short = [a.split(":")[1] for a in arms[1:]]
    head = ["hook", "cells (layers × positions)", "reftlens (s)"] + [f"plain, from {a} (s)" for a in short]
    head += [f"reftlens / plain ({a})" for a in short] + [f"same, CPU time ({a})" for a in short]
    head += [f"max abs Δ ({a})" for a in short]
    lines = []
    for r in results:
        sec, cs = r["seconds"], r["cpu_seconds"]
        shapes = ", ".join(f"{g['grid'][0]} × {g['grid'][1]}" for g in r["prompts"])
        cells = [r["hook"], shapes, f"{sec['reftlens']:.2f}"] + [f"{sec[a]:.2f}" for a in arms[1:]]
        cells += [f"{sec['reftlens'] / sec[a]:.2f}×" for a in arms[1:]]
        cells += [f"{cs['reftlens'] / cs[a]:.2f}×" for a in arms[1:]]
        cells += [f"{r['max_abs_diff'][a]:.1e}" for a in arms[1:]]
        lines.append(cells)
    print(table(head, lines))
    print(
        f"# 1-min load average: {load[-1]:.2f} before, {load_after:.2f} after "
        f"(2 cores: above ~2 means another job shared the CPUs)"
    )
    for r in results:
        for a in arms[1:]:
            ratio = r["seconds"]["reftlens"] / r["seconds"][a]
            headline(
                "causal_trace_vs_rome",
                f"causal_trace time: reftlens / plain PyTorch ROME trace (from {a.split(':')[1]}), {args.model} "
                f"{r['hook']}, {len(prompts)} prompt(s), {args.samples} samples",
                ratio,
                target="≤ 1.0×",
                met=ratio <= 1.0 and r["max_abs_diff"][a] < 1e-4,
                peer="plain PyTorch ROME trace on transformers",
                note=f"max abs Δ {r['max_abs_diff'][a]:.1e}; CPU-time ratio "
                f"{r['cpu_seconds']['reftlens'] / r['cpu_seconds'][a]:.2f}",
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "causal_trace_vs_rome",
                "command": " ".join(["python", *sys.argv]),
                "args": vars(args),
                "env": environment(),
                "reftlens_path": str(Path(reftlens.__file__).parent),
                "load1_before": load,
                "load1_after": load_after,
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"# wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
