"""Activation patching sweep: reftlens.analysis.patch_sweep vs transformer_lens.patching.

The same (layer × position) sweep of resid_pre on the same clean/corrupted prompts, in one run:
TL's get_act_patch_resid_pre (one forward per cell) against reftlens's sweep with each strategy:
"batch" (variants packed into whole forwards) and "replay" (each variant recomputes only the
blocks at and above its layer and the positions from its own on, from a recording of the
corrupted run, and unembeds only the position the metric reads). "auto" (the default) picks
replay from 20M parameters on. Reports wall time, speed-ups and the largest difference from TL.

    python benchmarks/patching_vs_tl.py --models tiny-llama tiny-gpt2 smollm2-135m
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, repeat, wait_for_load
from transformer_lens import patching

import reftlens
from reftlens.analysis import patch_sweep
from reftlens.analysis.activation_patching import REPLAY_MIN_PARAMS

PROMPTS = {
    "smollm2-135m": (
        "The Eiffel Tower is located in the city of",
        "The Colosseum is located in the city of",
        " Paris",
        " Rome",
    ),
}


def pair(model, name):
    if name in PROMPTS:
        clean, corrupt, a, b = PROMPTS[name]
        tc, tr = model.to_tokens(clean), model.to_tokens(corrupt)
        ida = model.tokenizer(a, add_special_tokens=False)["input_ids"][0]
        idb = model.tokenizer(b, add_special_tokens=False)["input_ids"][0]
        if tc.shape == tr.shape:
            return tc, tr, ida, idb
    g = torch.Generator().manual_seed(0)
    tc = torch.randint(5, model.cfg.d_vocab, (1, 10), generator=g)
    tr = tc.clone()
    tr[0, 2] = (tr[0, 2] + 1) % model.cfg.d_vocab
    return tc, tr, 5, 7


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-gpt2", "smollm2-135m"])
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    print("# resid_pre patching sweep")
    print(environment_line())
    print(
        "| model | layers × positions | transformer_lens.patching (s) | reftlens batch (s) | reftlens replay (s) "
        "| speed-up batch | speed-up replay | default | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = reftlens.load_model(name)
        clean, corrupt, a, b = pair(model, name)

        def metric(logits):
            return logits[0, -1, a] - logits[0, -1, b]

        def batched(logits):
            return logits[:, -1, a] - logits[:, -1, b]

        times, values = {}, {}
        with torch.no_grad():
            for strategy in ("batch", "replay"):
                patch_sweep(model, clean, corrupt, batched, batched=True, strategy=strategy)  # warm up
                times[strategy], res = repeat(
                    lambda: patch_sweep(model, clean, corrupt, batched, batched=True, strategy=strategy), budget_s=2.0
                )
                values[strategy] = res.values
            _, cache = model.run_with_cache(clean)  # outside TL's timing (ours includes its clean run)
            t_tl, ref = repeat(lambda: patching.get_act_patch_resid_pre(model, corrupt, cache, metric), budget_s=2.0)
        diff = max((v - ref.float().cpu()).abs().max().item() for v in values.values())
        big = sum(p.numel() for p in model.parameters()) >= REPLAY_MIN_PARAMS
        shape = f"{model.cfg.n_layers} × {clean.shape[1]}"
        default = times["replay" if big else "batch"]
        goal = 14 if name == "smollm2-135m" else 10  # the engine issue's bar for SmolLM2 (the last release's figure)
        headline(
            "patching_vs_tl",
            f"speed-up of patch_sweep (default strategy) over transformer_lens.patching, {name} {shape}",
            t_tl / default,
            target=f"≥ {goal}×",
            met=t_tl / default >= goal and diff < 1e-4,
            peer="transformer_lens.patching",
            note=f"max abs diff {diff:.1e}",
        )
        print(
            f"| {name} | {shape} | {t_tl:.3f} | {times['batch']:.3f} | {times['replay']:.3f} | "
            f"{t_tl / times['batch']:.1f}× | {t_tl / times['replay']:.1f}× | {'replay' if big else 'batch'} | {diff:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
