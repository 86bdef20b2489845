"""``python -m reftlens demo``: the main job, a tour of the algebra on a built-in model."""

from __future__ import annotations

import argparse
import os
import time


def demo(model_name: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import reftlens
    from reftlens import Interchange, Intervention, LoReFT, ReftModel

    t0 = time.perf_counter()
    model = reftlens.load_model(model_name)
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    print(f"loaded {model_name}: {n_layers} layers, d_model {d} ({time.perf_counter() - t0:.1f} s)")

    prompts = ["The capital of France is", "The quick brown fox jumps over the"]
    layers = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(d, rank=4), layers=layers, positions="f2+l2"))
    tokens, mask = reft.tokenize(prompts)
    with torch.no_grad():
        base = model(tokens, attention_mask=mask)
        start = reft(tokens, attention_mask=mask)
        print(f"LoReFT rank 4 at layers {layers}, positions f2+l2: {reft.num_trainable_parameters()} parameters")
        print(f"  identity at init: max |Δlogits| = {(start - base).abs().max():.2e}")
        for phi in reft.phis:
            phi.W.bias.normal_(std=1.0)
        moved = reft(tokens, attention_mask=mask)
        print(f"  after perturbing b: max |Δlogits| = {(moved - base).abs().max():.2e}")

    clean, corrupt = "The capital of France is", "The capital of Italy is"
    tok = model.tokenizer
    target = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    print(f"\nactivation patching, clean → corrupted, last token, resid_post: logit of {tok.decode([target])!r}")
    with torch.no_grad():
        for layer in range(n_layers):
            patch = ReftModel(model, Intervention(Interchange(), layers=layer, positions="l1"))
            logit = patch([corrupt], sources=[clean])[0, -1, target].item()
            print(f"  layer {layer:2d}: {logit:8.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reftlens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="a tour of the intervention algebra on a built-in model")
    p.add_argument("--model", default="tiny-llama", help="tiny-llama, tiny-gpt2, smollm2-135m or a local HF folder")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.model)
    return 0
