"""Before/after speed check: the same workloads on two git revisions of reftlens, side by side in one run.

Each revision is checked out into its own worktree (``git worktree add --detach`` under a temporary
folder). For each model, one worker process per revision imports reftlens from its worktree
(``PYTHONPATH``; the worker checks where ``reftlens`` came from), loads the model once and builds
the workloads with the same seeds; the parent then asks the two workers in turn, the first one
rotating from rep to rep (``common.interleave``), so drifting machine load hits both alike. Each
worker times its own call (``time.perf_counter`` around the workload only).

Workloads, on tiny-llama and SmolLM2-135M-Instruct (names public in every revision compared):

- ``forward``: ``reft(tokens)`` with a LoReFT set (rank 4, layers 3;9;18;24 — the same depth
  fractions on a small model — positions f5+l5), batch 8 × 128, no grad;
- ``train``: ``reftlens.train(reft, data, max_steps=2, batch_size=8)`` on 16 short examples
  (the call, so its setup is in the time too);
- ``generate``: ``reft.generate`` of 8 prompts, 32 new tokens, greedy, EOS not stopping;
- ``bank64``: a bank of 64 LoReFT sets, forward of 32 × 128 tokens, each row its set (``adapters=``);
- ``patch_sweep``: ``reftlens.analysis.patch_sweep`` over resid_pre (layers × positions) of one
  clean/corrupted pair, logit-difference metric, default strategy.

Per workload: the median seconds of each revision, after / before as the ratio of the medians
and as the median of per-rep ratios, and whether the ratio of medians is within ``--tolerance``
(3%); and whether the two revisions returned the same output (forward logits, generated text,
the sweep's grid; not compared for ``train``, whose weights move). On a machine shared with other
work the ratios carry its noise: use ``--max-load``.

    python benchmarks/compare_commits.py                          # --before 21f14a2 --after HEAD
    python benchmarks/compare_commits.py --before main --after . # "." = this checkout as it is, uncommitted edits too
    python benchmarks/compare_commits.py --tiny --reps 2          # smoke run: tiny-llama, small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    add_load_argument,
    compare,
    environment_line,
    interleave,
    load1,
    paper_layers,
    table,
    timed,
    versions,
    wait_for_load,
)

WORKLOADS = ["forward", "train", "generate", "bank64", "patch_sweep"]
MODELS = ["tiny-llama", "smollm2-135m"]
REPLY = "::compare_commits::"


# --------------------------------------------------------------------------- worker (one revision)


def build(name: str, model, tiny: bool):
    """The zero-argument call timed for workload ``name``; built from the public names only."""
    import torch

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel

    d, n = model.cfg.d_model, model.cfg.n_layers
    batch, seq = (4, 32) if tiny else (8, 128)

    def loreft_set(seed: int):
        torch.manual_seed(seed)
        phi = LoReFT(d, 4, init="random")
        return Intervention(phi, layers=paper_layers(n), positions="f5+l5")

    torch.manual_seed(0)
    tokens = torch.randint(5, model.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    if name == "forward":
        reft = ReftModel(model, loreft_set(0))

        def run():
            with torch.no_grad():
                return reft(tokens)

        return run
    if name == "train":
        reft = ReftModel(model, loreft_set(0))
        words = ["river", "garden", "planet", "violin", "harbour", "lantern", "meadow", "engine"]
        data = [
            {"prompt": f"Describe the {words[i % 8]} in a few words.", "completion": f" The {words[i % 8]} is {i}."}
            for i in range(16)
        ]

        def run():  # the weights move on every call, so the output is not compared
            reftlens.train(reft, data, max_steps=2, batch_size=8, lr=1e-3, progress=False, seed=0)

        return run
    if name == "generate":
        reft = ReftModel(model, loreft_set(0))
        prompts = [f"Question {i}: name a colour." for i in range(8 if not tiny else 4)]
        new = 8 if tiny else 32
        return lambda: reft.generate(prompts, max_new_tokens=new, eos_token_id=None)
    if name == "bank64":
        sets = 16 if tiny else 64
        bank = ReftModel(model, {f"s{k}": [loreft_set(k)] for k in range(sets)})
        rows = 8 if tiny else 32
        bank_tokens = torch.randint(5, model.cfg.d_vocab, (rows, seq), generator=torch.Generator().manual_seed(1))
        adapters = [f"s{(k * sets) // rows}" for k in range(rows)]  # spread over the whole bank

        def run():
            with torch.no_grad():
                return bank(bank_tokens, adapters=adapters)

        return run
    if name == "patch_sweep":
        from reftlens.analysis import patch_sweep

        clean = corrupt = None
        if model.cfg.n_layers >= 25:  # SmolLM2: a factual pair of equal token counts
            clean = model.to_tokens("The Eiffel Tower is located in the city of")
            corrupt = model.to_tokens("The Colosseum is located in the city of")
            a = model.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
            b = model.tokenizer(" Rome", add_special_tokens=False)["input_ids"][0]
        if clean is None or clean.shape != corrupt.shape:
            clean = torch.randint(5, model.cfg.d_vocab, (1, 10), generator=torch.Generator().manual_seed(2))
            corrupt = clean.clone()
            corrupt[0, 2] = (corrupt[0, 2] + 1) % model.cfg.d_vocab
            a, b = 5, 7

        def metric(logits):
            return logits[:, -1, a] - logits[:, -1, b]

        def run():
            with torch.no_grad():
                return patch_sweep(model, clean, corrupt, metric, batched=True).values

        return run
    raise SystemExit(f"unknown workload {name!r}; choose from {WORKLOADS}")


def digest(x) -> float | str | None:
    """What a call returned, small enough to send: a tensor's sum of squares, text's hash."""
    import hashlib

    import torch

    if isinstance(x, torch.Tensor):
        return float(x.detach().double().square().sum())
    if x is None:
        return None
    return hashlib.sha256(json.dumps(x, default=str).encode()).hexdigest()[:16]


def same(a, b) -> bool | None:
    if a is None or b is None:
        return None
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-12)
    return a == b


def worker(args) -> None:
    """Serve one revision: read one JSON command a line on stdin, answer one line on the real stdout
    (everything else the libraries print goes to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import reftlens

    def reply(**kw) -> None:
        out.write(REPLY + json.dumps(kw) + "\n")

    reply(reftlens=str(Path(reftlens.__file__).resolve().parent))  # checked before the model loads
    model = reftlens.load_model(args.model)
    calls = {}
    reply(ready=True, threads=torch.get_num_threads())
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "setup":
            calls[cmd["workload"]] = build(cmd["workload"], model, args.tiny)
            reply(ok=True)
        elif cmd["op"] == "run":
            t = timed(calls[cmd["workload"]])
            reply(wall=t.wall, cpu=t.cpu, digest=digest(t.result))


# --------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, label: str, tree: Path, model: str, args, log: Path):
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model]
        cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--tiny"] if args.tiny else [])
        self.label, self.log = label, log
        self.stderr = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=tree
        )
        where = Path(self.read()["reftlens"])
        if tree.resolve() not in where.parents:
            self.close(kill=True)
            raise SystemExit(f"{label}: reftlens was imported from {where}, not from the worktree {tree}")
        self.threads = self.read()["threads"]

    def read(self) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.close()
        tail = self.log.read_text()[-3000:]
        raise SystemExit(f"the {self.label} worker stopped (exit {self.proc.wait()}); its stderr ends:\n{tail}")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self, kill: bool = False) -> None:
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.stderr.close()


