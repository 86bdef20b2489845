"""Steering and concept detection on AxBench's own data (Concept10, 30 concepts), SmolLM2-135M-Instruct.

AxBench (Wu et al. 2025, arXiv 2501.17148) and RePS (arXiv 2505.20809) rank steering methods
prompting > LoReFT > … ≫ DiffMean, the preference objective ahead of the LM objective, and find
ReFT-r1 detecting about as well as DiffMean. This script follows their protocol on their data
(`../shared/data/axbench/`, three Concept10 sets; `SOURCE.md` there) as far as an offline machine allows.

- **Detection**, per concept: directions fitted on the training replies (the concept's 72 replies
  against the 216 ordinary ones): DiffMean (token-level difference of means), PCA (first component
  of paired per-reply differences), a logistic probe (per-reply means); scored on the held-out
  texts (36 positive vs 36 negative per concept; hard negatives reported apart) by max- and
  mean-pooled projection; AUROC per concept, at several layers. ReFT-r1's direction comes from its
  steering training (the steering layer only).
- **Steering**, per concept, on held-out instructions (the ordinary rows' instructions, which no
  method trains on), split into validation (chooses each method's steering factor, as AxBench) and
  test: prompting (the concept named in the prompt), DiffMean and probe as ``Steer(u, α·‖h‖)``,
  ReFT-r1 (LM + L1, steered along its w), LoReFT rank ``--rank`` with the LM objective and with the
  preference objective (the concept reply preferred over the base model's own reply to the same
  instruction, both directions, RePS-style). Every trained method trains on that concept's
  instruction → concept-reply pairs with the same steps, batch and learning rate.
- **Judge (offline proxies for AxBench's LLM judge)**: concept = P(concept) from a TF-IDF +
  logistic-regression classifier fitted per concept on its held-out positive vs negative and hard-
  negative texts (never on training replies); fluency = min(1, ppl₀ / ppl) with ppl the reply's
  perplexity under the unsteered base model and ppl₀ the median perplexity of the base model's own
  sampled replies; instruction relevance = the share of the other instructions of its split under
  which the reply is less likely than under its own. Aggregate: the harmonic mean of the three, per
  reply, averaged (AxBench's combination).

What the proxies cannot see that an LLM judge would: whether the concept is woven into an answer
(the classifier rewards concept words anywhere, also a reply that only lists them); factual or
logical errors (perplexity rewards fluent nonsense); partial instruction following (relevance
only compares instructions against each other, so a reply that answers any part of its own
instruction scores like one that answers all of it).

    pip install -e ".[bench]"                                   # pandas, pyarrow, scikit-learn
    PYTHONPATH=. python benchmarks/steering_axbench.py --quick  # a smoke run (numbers not meaningful)
    PYTHONPATH=. python benchmarks/steering_axbench.py --detection-only
    PYTHONPATH=. python benchmarks/steering_axbench.py --seeds 0 1 2          # the full protocol (hours on 2 cores)
    PYTHONPATH=. python benchmarks/steering_axbench.py --concepts 6 --ablate steps=60 lr=0.02 layer=18 \\
        positions=prompt objective=preference rank=8 alpha=2                  # ablation rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from common import environment_line, headline
from steering_bbc import chat, cross_logprob, log, pair_logprob

import reftlens
from reftlens import Intervention, LoReFT, ReftModel, ReFTr1, Steer
from reftlens.steering import alpha_sweep, auroc, collect, diff_mean, pca, probe

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "axbench"
SETS = ("prod_2b_l10_v1", "prod_9b_l20_v1", "prod_9b_l31_v1")
AXBENCH_STEERING = "prompting > LoReFT > SFT > LoRA > ReFT-r1 >> DiffMean > SAE; RePS: preference > LM objective"
AXBENCH_DETECTION = "DiffMean ≈ probe ≈ ReFT-r1 > SAE >> PCA"
TRAINED = ("ReFT-r1", "LoReFT (LM)", "LoReFT (preference)")


def words(text: str, n: int) -> str:
    return " ".join(str(text).split()[:n])


def load_concepts(root: Path, sets: list[str]) -> list[dict]:
    """One record per concept: its description, training replies, held-out texts and, per set, the
    ordinary replies (shared by the set's concepts)."""
    import pandas as pd

    out = []
    for name in sets:
        folder = root / name
        if not folder.is_dir():
            raise SystemExit(f"AxBench data not found at {folder}; pass --data (see SOURCE.md there).")
        train = pd.read_parquet(folder / "train_data.parquet")
        held = pd.read_parquet(folder / "latent_eval_data.parquet")
        meta = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip()]
        ordinary = train[train.category == "negative"]
        for m in meta:
            cid = m["concept_id"]
            pos = train[(train.category == "positive") & (train.concept_id == cid)]
            h = held[held.concept_id == cid]
            out.append(
                {
                    "set": name,
                    "id": cid,
                    "concept": m["concept"],
                    "train": list(zip(pos.input, pos.output)),
                    "ordinary": list(zip(ordinary.input, ordinary.output)),
                    "held_pos": list(h[h.category == "positive"].output),
                    "held_neg": list(h[h.category == "negative"].output),
                    "held_hard": list(h[h.category == "hard negative"].output),
                }
            )
    return out


