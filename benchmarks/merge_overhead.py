"""A merged ReFT model costs what the plain model costs: `reftlens.merge` vs plain transformers on
SmolLM2-135M-Instruct, beside the hooked export (`to_hf`) of the same interventions.

The mergeable recipe: LoReFT rank 4 on `mlp_out` at layers 3;9;18;24, every position. Merged
twice: with the learned shift b (the fold adds a bias to `down_proj`, so `mlp_bias` is switched on:
zero biases on every MLP projection) and with `bias=False` (the plain model's exact layout). Each
against an in-memory copy of the plain model (same kind of memory; see export_overhead.py), forward
8 × 128 and greedy generation of 32 tokens (KV cache), runs alternating (the order within a pair
too); ratios are medians of per-pair ratios. A control row times the plain model against its own
deep copy: the noise floor of the run. Also: the time `merge` takes, and max |Δlogits| merged vs
hooked.

    python benchmarks/merge_overhead.py --reps 8
    python benchmarks/merge_overhead.py --reps 6 --clock cpu --threads 1   # on a machine busy with other work
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, side_by_side, wait_for_load

import reftlens
from reftlens import Intervention, LoReFT, ReftModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (time.process_time), steadier on a machine shared with other work",
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 keeps a busy machine's other work out of the timings",
    )
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    if args.threads:
        torch.set_num_threads(args.threads)

    def paired(f, g):  # the order within a pair alternates
        return side_by_side(f, g, args.reps, clock=args.clock)

    from transformers import AutoModelForCausalLM

    bridge = reftlens.load_model("smollm2-135m")
    tok = bridge.tokenizer
    plain = AutoModelForCausalLM.from_pretrained(reftlens.models.smollm2_dir(), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    fwd = torch.randint(20, 49152, (8, 128), generator=g)
    prompts = [f"<|im_start|>user\nQuestion {i}: name a colour.<|im_end|>\n<|im_start|>assistant\n" for i in range(8)]
    rows, checks = [], []
    for label, bias in (("with shift b (mlp_bias on)", True), ("bias=False", False)):
        torch.manual_seed(0)
        reft = ReftModel(
            bridge, Intervention(LoReFT(576, 4, init="random", bias=bias), layers=[3, 9, 18, 24], hook="mlp_out")
        ).eval()
        t = time.perf_counter()
        merged = reftlens.merge(reft)
        merge_s = time.perf_counter() - t
        base = copy.deepcopy(plain)
        base.config._attn_implementation = merged.config._attn_implementation  # same attention kernel
        tokens, mask = reft.tokenize(prompts)
        with torch.no_grad():
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            hooked = reft(tokens, attention_mask=mask)
            err = (
                (merged(input_ids=tokens, attention_mask=mask, position_ids=pos).logits - hooked)[mask.bool()]
                .abs()
                .max()
            )
            checks.append(
                (
                    label,
                    merge_s,
                    float(err),
                    sum(p.numel() for p in merged.parameters()) - sum(p.numel() for p in base.parameters()),
                )
            )
            kw = dict(
                attention_mask=mask,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=None,
            )
            for _ in range(2):
                base(fwd)
                merged(fwd)
            rows.append(
                (f"forward 8 × 128, merged {label}", paired(lambda: base(fwd), lambda: merged(fwd)))  # noqa: F821
            )
            base.generate(tokens, **kw)
            merged.generate(tokens, **kw)
            rows.append(
                (
                    f"greedy generation, {args.new_tokens} tokens, batch 8, merged {label}",
                    paired(lambda: base.generate(tokens, **kw), lambda: merged.generate(tokens, **kw)),  # noqa: F821
                )
            )
        if not bias:  # the hooked export of the same set, and the plain model against its own copy: the noise floor
            hooked_hf = reftlens.to_hf(reft, intervene_on="all")
            twin = copy.deepcopy(base)
            with torch.no_grad():
                hooked_hf(fwd)
                base(fwd)
                rows.append(
                    (
                        "forward 8 × 128, hooked to_hf (same set) for contrast",
                        paired(lambda: base(fwd), lambda: hooked_hf(fwd)),  # noqa: F821
                    )
                )
                rows.append(
                    (
                        f"greedy generation, {args.new_tokens} tokens, batch 8, control: plain vs its own deep copy",
                        paired(lambda: base.generate(tokens, **kw), lambda: twin.generate(tokens, **kw)),  # noqa: F821
                    )
                )
            del hooked_hf, twin
        del base, merged
    print(
        "# merged LoReFT (mlp_out, all positions) vs plain transformers, SmolLM2-135M-Instruct, fp32, "
        f"{args.clock} clock"
    )
    print(environment_line())
    print("| what | plain HF (s) | merged (s) | median paired ratio |")
    print("|---|---|---|---|")
    for name, c in rows:
        print(f"| {name} | {c.base_s:.3f} | {c.other_s:.3f} | {c.paired:.3f} |")
    print()
    print("| merge | time (s) | max abs Δlogits vs hooked path | extra parameters |")
    print("|---|---|---|---|")
    for label, s, err, extra in checks:
        print(f"| {label} | {s:.2f} | {err:.2e} | {extra:,} |")
    for name, c in rows:
        if "merged" in name:
            headline(
                "merge_overhead",
                f"merged model / plain transformers, {name}",
                c.paired,
                target="≤ 1.02×",
                met=c.paired <= 1.02,
                peer="plain transformers",
            )


if __name__ == "__main__":
    main()