def git(repo: Path, *argv: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True, text=True).stdout.strip()


def checkout(repo: Path, rev: str, where: Path) -> tuple[Path, str]:
    """A worktree of ``rev`` at ``where`` (``"."``: the checkout itself, as it is); its description."""
    if rev == ".":
        dirty = " + uncommitted changes" if git(repo, "status", "--porcelain", "--untracked-files=no") else ""
        return repo, f"this checkout ({git(repo, 'rev-parse', '--short', 'HEAD')}{dirty})"
    sha = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    git(repo, "worktree", "add", "--detach", str(where), sha)
    return where, f"{rev} = {sha[:9]} ({git(repo, 'log', '-1', '--format=%s', sha)[:70]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="21f14a2", help="git revision measured as the base (default 21f14a2)")
    ap.add_argument("--after", default="HEAD", help="git revision compared with it; '.' = this checkout as it is")
    ap.add_argument("--models", nargs="+", default=None, help=f"default {' '.join(MODELS)} (--tiny: tiny-llama)")
    ap.add_argument("--workloads", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    ap.add_argument("--reps", type=int, default=9, help="timed calls per revision and workload (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each first")
    ap.add_argument("--tolerance", type=float, default=0.03, help="|after / before - 1| counted as no change")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker (default: torch's)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: tiny-llama only, small sizes")
    ap.add_argument("--out", default=str(HERE.parent / ".bench" / "compare_commits.json"))
    ap.add_argument("--keep", action="store_true", help="keep the worktrees (their folder is printed)")
    add_load_argument(ap)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.reps < 1 or args.warmup < 0 or not 0 < args.tolerance < 1:
        ap.error("--reps must be ≥ 1, --warmup ≥ 0 and --tolerance in (0, 1)")
    models = args.models or (["tiny-llama"] if args.tiny else MODELS)
    repo = Path(git(HERE, "rev-parse", "--show-toplevel"))
    tmp = Path(tempfile.mkdtemp(prefix="reftlens-compare-"))
    made: list[Path] = []
    rows, record = [], {}
    try:
        trees, described = {}, {}
        for label, rev in (("before", args.before), ("after", args.after)):
            trees[label], described[label] = checkout(repo, rev, tmp / label)
            if trees[label] != repo:
                made.append(trees[label])
        print(f"# before: {described['before']}")
        print(f"# after:  {described['after']}")
        load = wait_for_load(args.max_load, args.load_tries)
        print(environment_line())
        print(
            f"# {args.reps} interleaved reps after {args.warmup} warm-up per workload, each revision in its own "
            f"process; 1-min load average {load[-1]:.2f} at the start" + ("; --tiny: sizes cut" if args.tiny else "")
        )
        for model in models:
            workers = {}
            try:
                for label in trees:
                    workers[label] = Worker(label, trees[label], model, args, tmp / f"{label}.{model}.log")
                for w in args.workloads:
                    for wk in workers.values():
                        wk.ask(op="setup", workload=w)
                    arms = {label: (lambda wk=wk, w=w: wk.ask(op="run", workload=w)) for label, wk in workers.items()}
                    r = interleave(arms, args.reps, warmup=args.warmup, keep="all")
                    before = [x["wall"] for x in r.results["before"]]
                    after = [x["wall"] for x in r.results["after"]]
                    c = compare(before, after)
                    ok = abs(c.ratio - 1) <= args.tolerance
                    equal = same(r.results["before"][-1]["digest"], r.results["after"][-1]["digest"])
                    rows.append((model, w, c, ok, equal))
                    record[f"{model}/{w}"] = dict(
                        before_s=before,
                        after_s=after,
                        ratio_of_medians=c.ratio,
                        paired=c.paired,
                        within=ok,
                        same_output=equal,
                    )
                    print(f"# {model} {w}: after / before {c.ratio:.3f}", file=sys.stderr, flush=True)
            finally:
                for wk in workers.values():
                    wk.close()
    finally:
        for tree in made:
            if args.keep:
                continue
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        if args.keep:
            print(f"# worktrees and worker logs kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    head = ["model", "workload", "before (s)", "after (s)", "after / before (medians)", "paired"]
    head += [f"within ±{100 * args.tolerance:g}%", "same output"]
    yes = {True: "yes", False: "**no**", None: "–"}
    print(
        table(
            head,
            [
                [m, w, f"{c.base_s:.4f}", f"{c.other_s:.4f}", f"{c.ratio:.3f}", f"{c.paired:.3f}", yes[ok], yes[eq]]
                for m, w, c, ok, eq in rows
            ],
        )
    )
    print(f"\n# 1-min load average at the end: {load1():.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            dict(
                before=described["before"],
                after=described["after"],
                args={k: v for k, v in vars(args).items() if k not in ("worker", "model")},
                versions=versions(),
                load1_start=load,
                results=record,
            ),
            indent=1,
        )
        + "\n"
    )
    print(f"# JSON: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
