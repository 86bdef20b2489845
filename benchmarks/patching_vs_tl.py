"""Activation patching sweep: reftlens.analysis.patch_sweep vs transformer_lens.patching.

The same (layer × position) sweep of resid_pre on the same clean/corrupted prompts, in one run:
TL's get_act_patch_resid_pre (one forward per cell) against reftlens's batched sweep (one
forward per position over all layers, reusing the corrupted run's KV cache for the prefix).
Reports wall time, the speed-up and the largest difference between the two results.

    python benchmarks/patching_vs_tl.py --models tiny-llama tiny-gpt2 smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens import patching

import reftlens
from reftlens.analysis import patch_sweep

PROMPTS = {
    "smollm2-135m": ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
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
    args = ap.parse_args()
    print(f"# resid_pre patching sweep, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformer-lens {__import__('importlib.metadata').metadata.version('transformer-lens')}")
    print("| model | layers × positions | transformer_lens.patching (s) | reftlens patch_sweep (s) | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = reftlens.load_model(name)
        clean, corrupt, a, b = pair(model, name)

        def metric(logits):
            return logits[0, -1, a] - logits[0, -1, b]

        def batched(logits):
            return logits[:, -1, a] - logits[:, -1, b]

        with torch.no_grad():
            patch_sweep(model, clean, corrupt, batched, batched=True)  # warm up
            t = time.perf_counter()
            ours = patch_sweep(model, clean, corrupt, batched, batched=True)
            t_ours = time.perf_counter() - t
            _, cache = model.run_with_cache(clean)
            t = time.perf_counter()
            ref = patching.get_act_patch_resid_pre(model, corrupt, cache, metric)
            t_tl = time.perf_counter() - t
        diff = (ours.values - ref.float().cpu()).abs().max().item()
        shape = f"{model.cfg.n_layers} × {clean.shape[1]}"
        print(f"| {name} | {shape} | {t_tl:.2f} | {t_ours:.2f} | {t_tl / t_ours:.1f}× | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
