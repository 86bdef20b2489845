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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, repeat, wait_for_load

import reftlens
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


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def tl_exact(model, clean, corrupt, metric, hook: str):
    """transformer_lens.patching's exact sweep for ``hook`` (resid_pre / attn_out / mlp_out)."""
    from transformer_lens import patching

    fn = {
        "resid_pre": patching.get_act_patch_resid_pre,
        "attn_out": patching.get_act_patch_attn_out,
        "mlp_out": patching.get_act_patch_mlp_out,
    }[hook]
    _, cache = model.run_with_cache(clean)
    return fn(model, corrupt, cache, lambda logits: metric(logits)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--hooks", nargs="+", default=["resid_pre", "attn_out", "mlp_out"])
    ap.add_argument("--ig-steps", type=int, default=4, help="points on the path for method='attribution-ig'")
    ap.add_argument(
        "--reps", type=int, default=3, help="timed repeats of the attribution sweeps (the exact one runs once)"
    )
    ap.add_argument(
        "--tl-pairs",
        type=int,
        default=1,
        help="pairs on which transformer_lens.patching's exact sweep is also timed (resid_pre; slow)",
    )
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    torch.set_grad_enabled(True)
    model = reftlens.load_model(args.model)
    pairs, skipped = pairs_for(model, args.pairs)
    print("# attribution patching (AtP, and AtP with integrated gradients) vs the exact sweep")
    print(environment_line())
    print(
        f"# attribution-ig: ig_steps={args.ig_steps}; times are medians of {args.reps} runs (exact: one run), model warm"
    )
    if skipped:
        print(f"# skipped (token counts differ, or the answers share a first token): {skipped}")
    if not pairs:
        raise SystemExit(f"no usable pair for {args.model}'s tokenizer; see the skipped list above")
    print("| pair (clean prompt) | hook | layers × positions | exact (s) | AtP (s) | AtP r | AtP-IG (s) | AtP-IG r |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict[str, list[tuple[float, float, float, float, float]]] = {h: [] for h in args.hooks}
    tl_rows = []
    for i, (clean_text, clean, corrupt, a, b) in enumerate(pairs):

        def metric(logits, a=a, b=b):
            return logits[:, -1, a] - logits[:, -1, b]

        for hook in args.hooks:
            patch_sweep(model, clean, corrupt, metric, hook, method="attribution")  # warm up
            t_exact, exact = repeat(lambda: patch_sweep(model, clean, corrupt, metric, hook, batched=True), 1)
            t_atp, atp = repeat(
                lambda: patch_sweep(model, clean, corrupt, metric, hook, method="attribution"), args.reps
            )
            t_ig, ig = repeat(
                lambda: patch_sweep(
                    model, clean, corrupt, metric, hook, method="attribution-ig", ig_steps=args.ig_steps
                ),
                args.reps,
            )
            r_atp, r_ig = pearson(exact.values, atp.values), pearson(exact.values, ig.values)
            summary[hook].append((t_exact, t_atp, r_atp, t_ig, r_ig))
            shape = f"{exact.values.shape[0]} × {exact.values.shape[1]}"
            print(
                f"| {clean_text!r} | {hook} | {shape} | {t_exact:.2f} | {t_atp:.3f} | {r_atp:.3f} | {t_ig:.3f} | "
                f"{r_ig:.3f} |",
                flush=True,
            )
            if hook == "resid_pre" and i < args.tl_pairs:
                with torch.no_grad():
                    t_tl, tl = repeat(lambda: tl_exact(model, clean, corrupt, metric, hook), 1)
                tl_rows.append((clean_text, t_tl, t_exact, t_atp, t_ig, float((tl.cpu() - exact.values).abs().max())))
    print()
    print(
        "| hook | pairs | AtP mean r (min) | AtP-IG mean r (min) | exact (s) | AtP (s) | AtP-IG (s) | "
        "AtP speed-up | AtP-IG speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for hook, rows in summary.items():
        te, ta, ti = (sum(r[k] for r in rows) for k in (0, 1, 3))
        ra, ri = [r[2] for r in rows], [r[4] for r in rows]
        print(
            f"| {hook} | {len(rows)} | {statistics.mean(ra):.3f} ({min(ra):.3f}) | {statistics.mean(ri):.3f} "
            f"({min(ri):.3f}) | {te:.1f} | {ta:.2f} | {ti:.2f} | {te / ta:.1f}× | {te / ti:.1f}× |"
        )
        if hook == "resid_pre":
            for name, rs, t in (("attribution", ra, ta), ("attribution-ig", ri, ti)):
                headline(
                    "attribution_vs_exact",
                    f"Pearson r of method='{name}' with the exact sweep, resid_pre, "
                    f"{args.model}, mean over {len(rows)} factual pairs (min {min(rs):.3f})",
                    statistics.mean(rs),
                    target="≥ 0.9",
                    met=statistics.mean(rs) >= 0.9,
                    peer="patch_sweep(method='exact')",
                )
                headline(
                    "attribution_vs_exact",
                    f"speed-up of method='{name}' over reftlens' exact sweep, resid_pre, {args.model}",
                    te / t,
                    target="≥ 50×",
                    met=te / t >= 50,
                    peer="patch_sweep(method='exact')",
                )
    if tl_rows:
        print()
        print(
            "| pair | transformer_lens.patching exact (s) | reftlens exact (s) | AtP (s) | AtP-IG (s) | "
            "AtP-IG vs TL exact | max |Δ| exact vs TL |"
        )
        print("|---|---|---|---|---|---|---|")
        for text, t_tl, t_exact, t_atp, t_ig, delta in tl_rows:
            print(
                f"| {text!r} | {t_tl:.1f} | {t_exact:.2f} | {t_atp:.3f} | {t_ig:.3f} | {t_tl / t_ig:.0f}× | {delta:.1e} |"
            )
        t_tl, t_ig = sum(r[1] for r in tl_rows), sum(r[4] for r in tl_rows)
        headline(
            "attribution_vs_exact",
            f"speed-up of method='attribution-ig' over transformer_lens.patching's exact "
            f"sweep, resid_pre, {args.model}, {len(tl_rows)} pair(s)",
            t_tl / t_ig,
            target="≥ 50×",
            met=t_tl / t_ig >= 50,
            peer="transformer_lens.patching",
        )


if __name__ == "__main__":
    main()
