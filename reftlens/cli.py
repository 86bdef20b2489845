"""The main job: ``python -m reftlens demo`` trains a LoReFT on SmolLM2-135M-Instruct.

A pyreft-style demo: sixteen questions answered with emoji only (shipped in
``reftlens/data/emoji_instructions.json``), the paper's instruction-tuning setup (LoReFT rank 4,
layers 3;9;18;24, first and last five prompt tokens), a couple of minutes on 2 CPU cores. It
prints held-out generations before and after, saves the interventions and loads them back.
``python -m reftlens tour`` walks through the algebra (patching, DII) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources


def demo_data() -> dict:
    return json.loads(resources.files("reftlens").joinpath("data/emoji_instructions.json").read_text(encoding="utf-8"))


def demo(model_name: str, steps: int, out: str, lr: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel
    from reftlens.training import chat_prompt

    t0 = time.perf_counter()
    model = reftlens.load_model(model_name)
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    print(f"loaded {model_name}: {n_layers} layers, d_model {d} ({time.perf_counter() - t0:.1f} s)")
    layers = [3, 9, 18, 24] if n_layers > 24 else sorted({0, n_layers // 3, (2 * n_layers) // 3, n_layers - 1})
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(d, rank=4), layers=layers, positions="f5+l5"))
    print(f"LoReFT rank 4 at layers {layers}, positions f5+l5 (tied) — {reft.summary()}")

    data = demo_data()
    chat = getattr(model.tokenizer, "chat_template", None) is not None
    prompts = [chat_prompt(model.tokenizer, q) if chat else q for q in data["held_out"]]

    def show(title: str) -> None:
        print(f"\n{title}")
        for q, a in zip(data["held_out"], reft.generate(prompts, max_new_tokens=16)):
            print(f"  {q!r:48} → {a.strip().rstrip(chr(0xFFFD))!r}")  # drop a half-cut emoji

    show("before training (LoReFT starts at the identity: the base model's answers)")
    print(f"\ntraining on {len(data['train'])} emoji-only answers for {steps} steps")
    t0 = time.perf_counter()
    history = reftlens.train(reft, data["train"], chat_template=chat, max_steps=steps, batch_size=16, lr=lr, seed=0)
    took = time.perf_counter() - t0
    print(f"loss {history.losses[0]:.3f} → {history.losses[-1]:.3f} in {took:.0f} s ({took / steps:.2f} s/step)")
    show("after training (held-out questions)")

    path = reft.save(out)
    loaded = ReftModel.load(path, model)
    same = loaded.generate(prompts, max_new_tokens=16) == reft.generate(prompts, max_new_tokens=16)
    print(
        f"\nsaved to {path} ({', '.join(sorted(p.name for p in path.iterdir()))}); reloaded: same generations = {same}"
    )


def tour(model_name: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import reftlens
    from reftlens import DII, Interchange, Intervention, ReftModel

    model = reftlens.load_model(model_name)
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    target = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    print(f"activation patching on {model_name}: clean {clean!r} → corrupted {corrupt!r}, last token, resid_post")
    print(
        f"logit of {model.tokenizer.decode([target])!r} per patched layer (and with a rank-8 DII, a random subspace):"
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            full = ReftModel(model, Intervention(Interchange(), layers=layer, positions="l1"))(
                [corrupt], sources=[clean]
            )
            part = ReftModel(model, Intervention(DII(model.cfg.d_model, 8), layers=layer, positions="l1"))(
                [corrupt], sources=[clean]
            )
            print(
                f"  layer {layer:2d}: interchange {full[0, -1, target]:8.3f}   DII(rank 8) {part[0, -1, target]:8.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="reftlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a LoReFT on SmolLM2-135M-Instruct, generate, save, load")
    p.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (default), tiny-llama, tiny-gpt2 or a local HF folder"
    )
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default="reft-emoji", help="where to save the trained interventions")
    t = sub.add_parser("tour", help="activation patching and DII on a model, layer by layer")
    t.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.model, args.steps, args.out, args.lr)
    else:
        tour(args.model)
    return 0
