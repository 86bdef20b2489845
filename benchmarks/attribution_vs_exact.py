"""Attribution patching vs the exact sweep: how well the gradient approximation ranks cells, and
how much faster it is, on SmolLM2 factual-recall pairs.

For each clean/corrupted pair (same subject slot, different subject: "The Eiffel Tower ..." vs
"The Colosseum ...") and each hook, ``patch_sweep(method="exact")`` patches every
(layer × position) cell and runs it (the default strategy: replay on SmolLM2), and
``patch_sweep(method="attribution")`` estimates every cell from one clean forward, one corrupted
forward and one backward: (clean − corrupted) · ∂metric/∂activation (Nanda 2023; Kramár et al.
2024, AtP). The metric is the logit difference between the clean and the corrupted answer at
the last position. Reported per pair and hook: the Pearson correlation of the two grids over
all cells, the time of each method (median of repeats, the model warm) and the speed-up.

    python benchmarks/attribution_vs_exact.py                       # SmolLM2, 4 pairs, resid_pre attn_out mlp_out
    python benchmarks/attribution_vs_exact.py --model tiny-llama --hooks resid_pre   # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import reftlens
from common import environment_line, headline
from reftlens.analysis import patch_sweep

# clean prompt, corrupted prompt, clean answer, corrupted answer
PAIRS = [
    ("The Eiffel Tower is located in the city of", "The Colosseum is located in the city of", " Paris", " Rome"),
    ("The capital of France is the city of", "The capital of Japan is the city of", " Paris", " Tokyo"),
    ("Michael Jordan played the sport of", "Tiger Woods played the sport of", " basketball", " golf"),
    ("The Great Wall is located in the country of", "The Taj Mahal is located in the country of", " China", " India"),
    ("The official language of Germany is", "The official language of Spain is", " German", " Spanish"),
]


def first_id(model, text: str) -> int:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"][0]


def pairs_for(model, n: int):
    """The first ``n`` pairs whose clean and corrupted prompts have the same number of tokens and
    whose answers start with different tokens."""
    out, skipped = [], []
    for clean, corrupt, a, b in PAIRS:
        tc, tr = model.to_tokens(clean), model.to_tokens(corrupt)
        ida, idb = first_id(model, a), first_id(model, b)
        if tc.shape != tr.shape or ida == idb:
            skipped.append(clean)
            continue
        out.append((clean, tc, tr, ida, idb))
        if len(out) == n:
            break
    return out, skipped


def timed(fn, reps: int):
    """(median seconds over ``reps`` runs, last result)."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--hooks", nargs="+", default=["resid_pre", "attn_out", "mlp_out"])
    ap.add_argument("--reps", type=int, default=3, help="timed repeats of the attribution sweep (the exact one runs once)")
    args = ap.parse_args()
    model = reftlens.load_model(args.model)
    pairs, skipped = pairs_for(model, args.pairs)
    print("# attribution patching vs the exact sweep")
    print(environment_line())
    if skipped:
        print(f"# skipped (token counts differ, or the answers share a first token): {skipped}")
    print("| pair (clean prompt) | hook | layers × positions | exact (s) | attribution (s) | speed-up | Pearson r |")
    print("|---|---|---|---|---|---|---|")
    summary: dict[str, list[tuple[float, float, float]]] = {h: [] for h in args.hooks}
    for clean_text, clean, corrupt, a, b in pairs:

        def metric(logits, a=a, b=b):
            return logits[:, -1, a] - logits[:, -1, b]

        for hook in args.hooks:
            patch_sweep(model, clean, corrupt, metric, hook, method="attribution")  # warm up
            t_exact, exact = timed(lambda: patch_sweep(model, clean, corrupt, metric, hook, batched=True), 1)
            t_attr, attr = timed(lambda: patch_sweep(model, clean, corrupt, metric, hook, method="attribution"),
                                 args.reps)
            r = pearson(exact.values, attr.values)
            summary[hook].append((t_exact, t_attr, r))
            shape = f"{exact.values.shape[0]} × {exact.values.shape[1]}"
            print(f"| {clean_text!r} | {hook} | {shape} | {t_exact:.2f} | {t_attr:.3f} | {t_exact / t_attr:.0f}× | {r:.3f} |",
                  flush=True)
    print()
    print("| hook | pairs | mean Pearson r | min Pearson r | total exact (s) | total attribution (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for hook, rows in summary.items():
        te, ta = sum(r[0] for r in rows), sum(r[1] for r in rows)
        rs = [r[2] for r in rows]
        print(f"| {hook} | {len(rows)} | {statistics.mean(rs):.3f} | {min(rs):.3f} | {te:.1f} | {ta:.2f} | {te / ta:.0f}× |")
        if hook == "resid_pre":
            headline("attribution_vs_exact", f"Pearson r of attribution with the exact sweep, resid_pre, {args.model}, "
                     f"mean over {len(rows)} factual pairs (min {min(rs):.3f})", statistics.mean(rs),
                     target="≥ 0.9", met=statistics.mean(rs) >= 0.9, peer="patch_sweep(method='exact')")
            headline("attribution_vs_exact", f"speed-up of attribution over the exact sweep, resid_pre, {args.model}",
                     te / ta, target="≥ 50×", met=te / ta >= 50, peer="patch_sweep(method='exact')")


if __name__ == "__main__":
    main()
