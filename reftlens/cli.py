"""The main job: ``python -m reftlens demo`` trains a LoReFT on SmolLM2-135M-Instruct.

``demo``: a pyreft-style job. Sixteen questions answered with emoji only (shipped in
``reftlens/data/emoji_instructions.json``) teach the model an answer style with the paper's
instruction-tuning setup (LoReFT rank 4, layers 3;9;18;24, first and last five prompt tokens).
It prints held-out answers before and after, saves the interventions and loads them back.
``tour``: activation patching and a DII on one prompt pair, layer by layer (no training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib import resources

DEMO_STEPS, DEMO_BATCH, DEMO_LR = 12, 8, 2e-2
DEMO_HELP = f"""Teach a model to answer in emoji from sixteen examples, with a LoReFT (rank 4, layers 3;9;18;24
of SmolLM2, positions f5+l5): print three held-out answers before and after training, save the
trained interventions to --out and load them back (the reloaded set must generate the same
answers). Defaults: {DEMO_STEPS} steps of {DEMO_BATCH} examples at lr {DEMO_LR:g}. Prompts use the chat
template without its default system prompt (shorter steps, and the first five positions land on
the user's turn). Timings: see README.md (each with its CPU)."""
TOUR_HELP = """Activation patching on one prompt pair ("The capital of France is" / "... Italy is"): for every
layer, the logit of " Paris" when the clean run's last-token resid_post replaces the corrupted
run's (Interchange), and when only a random rank-8 subspace of it does (DII). No training."""


def demo_data() -> dict:
    return json.loads(resources.files("reftlens").joinpath("data/emoji_instructions.json").read_text(encoding="utf-8"))


def demo_prompt(tokenizer, question: str) -> str:
    """``question`` as a chat prompt (when the tokenizer has a chat template), without the
    template's default system turn: SmolLM2's adds ~20 tokens to every example (40% of a training
    step) and would put the first five edited positions on that fixed system text."""
    from reftlens.training import chat_prompt

    if getattr(tokenizer, "chat_template", None) is None:
        return question
    text = chat_prompt(tokenizer, question)
    user = text.find("<|im_start|>user")  # ChatML (SmolLM2, Qwen): drop the turns before the user's
    return text[user:] if user > 0 else text


def busy_hint(load: float, cores: int, threads: int) -> str | None:
    """A line for a machine busier than its cores while torch runs several threads: they then wait
    for each other (measured here: ~20 CPU-s per demo step with 2 threads on a busy 2-core machine,
    1.55 with one), so one thread is faster."""
    if threads > 1 and load > cores:
        return (
            f"note: load average {load:.1f} on {cores} cores — on a busy machine torch's {threads} threads wait "
            "for each other; `OMP_NUM_THREADS=1` (or `taskset -c 0`) runs this job faster"
        )
    return None


def demo(model_name: str, steps: int, out: str, lr: float, batch_size: int = DEMO_BATCH) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel

    start = t0 = time.perf_counter()
    hint = (
        busy_hint(os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads())
        if hasattr(os, "getloadavg")
        else None
    )
    if hint:
        print(hint)
    model = reftlens.load_model(model_name)
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    print(f"loaded {model_name}: {n_layers} layers, d_model {d} ({time.perf_counter() - t0:.1f} s)")
    layers = [3, 9, 18, 24] if n_layers > 24 else sorted({0, n_layers // 3, (2 * n_layers) // 3, n_layers - 1})
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(d, rank=4), layers=layers, positions="f5+l5"))
    print(f"LoReFT rank 4 at layers {layers}, positions f5+l5 (tied) — {reft.summary()}")

    data = demo_data()
    train_rows = [
        {"prompt": demo_prompt(model.tokenizer, r["prompt"]), "completion": r["completion"]} for r in data["train"]
    ]
    prompts = [demo_prompt(model.tokenizer, q) for q in data["held_out"]]

    def show(title: str, answers: list[str]) -> None:
        print(f"\n{title}")
        for q, a in zip(data["held_out"], answers):
            print(f"  {q!r:48} → {a.strip().rstrip(chr(0xFFFD))!r}")  # drop a half-cut emoji

    show(
        "before training (LoReFT starts at the identity: the base model's answers)",
        reft.generate(prompts, max_new_tokens=16),
    )
    print(f"\ntraining on {len(train_rows)} emoji-only answers: {steps} steps of {batch_size}, lr {lr:g}")
    t0 = time.perf_counter()
    history = reftlens.train(reft, train_rows, max_steps=steps, batch_size=batch_size, lr=lr, seed=0)
    took = time.perf_counter() - t0
    print(f"loss {history.losses[0]:.3f} → {history.losses[-1]:.3f} in {took:.0f} s ({took / steps:.2f} s/step)")
    after = reft.generate(prompts, max_new_tokens=16)
    show("after training (held-out questions)", after)

    path = reft.save(out)
    loaded = ReftModel.load(path, model)
    same = loaded.generate(prompts, max_new_tokens=16) == after
    print(
        f"\nsaved to {path} ({', '.join(sorted(p.name for p in path.iterdir()))}); reloaded: same generations = {same}"
    )
    print(f"done in {time.perf_counter() - start:.0f} s (model load, 3 generations, training, save, reload)")


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


MODEL_HELP = "smollm2-135m (default), tiny-llama, tiny-gpt2, or a local Hugging Face folder (with config.json)"


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``demo`` and ``tour``, every option with its help line."""
    parser = argparse.ArgumentParser(
        prog="reftlens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{demo,tour}", help="run `reftlens COMMAND --help` for its options"
    )
    p = sub.add_parser(
        "demo",
        help="the main job: train a LoReFT to answer in emoji, show held-out answers, save and reload",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--steps", type=_positive_int, default=DEMO_STEPS, help=f"optimizer steps (default {DEMO_STEPS})")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEMO_BATCH,
        help=f"examples per step (default {DEMO_BATCH}; the data has 16, so 2 steps are one epoch)",
    )
    p.add_argument("--lr", type=_positive_float, default=DEMO_LR, help=f"learning rate (default {DEMO_LR:g})")
    p.add_argument(
        "--out", default="reft-emoji", help="folder to save the trained interventions in (default ./reft-emoji)"
    )
    t = sub.add_parser(
        "tour",
        help="activation patching and DII on one prompt pair, layer by layer (no training; seconds)",
        description=TOUR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        demo(args.model, args.steps, args.out, args.lr, args.batch_size)
    else:
        tour(args.model)
    return 0
