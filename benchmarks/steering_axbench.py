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
  method trains on; the same ones for every seed), split into validation (chooses each method's
  steering factor, as AxBench) and test: prompting (the concept named in the prompt), DiffMean and
  probe as ``Steer(u, α·‖h‖)``, ReFT-r1 (LM + L1, steered along its w), LoReFT rank ``--rank`` with
  the LM objective and with the preference objective (the concept reply preferred over the base
  model's own reply to the same instruction, both directions, RePS-style). Every trained method
  trains on that concept's instruction → concept-reply pairs with the same steps, batch and
  learning rate, once per seed; the untrained methods are deterministic and run once.
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
    # the steering protocol in two processes (one per core), then the summary of both:
    for i in 0 1; do OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/steering_axbench.py --steering-only \\
        --shard $i/2 --out axs$i.json & done; wait
    PYTHONPATH=. python benchmarks/steering_axbench.py --merge axs0.json axs1.json
    # an ablation row: any option changed, under its own --label, on a few concepts
    PYTHONPATH=. python benchmarks/steering_axbench.py --steering-only --concepts 2 --steps 64 --label steps=64
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


SCORES = ("concept", "fluency", "relevance", "aggregate")
FIXED = ("base (no steering)", "prompting", "DiffMean", "probe")
METHODS = FIXED + TRAINED


class Judged:
    """One concept's evaluation: the held-out instructions (validation, then test), the judge, and
    each method's replies at the factor validation chose."""

    def __init__(self, model, c: dict, args, instructions: tuple[list[str], list[str]], ppl0: float):
        self.model, self.args = model, args
        self.n_val = len(instructions[0])
        self.pool = instructions[0] + instructions[1]
        self.prompts = [chat(model.tokenizer, x) for x in self.pool]
        self.concept_p = concept_judge(c)
        self.ppl0 = ppl0
        self.gen = dict(intervene_on=args.positions, eos_token_id=model.tokenizer.eos_token_id)
        self.base = self.steered(model.cfg.d_model)  # Steer(d): a zero vector, the unsteered model

    def steered(self, vector) -> ReftModel:
        """The model with ``Steer(vector)`` at the steering layer, on every position."""
        return ReftModel(self.model, Intervention(Steer(vector), layers=self.args.steer_layer, positions="all"))

    def sweep(self, reft, alphas: list[float]) -> dict:
        """Replies at each factor on every instruction; the factor with the best validation
        aggregate, and its test scores."""
        replies = alpha_sweep(reft, self.prompts, alphas, self.args.new_tokens, **self.gen)
        return self.choose(replies, alphas)

    def choose(self, replies_by_alpha: list[list[str]], alphas: list[float]) -> dict:
        n, p = self.n_val, self.prompts
        val = [judge(self.model, self.concept_p, r[:n], p[:n], self.ppl0) for r in replies_by_alpha]
        k = max(range(len(alphas)), key=lambda j: mean_key(val[j], "aggregate"))
        test = judge(self.model, self.concept_p, replies_by_alpha[k][n:], p[n:], self.ppl0)
        by_alpha = [{k_: mean_key(v, k_) for k_ in SCORES} for v in val]
        return {"alpha": alphas[k], "test": test, "example": replies_by_alpha[k][n], "val": list(zip(alphas, by_alpha))}


def fixed_methods(model, c: dict, args, ev: Judged, norm: float) -> dict:
    """The untrained methods (deterministic, so run once per concept): no steering, the concept named
    in the prompt, and DiffMean and probe directions fitted on the concept's training replies
    against the ordinary ones at the steering layer, steered as ``Steer(u·α·‖h‖)``."""
    tok, layer = model.tokenizer, args.steer_layer
    out: dict[str, dict] = {}
    if "base (no steering)" in args.methods:
        out["base (no steering)"] = ev.choose([ev.base.generate(ev.prompts, args.new_tokens, **ev.gen)], [0.0])
    if "prompting" in args.methods:
        hint = f"\n\nIn your answer, bring in {c['concept']}."
        replies = ev.base.generate([chat(tok, x + hint) for x in ev.pool], args.new_tokens, **ev.gen)
        out["prompting"] = ev.choose([replies], [0.0])
    if not {"DiffMean", "probe"} & set(args.methods):
        return out
    texts = [words(o, args.words) for _, o in c["train"]] + [words(o, args.words) for _, o in c["ordinary"]]
    acts = collect(model, texts, layers=[layer], positions=slice(1, None), batch_size=16)
    n_tr = len(c["train"])
    is_pos = acts.example < n_tr
    means = acts.pooled(layer, "mean")
    directions = {
        "DiffMean": diff_mean(acts[layer][is_pos], acts[layer][~is_pos]).vector,
        "probe": probe(means[:n_tr], means[n_tr:]).vector,
    }
    for method, u in directions.items():
        if method in args.methods:
            out[method] = ev.sweep(ev.steered(u * norm), args.alphas)
    out["_diffmean_direction"] = directions["DiffMean"]
    return out


def training_data(model, c: dict, args, ev: Judged) -> list[dict]:
    """The concept's instruction → concept-reply pairs; for the preference objective each also
    carries the base model's own (greedy, so seed-independent) reply as the rejected one."""
    pairs = c["train"][: args.train_pairs]
    chats = [chat(model.tokenizer, i) for i, _ in pairs]
    rejected = None
    if "LoReFT (preference)" in args.methods:
        rejected = ev.base.generate(chats, args.completion_tokens, **ev.gen)
    return [
        {"prompt": p, "completion": words(o, args.completion_words), **({"rejected": rejected[k]} if rejected else {})}
        for k, (p, (_, o)) in enumerate(zip(chats, pairs))
    ]


def trained_methods(model, args, ev: Judged, data: list[dict], norm: float, seed: int) -> tuple[dict, dict]:
    """The trained methods on ``data`` (:func:`training_data`), one budget for all (steps, batch,
    learning rate, positions); ``seed`` sets their initialisation and data order."""
    d, layer = model.cfg.d_model, args.steer_layer
    out: dict[str, dict] = {}
    timing: dict[str, float] = {}
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
            out[method] = ev.sweep(ev.steered(w * norm), args.alphas)
        else:
            reft = ReftModel(model, Intervention(LoReFT(d, args.rank), layers=layer, positions="all"))
            objective = "preference" if "preference" in method else "lm"
            reftlens.train(reft, data, objective=objective, **train_kw)
            out[method] = ev.sweep(reft, args.reft_alphas)
        timing[method] = time.perf_counter() - t0
    return out, timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the three Concept10 sets")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument(
        "--concepts", default=None, help="N: the first N concepts of each set; A:B: concepts A to B-1 (default: all 10)"
    )
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 12, 18, 24], help="detection layers")
    ap.add_argument("--steer-layer", type=int, default=12)
    ap.add_argument("--words", type=int, default=64, help="words of each text read for detection and directions")
    ap.add_argument("--n-val", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.4, 0.8], help="× mean token norm")
    ap.add_argument("--reft-alphas", type=float, nargs="+", default=[1.0, 2.0], help="LoReFT edit scales")
    ap.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help="methods to run"
    )
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--l1", type=float, default=0.01)
    ap.add_argument("--train-pairs", type=int, default=72)
    ap.add_argument("--completion-words", type=int, default=32)
    ap.add_argument("--completion-tokens", type=int, default=32, help="length of the base replies used as rejected")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--positions", default="all", choices=["prompt", "generated", "all"], help="steered at inference")
    ap.add_argument("--train-positions", default="all", choices=["prompt", "all"], help="edited in training")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--detection-only", action="store_true")
    ap.add_argument("--steering-only", action="store_true")
    ap.add_argument("--label", default="default", help="the row name of this configuration (ablations)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    ap.add_argument("--out", default=None, help="write all results as JSON here (after every concept)")
    ap.add_argument("--shard", default="0/1", help="I/N: run every N-th concept from the I-th (parallel processes)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="print the summary of these --out files")
    args = ap.parse_args()
    args.shard = parse_shard(args.shard)
    picked = parse_concepts(args.concepts)
    if args.merge:
        groups = load_runs(args.merge)
        for label, recs in groups.items():
            summarize(recs, label)
        if "default" in groups and len(groups) > 1:
            ablations(groups)
        return
    if args.quick:
        args.sets, args.concepts, args.layers, args.words = args.sets[:1], "1", [12], 24
        picked = range(1)
        args.n_val, args.n_test, args.new_tokens, args.alphas, args.reft_alphas = 2, 2, 8, [0.4], [1.0]
        args.steps, args.batch, args.train_pairs, args.completion_words, args.completion_tokens = 2, 2, 4, 8, 8
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    concepts = load_concepts(args.data, args.sets)
    if picked is not None:
        keep = {(s, i) for s in args.sets for i in picked}
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

    steering: dict[str, dict[str, list[dict]]] = {}
    aurocs: list[dict] = []
    seconds: dict[str, float] = {}
    for c in concepts[args.shard[0] :: args.shard[1]]:
        # held-out instructions: the ordinary rows' instructions (no method trains on them), the same
        # for every seed, so that every method of every seed answers the same ones
        ordinary = sorted({i for i, _ in c["ordinary"]})
        g = torch.Generator().manual_seed(c["id"])
        pick = [ordinary[i] for i in torch.randperm(len(ordinary), generator=g)[: args.n_val + args.n_test]]
        texts = [words(o, args.words) for _, o in c["train"][:8]]
        layer = args.steer_layer
        norm = float(collect(model, texts, layers=[layer], positions=slice(1, None))[layer].norm(dim=1).mean())
        ppl_ref = pair_logprob(
            model, [(chat(model.tokenizer, i), words(o, args.completion_words)) for i, o in c["ordinary"][:16]]
        )
        ev = Judged(
            model,
            c,
            args,
            (pick[: args.n_val], pick[args.n_val :]),
            statistics.median(math.exp(-float(x)) for x in ppl_ref),
        )
        cid = f"{c['set']}:{c['id']}"
        held = [words(t, args.words) for t in c["held_pos"] + c["held_neg"]]
        y = torch.tensor([1] * len(c["held_pos"]) + [0] * len(c["held_neg"]))
        held_acts = None

        def held_auroc(u: torch.Tensor) -> float:
            nonlocal held_acts
            if held_acts is None:
                held_acts = collect(model, held, layers=[layer], positions=slice(1, None))
            return auroc(held_acts.scores(layer, u, pool="max"), y)

        runs = [("fixed", fixed_methods(model, c, args, ev, norm), {})]
        dm = runs[0][1].pop("_diffmean_direction", None)
        if dm is not None:
            aurocs.append({"concept_id": cid, "seed": "fixed", "method": "DiffMean", "auroc": held_auroc(dm)})
        data = training_data(model, c, args, ev) if set(TRAINED) & set(args.methods) else []
        for seed in args.seeds:
            out, timing = trained_methods(model, args, ev, data, norm, seed)
            if "_r1_direction" in out:
                w = out.pop("_r1_direction")
                aurocs.append({"concept_id": cid, "seed": str(seed), "method": "ReFT-r1", "auroc": held_auroc(w)})
            runs.append((str(seed), out, timing))
        for seed, out, timing in runs:
            for method, r in out.items():
                steering.setdefault(method, {}).setdefault(seed, []).append(
                    {
                        "concept_id": cid,  # "concept" below is the judge's concept score
                        "alpha": r["alpha"],
                        **{k: mean_key(r["test"], k) for k in SCORES},
                        "example": r["example"],
                        "validation": r["val"],  # [(factor, mean scores)] on the validation instructions
                    }
                )
            for m, t in timing.items():
                seconds[m] = seconds.get(m, 0.0) + t
            if out:
                log(
                    f"{cid} ({c['concept'][:50]}), {seed}: "
                    + ", ".join(f"{m} {mean_key(r['test'], 'aggregate'):.2f}" for m, r in out.items())
                )
        record.update(steering=steering, aurocs=aurocs, train_seconds=seconds, partial=True)
        _write(args.out, record, t_start)
    record.update(partial=False)
    _write(args.out, record, t_start)
    summarize([record], args.label)
    print(
        f"\n# total {time.perf_counter() - t_start:.0f} s; 1-min load average {os.getloadavg()[0]:.1f} at the end",
        file=sys.stderr,
    )


def summarize(records: list[dict], label: str) -> dict:
    """The steering table over every record's concepts (shards of one configuration), the ranking,
    and ReFT-r1's detection AUROC against DiffMean's on the same concepts."""
    a = records[0]["args"]
    steering: dict[str, dict[str, list[dict]]] = {}
    aurocs: list[dict] = []
    seconds: dict[str, float] = {}
    for rec in records:
        for method, per_seed in rec.get("steering", {}).items():
            for seed, rows in per_seed.items():
                steering.setdefault(method, {}).setdefault(seed, []).extend(rows)
        aurocs += rec.get("aurocs", [])
        for m, t in rec.get("train_seconds", {}).items():
            seconds[m] = seconds.get(m, 0.0) + t
    n_concepts = len({r["concept_id"] for per_seed in steering.values() for rows in per_seed.values() for r in rows})
    partial = " (partial: a run did not finish)" if any(r.get("partial", True) for r in records) else ""
    print(
        f"\n## Steering ({label}){partial}: {n_concepts} concepts, layer {a['steer_layer']} ({a['positions']} positions at "
        f"inference, {a['train_positions']} in training), {a['n_val']} validation / {a['n_test']} test instructions per "
        f"concept, {a['new_tokens']} new tokens, greedy; trained: {a['steps']} steps × batch {a['batch']}, lr {a['lr']}, "
        f"rank {a['rank']}, seeds {sorted({s for r in records for s in r['args']['seeds']})}\n"
    )
    print(
        "| method | concept | fluency | relevance | aggregate (HM), mean ± sd over concepts "
        "| sd over seeds (concepts) | train + sweep s |"
    )
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for method in [m for m in METHODS if m in steering]:
        per_seed = steering[method]
        rows = [r for rs in per_seed.values() for r in rs]
        per_concept: dict[str, list[float]] = {}
        for r in rows:
            per_concept.setdefault(r["concept_id"], []).append(r["aggregate"])
        agg = [statistics.fmean(v) for v in per_concept.values()]
        # the spread over seeds, on the concepts every seed ran
        common = set.intersection(*({r["concept_id"] for r in rs} for rs in per_seed.values()))
        seed_means = [
            statistics.fmean(r["aggregate"] for r in rs if r["concept_id"] in common) for rs in per_seed.values()
        ]
        summary[method] = statistics.fmean(agg)
        sd_c = statistics.pstdev(agg) if len(agg) > 1 else 0.0
        sd_s = f"{statistics.pstdev(seed_means):.3f} ({len(common)})" if len(seed_means) > 1 else "–"
        secs = f"{seconds[method]:.0f}" if method in seconds else "–"
        print(
            f"| {method} | {mean_key(rows, 'concept'):.3f} | {mean_key(rows, 'fluency'):.3f} | "
            f"{mean_key(rows, 'relevance'):.3f} | {summary[method]:.3f} ± {sd_c:.3f} | {sd_s} | {secs} |"
        )
    by_method: dict[str, dict[str, list[float]]] = {}
    for r in aurocs:
        by_method.setdefault(r["method"], {}).setdefault(r["concept_id"], []).append(r["auroc"])
    if "ReFT-r1" in by_method:
        r1 = by_method["ReFT-r1"]
        dm = {k: v for k, v in by_method.get("DiffMean", {}).items() if k in r1}
        r1_mean = statistics.fmean(statistics.fmean(v) for v in r1.values())
        line = f"\nReFT-r1 detection (its w, layer {a['steer_layer']}, max pooling, held-out texts): mean AUROC "
        line += f"{r1_mean:.3f} over {len(r1)} concepts"
        if dm:
            dm_mean = statistics.fmean(statistics.fmean(v) for v in dm.values())
            line += f"; DiffMean on the same concepts {dm_mean:.3f}"
        print(line)
        if dm and label == "default":
            headline(
                "steering_axbench",
                f"detection: ReFT-r1 mean AUROC against DiffMean's, layer {a['steer_layer']}, {len(dm)} concepts",
                r1_mean,
                target="within 0.05 of DiffMean",
                met=dm_mean - r1_mean <= 0.05,
                note=f"ReFT-r1 {r1_mean:.3f}, DiffMean {dm_mean:.3f}",
            )
    ranking = sorted((m for m in summary if m != "base (no steering)"), key=lambda m: -summary[m])
    print(f"\nRanking by aggregate: {' > '.join(ranking)}")
    print(f"AxBench / RePS (Gemma-2 2B/9B): {AXBENCH_STEERING}; detection {AXBENCH_DETECTION}.")
    if all(m in summary for m in ("LoReFT (preference)", "LoReFT (LM)", "DiffMean")):
        pref, lm, dm_ = summary["LoReFT (preference)"], summary["LoReFT (LM)"], summary["DiffMean"]
        headline(
            "steering_axbench",
            f"steering aggregate ({label}, {n_concepts} concepts): preference / LoReFT (LM) / DiffMean",
            pref,
            target="preference ≥ LM ≥ DiffMean",
            met=pref >= lm >= dm_,
            note=f"{pref:.3f} / {lm:.3f} / {dm_:.3f}",
        )
    return summary


def ablations(groups: dict[str, list[dict]]) -> None:
    """Each configuration against the default on the same concepts and seed 0: one row per
    (configuration, method) it ran."""

    def rows(recs: list[dict], method: str, concepts: set | None = None) -> list[dict]:
        out = []
        for rec in recs:
            per_seed = rec.get("steering", {}).get(method, {})
            out += [r for seed in ("fixed", "0") for r in per_seed.get(seed, [])]
        return [r for r in out if concepts is None or r["concept_id"] in concepts]

    print("\n## Ablations: each configuration against the default, on its own concepts, seed 0\n")
    print(
        "| configuration | method | concepts | concept | fluency | relevance | aggregate | default's aggregate | change |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, recs in groups.items():
        if label == "default":
            continue
        for method in METHODS:
            mine = rows(recs, method)
            if not mine:
                continue
            concepts = {r["concept_id"] for r in mine}
            base = rows(groups["default"], method, concepts)
            if {r["concept_id"] for r in base} != concepts:
                print(f"| {label} | {method} | {len(concepts)} | (the default lacks some of these concepts) |||||")
                continue
            a, b = mean_key(mine, "aggregate"), mean_key(base, "aggregate")
            print(
                f"| {label} | {method} | {len(concepts)} | {mean_key(mine, 'concept'):.3f} | {mean_key(mine, 'fluency'):.3f} "
                f"| {mean_key(mine, 'relevance'):.3f} | {a:.3f} | {b:.3f} | {a - b:+.3f} |"
            )
    for label, recs in groups.items():
        mine = {r["concept_id"]: r["auroc"] for rec in recs for r in rec.get("aurocs", []) if r["method"] == "ReFT-r1"}
        if label == "default" or not mine:
            continue
        base = [
            r["auroc"]
            for rec in groups["default"]
            for r in rec.get("aurocs", [])
            if r["method"] == "ReFT-r1" and r["seed"] == "0" and r["concept_id"] in mine
        ]
        if len(base) == len(mine):
            print(
                f"\nReFT-r1 detection AUROC ({label}, {len(mine)} concepts, seed 0): "
                f"{statistics.fmean(mine.values()):.3f}, the default's {statistics.fmean(base):.3f}"
            )


# options that pick which concepts, seeds and methods a run covers; every other option is the
# configuration, which the runs merged under one --label must share
COVERAGE = {"sets", "concepts", "shard", "seeds", "methods", "out", "label", "layers", "data"}
COVERAGE |= {"detection_only", "steering_only", "merge"}


def load_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """The --out records of ``paths`` grouped by --label; runs under one label must share their
    configuration (they are pooled as one)."""
    groups: dict[str, list[dict]] = {}
    for f in paths:
        try:
            rec = json.loads(Path(f).read_text())
            label = rec["args"]["label"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge: {f} is not a steering_axbench --out record ({e!r}).") from None
        group = groups.setdefault(label, [])
        if group:
            first = group[0]["args"]
            differ = sorted(k for k in (set(first) | set(rec["args"])) - COVERAGE if first.get(k) != rec["args"].get(k))
            if differ:
                raise SystemExit(
                    f"--merge: {f} and the first run labelled {label!r} differ in {', '.join(differ)}; "
                    "runs of another configuration need their own --label."
                )
        group.append(rec)
    for label, group in groups.items():
        seen: dict[tuple, int] = {}
        for n, rec in enumerate(group):
            for method, seed, cid in _rows_of(rec):
                if seen.setdefault((method, seed, cid), n) != n:
                    raise SystemExit(
                        f"--merge: {method} seed {seed} on {cid} is in two runs labelled {label!r}; "
                        "a concept would count twice. Merge each run once (pick concepts with --concepts A:B)."
                    )
    return groups


def _rows_of(record: dict) -> list[tuple[str, str, str]]:
    """(method, seed, concept) of each steering row of an --out record."""
    steering = record.get("steering", {})
    return [
        (m, seed, r["concept_id"]) for m, per_seed in steering.items() for seed, rows in per_seed.items() for r in rows
    ]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N with integers, e.g. 0/2; got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard I/N needs 0 ≤ I < N; got {text!r}")
    return i, n


def parse_concepts(text: str | None) -> range | None:
    """``--concepts``: N (the first N of each set) or A:B (concepts A … B-1); None for all."""
    if text is None:
        return None
    try:
        a, b = (int(x) for x in text.split(":")) if ":" in text else (0, int(text))
    except ValueError:
        raise SystemExit(f"--concepts must be N or A:B with integers, e.g. 5 or 5:10; got {text!r}") from None
    if not 0 <= a < b:
        raise SystemExit(f"--concepts A:B needs 0 ≤ A < B (and N ≥ 1); got {text!r}")
    return range(a, b)


def _write(path: str | None, record: dict, t_start: float) -> None:
    if path:
        record["seconds"] = time.perf_counter() - t_start
        tmp = f"{path}.{os.getpid()}.tmp"  # two runs given one --out never share a half-written file
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
