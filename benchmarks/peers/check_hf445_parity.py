"""Check that transformers 4.45.1 (pyreft's venv) reads the converted SmolLM2 folder exactly as
transformers 5.x (reftlens' environment) reads the original one.

Two steps, one per environment; the expected values travel in one .npz file:

    # 1. main environment (system python, transformers 5.x): record what 5.x computes
    python3 benchmarks/peers/check_hf445_parity.py expect OUT.npz [--model-dir SRC]
    # 2. pyreft venv (transformers 4.45.1): compare against the converted folder
    $PYREFT_VENV/bin/python benchmarks/peers/check_hf445_parity.py check OUT.npz --model-dir DIR

Compared: token ids of plain prompts and of chat-template prompts, the full logits (every
position, every vocab entry, fp32) of each prompt unpadded, and 16 greedy tokens. Prints one
JSON line; exits 1 if ids differ or the logits differ by more than --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "Michael Jordan played the sport of",
    "def fibonacci(n):",
    "In 1969, the first person to walk on the Moon was",
]
CHATS = ["What is 2+3?", "Name three colours of the rainbow."]


def compute(model_dir: str) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    # transformers 5.x renamed torch_dtype to dtype; 4.45 only knows torch_dtype.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_kw: torch.float32}).eval()
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = tok(p, return_tensors="pt")
            out[f"ids{i}"] = ids["input_ids"][0].numpy()
            out[f"logits{i}"] = model(**ids).logits[0].float().numpy()
        for i, c in enumerate(CHATS):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": c}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out[f"chat_ids{i}"] = ids["input_ids"][0].numpy()
            gen = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
            out[f"chat_gen{i}"] = gen[0, ids["input_ids"].shape[1] :].numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["expect", "check"])
    ap.add_argument("file")
    ap.add_argument("--model-dir", default=None, help="expect: default reftlens' smollm2_dir()")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)

    if args.mode == "expect":
        model_dir = args.model_dir
        if model_dir is None:
            from reftlens.models import smollm2_dir

            model_dir = str(smollm2_dir())
        np.savez_compressed(args.file, transformers_version=np.array(transformers.__version__), **compute(model_dir))
        print(json.dumps({"wrote": args.file, "transformers": transformers.__version__, "model_dir": model_dir}))
        return

    if args.model_dir is None:
        ap.error("check needs --model-dir (the converted folder)")
    exp = np.load(args.file)
    got = compute(args.model_dir)
    ids_equal = all(np.array_equal(exp[k], got[k]) for k in got if "ids" in k)
    gen_equal = all(np.array_equal(exp[k], got[k]) for k in got if "gen" in k)
    # Only compare logits when the tokens agree (else the shapes may differ).
    diffs = (
        [float(np.abs(exp[k] - got[k]).max()) for k in got if k.startswith("logits")] if ids_equal else [float("inf")]
    )
    report = dict(
        expected_transformers=str(exp["transformers_version"]),
        transformers=transformers.__version__,
        token_ids_equal=ids_equal,
        greedy_equal=gen_equal,
        max_abs_logit_diff=max(diffs),
        per_prompt_max_abs_diff=diffs,
        n_logits=int(sum(got[k].size for k in got if k.startswith("logits"))),
    )
    print(json.dumps(report))
    sys.exit(0 if ids_equal and gen_equal and max(diffs) <= args.tol else 1)


if __name__ == "__main__":
    main()