def concept_judge(c: dict):
    """P(concept | text): TF-IDF + logistic regression on the concept's held-out texts only."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = c["held_pos"] + c["held_neg"] + c["held_hard"]
    labels = [1] * len(c["held_pos"]) + [0] * (len(c["held_neg"]) + len(c["held_hard"]))
    clf = make_pipeline(
        TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2)), LogisticRegression(C=10.0, max_iter=2000)
    )
    clf.fit(texts, labels)
    return lambda replies: clf.predict_proba([r or "." for r in replies])[:, 1]


def judge(model, concept_p, replies: list[str], pool: list[str], ppl0: float) -> list[dict]:
    """AxBench's three scores (offline proxies) and their harmonic mean for each reply; reply i
    answers ``pool[i]``."""
    lp = cross_logprob(model, pool, [r or "." for r in replies])
    probs = concept_p(replies)
    out = []
    for i, r in enumerate(replies):
        mine, others = lp[i, i], torch.cat([lp[i, :i], lp[i, i + 1 :]])
        ppl = math.exp(-float(mine))
        s = {
            "concept": float(probs[i]),
            "fluency": min(1.0, ppl0 / ppl),
            "relevance": float((others < mine).float().mean()),
        }
        if not r.strip():
            s.update(fluency=0.0, relevance=0.0)
        parts = [s["concept"], s["fluency"], s["relevance"]]
        s["aggregate"] = 0.0 if min(parts) <= 0 else 3 / sum(1 / p for p in parts)
        s["ppl"] = ppl
        out.append(s)
    return out


def mean_key(records: list[dict], key: str) -> float:
    return statistics.fmean(r[key] for r in records)


# ---- detection ----------------------------------------------------------------------------------


def detection(model, concepts: list[dict], args) -> dict:
    """AUROC per (method, pool, layer) per concept, on held-out positive vs negative texts."""
    results: dict[str, list[float]] = {}
    by_set: dict[str, list[dict]] = {}
    for c in concepts:
        by_set.setdefault(c["set"], []).append(c)
    for name, group in by_set.items():
        ordinary = [words(o, args.words) for _, o in group[0]["ordinary"]]
        texts = list(ordinary)
        spans = {}
        for c in group:
            start = len(texts)
            texts += [words(o, args.words) for _, o in c["train"]]
            texts += [words(t, args.words) for t in c["held_pos"] + c["held_neg"] + c["held_hard"]]
            spans[c["id"]] = start
        t0 = time.perf_counter()
        acts = collect(model, texts, layers=args.layers, positions=slice(1, None), batch_size=16)
        log(f"{name}: activations of {len(texts)} texts at layers {args.layers} in {time.perf_counter() - t0:.0f} s")
        n_ord = len(ordinary)
        for c in group:
            s = spans[c["id"]]
            n_tr, n_p, n_n, n_h = len(c["train"]), len(c["held_pos"]), len(c["held_neg"]), len(c["held_hard"])
            tr = torch.arange(s, s + n_tr)
            held = torch.arange(s + n_tr, s + n_tr + n_p + n_n + n_h)
            y = torch.tensor([1] * n_p + [0] * n_n)
            y_hard = torch.tensor([1] * n_p + [0] * n_h)
            is_pos = torch.zeros(len(texts), dtype=torch.bool)
            is_pos[tr] = True
            is_neg = torch.zeros(len(texts), dtype=torch.bool)
            is_neg[:n_ord] = True
            for layer in args.layers:
                means = acts.pooled(layer, "mean")
                pos_m, neg_m = means[tr], means[:n_ord]
                pair = torch.randperm(n_ord, generator=torch.Generator().manual_seed(c["id"]))[:n_tr]
                fits = {
                    "DiffMean": diff_mean(acts[layer][is_pos[acts.example]], acts[layer][is_neg[acts.example]]),
                    "PCA": pca(pos_m, neg_m[pair], seed=0),
                    "probe": probe(pos_m, neg_m),
                }
                for method, u in fits.items():
                    for pool in ("max", "mean"):
                        scores = acts.scores(layer, u, pool=pool)[held]
                        results.setdefault(f"{method}|{pool}|{layer}", []).append(auroc(scores[: n_p + n_n], y))
                        hard = torch.cat([scores[:n_p], scores[n_p + n_n :]])
                        if n_h:
                            results.setdefault(f"{method}|{pool}|{layer}|hard", []).append(auroc(hard, y_hard))
    return results


def print_detection(results: dict, layers: list[int]) -> dict:
    print("\n## Detection: AUROC on held-out texts (positive vs negative), mean ± sd over concepts\n")
    print("| method | pool | " + " | ".join(f"layer {l}" for l in layers) + " | hard negatives (best layer) |")
    print("|---|---|" + "---|" * (len(layers) + 1))
    best = {}
    for method in ("DiffMean", "probe", "PCA", "ReFT-r1"):
        for pool in ("max", "mean"):
            cells, means = [], {}
            for layer in layers:
                v = results.get(f"{method}|{pool}|{layer}")
                if v:
                    means[layer] = statistics.fmean(v)
                    sd = statistics.pstdev(v) if len(v) > 1 else 0.0
                    cells.append(f"{means[layer]:.3f} ± {sd:.3f}")
                else:
                    cells.append("–")
            if not means:
                continue
            top = max(means, key=means.get)
            best[(method, pool)] = (top, means[top])
            hard = results.get(f"{method}|{pool}|{top}|hard")
            tail = f" | {statistics.fmean(hard):.3f} |" if hard else " | – |"
            print(f"| {method} | {pool} | " + " | ".join(cells) + tail)
    return best


# ---- steering -----------------------------------------------------------------------------------


def steer_concept(model, c: dict, args, seed: int, instructions: tuple[list[str], list[str]], ppl0: float, norm: float):
    """Every method on one concept: replies at each steering factor on validation, the best on test."""
    tok, d = model.tokenizer, model.cfg.d_model
    val_i, test_i = instructions
    pool = val_i + test_i
    prompts = [chat(tok, x) for x in pool]
    n_val = len(val_i)
    concept_p = concept_judge(c)
    gen = dict(intervene_on=args.positions, eos_token_id=tok.eos_token_id)
    layer = args.steer_layer
    out: dict[str, dict] = {}
    timing: dict[str, float] = {}

    def record(method: str, replies_by_alpha: list[list[str]], alphas: list[float]):
        val = [judge(model, concept_p, r[:n_val], prompts[:n_val], ppl0) for r in replies_by_alpha]
        k = max(range(len(alphas)), key=lambda j: mean_key(val[j], "aggregate"))
        test = judge(model, concept_p, replies_by_alpha[k][n_val:], prompts[n_val:], ppl0)
        out[method] = {"alpha": alphas[k], "test": test, "example": replies_by_alpha[k][n_val]}

    identity = ReftModel(model, Intervention(Steer(d), layers=layer, positions="all"))
    record("base (no steering)", [identity.generate(prompts, args.new_tokens, **gen)], [0.0])
    hint = f"\n\nIn your answer, bring in {c['concept']}."
    record("prompting", [identity.generate([chat(tok, x + hint) for x in pool], args.new_tokens, **gen)], [0.0])

    # directions from the concept's training replies against the ordinary ones, at the steering layer
    texts = [words(o, args.words) for _, o in c["train"]] + [words(o, args.words) for _, o in c["ordinary"]]
    acts = collect(model, texts, layers=[layer], positions=slice(1, None), batch_size=16)
    n_tr = len(c["train"])
    is_pos = acts.example < n_tr
    means = acts.pooled(layer, "mean")
    for method, u in (
        ("DiffMean", diff_mean(acts[layer][is_pos], acts[layer][~is_pos]).vector),
        ("probe", probe(means[:n_tr], means[n_tr:]).vector),
    ):
        steer = ReftModel(model, Intervention(Steer(u * norm), layers=layer, positions="all"))
        record(method, alpha_sweep(steer, prompts, args.alphas, args.new_tokens, **gen), args.alphas)

    # trained methods: the concept's instruction → concept-reply pairs, one budget for all
    pairs = c["train"][: args.train_pairs]
    chats = [chat(tok, i) for i, _ in pairs]
    rejected = (
        identity.generate(chats, args.completion_tokens, **gen) if "LoReFT (preference)" in args.methods else None
    )
    data = [
        {"prompt": p, "completion": words(o, args.completion_words), **({"rejected": rejected[k]} if rejected else {})}
        for k, (p, (_, o)) in enumerate(zip(chats, pairs))
    ]
    train_kw = dict(
        max_steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        intervene_on=args.train_positions,
        progress=False,
        seed=seed,
        max_length=args.max_length,
    )
    for method in TRAINED:
        if method not in args.methods:
            continue
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        if method == "ReFT-r1":
            r1 = ReFTr1(d, k=8, l1=args.l1)
            reftlens.train(ReftModel(model, Intervention(r1, layers=layer, positions="all")), data, **train_kw)
            w = r1.direction.detach()
            out["_r1_direction"] = w
            steer = ReftModel(model, Intervention(Steer(w * norm), layers=layer, positions="all"))
            record(method, alpha_sweep(steer, prompts, args.alphas, args.new_tokens, **gen), args.alphas)
        else:
            reft = ReftModel(model, Intervention(LoReFT(d, args.rank), layers=layer, positions="all"))
            objective = "preference" if "preference" in method else "lm"
            reftlens.train(reft, data, objective=objective, **train_kw)
            record(method, alpha_sweep(reft, prompts, args.reft_alphas, args.new_tokens, **gen), args.reft_alphas)
        timing[method] = time.perf_counter() - t0
    return out, timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the three Concept10 sets")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--concepts", type=int, default=None, help="the first N concepts of each set (default: all 10)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24], help="detection layers")
    ap.add_argument("--steer-layer", type=int, default=12)
    ap.add_argument("--words", type=int, default=64, help="words of each text read for detection and directions")
    ap.add_argument("--n-val", type=int, default=4)
    ap.add_argument("--n-test", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2, 0.4, 0.8], help="× mean token norm")
    ap.add_argument("--reft-alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="LoReFT edit scales")
    ap.add_argument("--methods", nargs="+", default=list(TRAINED), help="trained methods to run")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--l1", type=float, default=0.01)
    ap.add_argument("--train-pairs", type=int, default=72)
    ap.add_argument("--completion-words", type=int, default=48)
    ap.add_argument("--completion-tokens", type=int, default=48, help="length of the base replies used as rejected")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--positions", default="all", choices=["prompt", "generated", "all"], help="steered at inference")
    ap.add_argument("--train-positions", default="all", choices=["prompt", "all"], help="edited in training")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--detection-only", action="store_true")
    ap.add_argument("--steering-only", action="store_true")
    ap.add_argument("--label", default="default", help="the row name of this configuration (ablations)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--out", default=None, help="write all results as JSON here (after every concept)")
    args = ap.parse_args()
    if args.quick:
        args.sets, args.concepts, args.layers, args.words = args.sets[:1], 1, [12], 24
        args.n_val, args.n_test, args.new_tokens, args.alphas, args.reft_alphas = 2, 2, 8, [0.4], [1.0]
        args.steps, args.batch, args.train_pairs, args.completion_words, args.completion_tokens = 2, 2, 4, 8, 8
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    concepts = load_concepts(args.data, args.sets)
    if args.concepts is not None:
        keep = {(s, i) for s in args.sets for i in range(args.concepts)}
        concepts = [c for c in concepts if (c["set"], c["id"]) in keep]
    model = reftlens.load_model("smollm2-135m")
    print(f"# AxBench Concept10 ({len(concepts)} concepts from {', '.join(args.sets)}) on SmolLM2-135M-Instruct, fp32")
    print(environment_line())
    print(f"# 1-min load average {load_start:.1f} at the start on {os.cpu_count()} cores; configuration {args.label!r}")
    record = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

    if not args.steering_only:
        det = detection(model, concepts, args)
        best = print_detection(det, args.layers)
        record["detection"] = det
        dm, pr = best[("DiffMean", "max")], best[("probe", "mean")]
        headline(
            "steering_axbench",
            "detection: DiffMean (max) and probe (mean) mean AUROC at their best layers",
            min(dm[1], pr[1]),
            target="≥ 0.9 and within 0.03",
            met=min(dm[1], pr[1]) >= 0.9 and abs(dm[1] - pr[1]) <= 0.03,
            note=f"DiffMean {dm[1]:.3f} @ {dm[0]}, probe {pr[1]:.3f} @ {pr[0]}",
        )
    if args.detection_only:
        _write(args.out, record, t_start)
        return

    # held-out instructions: the ordinary rows' instructions (no method trains on them)
    steering: dict[str, dict[str, list[dict]]] = {}
    r1_auroc: list[float] = []
    seconds: dict[str, float] = {}
    for seed in args.seeds:
        for c in concepts:
            ordinary = sorted({i for i, _ in c["ordinary"]})
            g = torch.Generator().manual_seed(1000 * seed + c["id"])
            pick = [ordinary[i] for i in torch.randperm(len(ordinary), generator=g)[: args.n_val + args.n_test]]
            texts = [words(o, args.words) for _, o in c["train"][:8]]
            norm = float(
                collect(model, texts, layers=[args.steer_layer], positions=slice(1, None))[args.steer_layer]
                .norm(dim=1)
                .mean()
            )
            ppl_ref = pair_logprob(
                model, [(chat(model.tokenizer, i), words(o, args.completion_words)) for i, o in c["ordinary"][:16]]
            )
            ppl0 = statistics.median(math.exp(-float(x)) for x in ppl_ref)
            out, timing = steer_concept(model, c, args, seed, (pick[: args.n_val], pick[args.n_val :]), ppl0, norm)
            if "_r1_direction" in out:
                w = out.pop("_r1_direction")
                held = [words(t, args.words) for t in c["held_pos"] + c["held_neg"]]
                acts = collect(model, held, layers=[args.steer_layer], positions=slice(1, None))
                y = torch.tensor([1] * len(c["held_pos"]) + [0] * len(c["held_neg"]))
                r1_auroc.append(auroc(acts.scores(args.steer_layer, w, pool="max"), y))
            for method, r in out.items():
                steering.setdefault(method, {}).setdefault(str(seed), []).append(
                    {
                        "concept_id": f"{c['set']}:{c['id']}",  # "concept" below is the judge's score
                        "alpha": r["alpha"],
                        **{k: mean_key(r["test"], k) for k in ("concept", "fluency", "relevance", "aggregate")},
                        "example": r["example"],
                    }
                )
            for m, s in timing.items():
                seconds[m] = seconds.get(m, 0.0) + s
            log(
                f"seed {seed}, {c['set']}:{c['id']} ({c['concept'][:50]}): "
                + ", ".join(f"{m} {mean_key(r['test'], 'aggregate'):.2f}" for m, r in out.items())
            )
            record.update(steering=steering, reft_r1_auroc=r1_auroc, partial=True)
            _write(args.out, record, t_start)

    print(
        f"\n## Steering at layer {args.steer_layer} ({args.positions} positions), {args.n_val} validation / {args.n_test} test "
        f"instructions per concept, {args.new_tokens} new tokens, greedy; trained: {args.steps} steps × batch {args.batch}, "
        f"lr {args.lr}, rank {args.rank}, seeds {args.seeds}\n"
    )
    print(
        "| method | concept | fluency | relevance | aggregate (HM) mean ± sd over concepts | sd over seeds | train + sweep s |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for method, per_seed in steering.items():
        rows = [r for rs in per_seed.values() for r in rs]
        per_concept = {}
        for r in rows:
            per_concept.setdefault(r["concept_id"], []).append(r["aggregate"])
        agg = [statistics.fmean(v) for v in per_concept.values()]
        seed_means = [statistics.fmean(r["aggregate"] for r in rs) for rs in per_seed.values()]
        summary[method] = statistics.fmean(agg)
        sd_c = statistics.pstdev(agg) if len(agg) > 1 else 0.0
        sd_s = f"{statistics.pstdev(seed_means):.3f}" if len(seed_means) > 1 else "–"
        print(
            f"| {method} | {mean_key(rows, 'concept'):.3f} | {mean_key(rows, 'fluency'):.3f} | {mean_key(rows, 'relevance'):.3f} | "
            f"{summary[method]:.3f} ± {sd_c:.3f} | {sd_s} | {seconds.get(method, 0):.0f} |"
        )
    if r1_auroc:
        print(
            f"\nReFT-r1 detection (its w, layer {args.steer_layer}, max pool): mean AUROC {statistics.fmean(r1_auroc):.3f} over {len(r1_auroc)} runs"
        )
    ranking = sorted((m for m in summary if m != "base (no steering)"), key=lambda m: -summary[m])
    print(f"\nRanking by aggregate: {' > '.join(ranking)}")
    print(f"AxBench / RePS (Gemma-2 2B/9B): {AXBENCH_STEERING}; detection {AXBENCH_DETECTION}.")
    if all(m in summary for m in ("LoReFT (preference)", "LoReFT (LM)", "DiffMean")):
        pref, lm, dm = summary["LoReFT (preference)"], summary["LoReFT (LM)"], summary["DiffMean"]
        headline(
            "steering_axbench",
            f"steering aggregate ({args.label}): preference / LoReFT (LM) / DiffMean",
            pref,
            target="preference ≥ LM ≥ DiffMean",
            met=pref >= lm >= dm,
            note=f"{pref:.3f} / {lm:.3f} / {dm:.3f}",
        )
    record.update(summary=summary, partial=False)
    _write(args.out, record, t_start)
    print(
        f"\n# total {time.perf_counter() - t_start:.0f} s; 1-min load average {os.getloadavg()[0]:.1f} at the end",
        file=sys.stderr,
    )


def _write(path: str | None, record: dict, t_start: float) -> None:
    if path:
        record["seconds"] = time.perf_counter() - t_start
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
