"""32 ReFT adapters served by vLLM's multi-LoRA vs reftlens's own (unmerged, hooked) generation.

For a CUDA machine with vLLM installed; anywhere else it prints a `skipped: ...` line and exits 0.

Each adapter is a mergeable LoReFT set on SmolLM2-135M-Instruct (rank 4 on `mlp_out` at layers
3;9;18;24, every position, `bias=False` so that vLLM versions without LoRA biases serve it too),
with its own random weights, converted by `reftlens.save_peft`. Every prompt is assigned one adapter
(prompt i → adapter i mod 32). reftlens generates each adapter's prompts as one batch with the
interventions hooked in (`reft.generate(..., intervene_on="all")`, what the merged weights
compute); vLLM serves all prompts at once, each with its `LoRARequest`. Both decode greedily for
`--new-tokens` tokens (EOS ignored) from the same token ids. Reported: tokens/s of each, and how
many generated tokens agree (position by position, and whole sequences).

    python benchmarks/gpu_vllm_lora.py --adapters 32 --prompts 128 --new-tokens 64
    python benchmarks/gpu_vllm_lora.py --dtype bfloat16      # if this vLLM build refuses float32

Token agreement in float32 should be near total; in bfloat16 the two sides' kernels round
differently and greedy paths may part after a near-tie, so read it as a check, not a target.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def skip_reason() -> str | None:
    """Why this benchmark cannot run here (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (this benchmark is for a GPU machine with vLLM)"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()
    reason = skip_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0

    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment_line, headline, timed

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel

    dtype = getattr(torch, args.dtype)
    bridge = reftlens.load_model("smollm2-135m", device="cuda", dtype=dtype)
    d = bridge.cfg.d_model
    layers = [3, 9, 18, 24]
    work = tempfile.TemporaryDirectory()
    refts, paths = [], []
    for i in range(args.adapters):
        torch.manual_seed(1000 + i)
        phi = LoReFT(d, args.rank, init="random", bias=False)
        with torch.no_grad():  # a visible edit: W moves off R (identity) by a random rank-r map
            phi.W.weight.add_(0.5 * torch.randn_like(phi.W.weight))
        # Φs stay float32 (their QR is float32 work); on a half-precision model they run cast
        reft = ReftModel(bridge, Intervention(phi, layers=layers, hook="mlp_out"), cast=dtype != torch.float32).eval()
        refts.append(reft)
        paths.append(str(reftlens.save_peft(reft, os.path.join(work.name, f"adapter{i}"))))

    questions = [
        "name a colour",
        "what is 2+3",
        "say hello",
        "name a fruit",
        "count to five",
        "name a city",
        "what is the sun",
        "name an animal",
    ]
    prompts = [
        f"<|im_start|>user\nQuestion {i}: {questions[i % len(questions)]}.<|im_end|>\n<|im_start|>assistant\n"
        for i in range(args.prompts)
    ]
    ids = [bridge.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    start = bridge.tokenizer.convert_tokens_to_ids(reftlens.models.SMOLLM2_START)
    ids = [[start, *x] for x in ids]  # reftlens's start token for SmolLM2, on both sides
    owner = [i % args.adapters for i in range(args.prompts)]
    n = args.new_tokens

    # reftlens: one batch per adapter, interventions hooked (unmerged)
    def run_reftlens() -> dict[int, list[int]]:
        out = {}
        for a, reft in enumerate(refts):
            rows = [j for j in range(args.prompts) if owner[j] == a]
            width = max(len(ids[j]) for j in rows)
            pad = reft.pad_token_id
            tokens = torch.tensor([[pad] * (width - len(ids[j])) + ids[j] for j in rows], device="cuda")
            mask = torch.tensor([[0] * (width - len(ids[j])) + [1] * len(ids[j]) for j in rows], device="cuda")
            gen = reft.generate(tokens, n, attention_mask=mask, eos_token_id=None, intervene_on="all")
            for j, row in zip(rows, gen[:, width:].tolist()):
                out[j] = row
        return out

    run_reftlens()  # warm-up
    torch.cuda.synchronize()
    run = timed(lambda: (run_reftlens(), torch.cuda.synchronize())[0])
    ours, reftlens_s = run.result, run.wall

    # vLLM: all prompts at once, one LoRARequest each
    llm = LLM(
        model=str(reftlens.models.smollm2_dir()),
        dtype=args.dtype,
        enable_lora=True,
        max_loras=args.adapters,
        max_lora_rank=max(8, args.rank),
        max_num_seqs=min(256, args.prompts),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=False,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    requests = [LoRARequest(f"reft{a}", a + 1, paths[a]) for a in range(args.adapters)]
    inputs = [{"prompt_token_ids": x} for x in ids]
    loras = [requests[owner[j]] for j in range(args.prompts)]
    llm.generate(inputs, params, lora_request=loras, use_tqdm=False)  # warm-up (loads the adapters)
    run = timed(lambda: llm.generate(inputs, params, lora_request=loras, use_tqdm=False))
    outs, vllm_s = run.result, run.wall
    theirs = {j: list(o.outputs[0].token_ids) for j, o in enumerate(outs)}

    total = args.prompts * n
    same_tokens = sum(a == b for j in range(args.prompts) for a, b in zip(ours[j], theirs[j]))
    same_rows = sum(ours[j] == theirs[j] for j in range(args.prompts))
    first_split = [
        next((k for k, (a, b) in enumerate(zip(ours[j], theirs[j])) if a != b), n) for j in range(args.prompts)
    ]
    print(
        f"# {args.adapters} LoReFT adapters (rank {args.rank}, mlp_out, layers 3;9;18;24, all positions) on "
        f"SmolLM2-135M-Instruct, {args.prompts} prompts, {n} greedy tokens each, {args.dtype}"
    )
    print(environment_line())
    print("| engine | time (s) | tokens/s |")
    print("|---|---|---|")
    print(f"| reftlens generate, hooked, one batch per adapter | {reftlens_s:.2f} | {total / reftlens_s:,.0f} |")
    print(f"| vLLM multi-LoRA, save_peft adapters, one batch | {vllm_s:.2f} | {total / vllm_s:,.0f} |")
    print()
    print(
        f"tokens identical: {same_tokens}/{total} ({same_tokens / total:.3%}); whole sequences identical: "
        f"{same_rows}/{args.prompts}; median first differing position: {sorted(first_split)[len(first_split) // 2]}"
    )
    headline(
        "gpu_vllm_lora",
        "vLLM multi-LoRA tokens/s / reftlens hooked generation tokens/s",
        reftlens_s / vllm_s,
        peer="reftlens generate (unmerged)",
        note=f"{args.adapters} adapters, {args.dtype}",
    )
    headline(
        "gpu_vllm_lora",
        "share of generated tokens identical (vLLM vs reftlens)",
        same_tokens / total,
        target="≈ 1 in float32",
        met=None,
        peer="reftlens generate (unmerged)",
    )
    work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
