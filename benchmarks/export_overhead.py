"""Exported model vs plain transformers on SmolLM2-135M-Instruct: forward 8 × 128 and greedy
generation of 32 tokens (KV cache), with the LoReFT set of the paper's instruction setup
(rank 4, layers 3;9;18;24, f5+l5). Runs alternate; ratios are medians of per-pair ratios.

Two exported models, each against the plain model whose weights live in the same kind of
memory (on this CPU, decoding from an in-memory copy of the weights measured ~3% slower than
from the memory-mapped safetensors that `from_pretrained` gives, with or without reftlens):

- deployed: `save_hf` then `load_hf` (memory-mapped, as a user loads it) vs plain `from_pretrained`;
- in memory: `to_hf(reft)` vs a deep copy of the plain model.

    python benchmarks/export_overhead.py --reps 16
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, side_by_side, wait_for_load

import reftlens
from reftlens import Intervention, LoReFT, ReftModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    from transformers import AutoModelForCausalLM

    bridge = reftlens.load_model("smollm2-135m")
    torch.manual_seed(0)
    reft = ReftModel(bridge, Intervention(LoReFT(576, 4, init="random"), layers=[3, 9, 18, 24], positions="f5+l5"))
    exported = reftlens.to_hf(reft)
    plain = AutoModelForCausalLM.from_pretrained(reftlens.models.smollm2_dir(), dtype=torch.float32).eval()
    plain.config._attn_implementation = exported.config._attn_implementation  # same attention kernel on both sides
    in_memory = copy.deepcopy(plain)
    tmp = tempfile.TemporaryDirectory()
    reftlens.save_hf(exported, tmp.name, tokenizer=bridge.tokenizer)
    deployed = reftlens.load_hf(tmp.name)
    deployed.config._attn_implementation = exported.config._attn_implementation
    tok = bridge.tokenizer
    g = torch.Generator().manual_seed(0)
    fwd = torch.randint(20, 49152, (8, 128), generator=g)
    prompts = [f"<|im_start|>user\nQuestion {i}: name a colour.<|im_end|>\n<|im_start|>assistant\n" for i in range(8)]
    tokens, mask = reft.tokenize(prompts)
    kw = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    rows = []
    with torch.no_grad():
        assert torch.equal(deployed.generate(tokens, **kw), exported.generate(tokens, **kw))  # the same model
        for label, base, model in (
            ("deployed (save_hf → load_hf) vs plain from_pretrained", plain, deployed),
            ("in memory (to_hf) vs in-memory plain copy", in_memory, exported),
        ):
            c = side_by_side(lambda: base(fwd), lambda: model(fwd), args.reps, warmup=2)  # noqa: B023
            rows.append((f"forward 8 × 128, {label}", c))
            gen = lambda m: m.generate(tokens, **kw)  # noqa: E731
            c = side_by_side(lambda: gen(base), lambda: gen(model), max(3, args.reps // 2), warmup=1)  # noqa: B023
            rows.append((f"greedy generation, 32 tokens, batch 8, {label}", c))
    tmp.cleanup()
    print("# exported LoReFT set vs plain transformers, SmolLM2-135M-Instruct, fp32")
    print(environment_line())
    print("| what | plain HF (s) | exported with LoReFT (s) | median paired ratio |")
    print("|---|---|---|---|")
    for name, c in rows:
        print(f"| {name} | {c.base_s:.3f} | {c.other_s:.3f} | {c.paired:.3f} |")
        headline(
            "export_overhead",
            f"to_hf model / plain transformers, {name}",
            c.paired,
            target="≤ 1.02×",
            met=c.paired <= 1.02,
            peer="plain transformers",
        )


if __name__ == "__main__":
    main()
