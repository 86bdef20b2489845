"""Run every benchmark and write one report: benchmarks/REPORT.md (+ benchmarks/report.png).

    python benchmarks/report.py                 # everything, ~90 min on the 2-core CPU machine
    python benchmarks/report.py --only patching_vs_tl orthonormal
    python benchmarks/report.py --quick         # a smoke run: tiny sizes, numbers not meaningful
    python benchmarks/report.py --from-logs     # re-render from the last run's logs
    python benchmarks/report.py --add --only quality_bbc   # run one, put it into the existing report

Each benchmark runs in its own process, one after another (never two at once: they time CPU
work), with the command printed in the report next to its results. Each prints its table
(Markdown) and its headline ratios as ``::headline::`` lines (see common.py); the report
gathers the headlines into one table — reftlens against pyreft, ``transformer_lens.patching``,
plain transformers and LoRA, with each target and whether it is met — plots them, and keeps
every benchmark's full output below. pyreft runs in its own virtual environment
(peers/setup_pyreft_env.sh); without it, the benchmarks that need it fail and the report says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import environment, parse_headlines  # noqa: E402

# name, full arguments, quick arguments, expected minutes (full)
SUITE = [
    (
        "forward_overhead",
        ["--models", "smollm2-135m", "tiny-llama", "tiny-gpt2", "--reps", "40"],
        ["--models", "tiny-llama", "--reps", "2"],
        4,
    ),
    ("orthonormal", [], ["--reps", "5", "--steps", "5"], 4),
    (
        "patching_vs_tl",
        ["--models", "tiny-llama", "tiny-gpt2", "smollm2-135m"],
        ["--models", "tiny-llama", "tiny-gpt2"],
        2,
    ),
    ("attribution_vs_exact", [], ["--pairs", "1", "--hooks", "resid_pre", "--reps", "1", "--tl-pairs", "0"], 4),
    (
        "causal_trace_vs_rome",
        [
            "--prompts",
            "1",
            "--samples",
            "10",
            "--window",
            "10",
            "--plain-start",
            "subject",
            "cell",
            "--max-load",
            "1.2",
        ],
        [
            "--model",
            "tiny-llama",
            "--prompts",
            "1",
            "--samples",
            "2",
            "--window",
            "2",
            "--out",
            ".bench/causal_trace_vs_rome.quick.json",
        ],
        6,
    ),
    ("export_overhead", ["--reps", "16"], ["--reps", "1"], 3),
    ("merge_overhead", ["--reps", "8"], ["--reps", "1"], 4),
    ("train_vs_pyreft", ["--max-load", "1.2"], ["--quick"], 6),
    ("epoch_bbc", ["--articles", "80", "--random-arm", "--max-load", "1.2"], ["--articles", "16"], 10),
    (
        "quality_bbc",
        ["--train", "400", "--test", "200", "--steps", "60", "--batch", "8"],
        ["--train", "16", "--test", "10", "--steps", "2"],
        14,
    ),
    (
        "bank",
        [],
        [
            "--model",
            "tiny-llama",
            "--reps",
            "1",
            "--new-tokens",
            "4",
            "--batch",
            "8",
            "--seq",
            "16",
            "--sets",
            "8",
            "--steps",
            "1",
        ],
        12,
    ),
    ("steering_bbc", [], ["--quick"], 10),
    ("scale", ["--max-load", "1.2"], ["--tiny"], 15),
    ("demo_time", ["--isa", "avx2"], ["--steps", "1"], 5),
    ("steering_axbench", ["--detection-only"], ["--quick"], 20),
    (
        "localize",
        [
            *("--train", "128", "--test", "64", "--steps", "30", "--batch", "8", "--layer-step", "3"),
            *("--positions", "l1,f5+l5", "--no-train-score", "--bbc-words", "40"),
        ],
        ["--quick"],
        35,
    ),
    ("import_time", [], ["--runs", "1"], 1),
]
NAMES = [s[0] for s in SUITE]


def run(name: str, argv: list[str], logs: Path) -> dict:
    cmd = [sys.executable, str(HERE / f"{name}.py"), *argv]
    shown = " ".join(["python", f"benchmarks/{name}.py", *argv])
    print(f"== {shown}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    wall = time.perf_counter() - t
    rec = {
        "name": name,
        "command": shown,
        "wall_s": round(wall, 1),
        "returncode": proc.returncode,
        "stdout": proc.stdout,
        "stderr_tail": proc.stderr[-3000:],
        "env": environment(),
    }
    (logs / f"{name}.json").write_text(json.dumps(rec, indent=1))
    print(f"   {wall:.0f} s, exit {proc.returncode}", file=sys.stderr, flush=True)
    return rec


def fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def render(runs: list[dict], env: dict, quick: bool, plot: str | None) -> str:
    heads = []
    for r in runs:
        hs, _ = parse_headlines(r["stdout"])
        for h in hs:
            h["command"] = r["command"]
        heads += hs
    L = [
        "# Benchmark report",
        "",
        "Generated by `python benchmarks/report.py`"
        + (" --quick (a smoke run: sizes cut, numbers NOT meaningful)" if quick else "")
        + f" on {env['date']}.",
        "",
        f"- machine: {env['machine']}, {env['torch_threads']} torch threads, GPU: {env['cuda']}",
        f"- python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"transformer-lens {env['transformer-lens']}, reftlens {env['reftlens']}",
        "- peers: pyreft 0.1.0 / pyvene 0.1.8 / transformers 4.45.1 in their own venv (`benchmarks/peers/setup_pyreft_env.sh`); "
        "`transformer_lens.patching` and peft (LoRA) in the main environment",
        "",
        "Every ratio comes from one run in which reftlens and its peer were measured side by side; the section of each "
        "benchmark below gives its full table and the command that reproduces it. Every figure is float32 unless its row "
        "or section says bf16, and names its model (SmolLM2-135M-Instruct, tiny test models, or a random model of a "
        "published shape); the machine is the one above unless the section names another.",
        "",
        "## Headline ratios",
        "",
        "| benchmark | metric | measured | target | met | against | command |",
        "|---|---|---|---|---|---|---|",
    ]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731 (a pipe would end the table cell)
    for h in heads:
        met = "" if h.get("met") is None else ("yes" if h["met"] else "**no**")
        note = f" ({h['note']})" if h.get("note") else ""
        L.append(
            f"| {cell(h['benchmark'])} | {cell(h['metric'] + note)} | {fmt(h['value'])} | {cell(h.get('target', ''))} | "
            f"{met} | {cell(h.get('peer', ''))} | `{cell(h['command'])}` |"
        )
    failed = [r for r in runs if r["returncode"] != 0]
    if failed:
        L += [
            "",
            "Benchmarks that failed (exit status ≠ 0): "
            + ", ".join(f"`{r['name']}`" for r in failed)
            + " — their stderr is at the end of their section.",
        ]
    if plot:
        L += ["", f"![headline ratios against their targets]({plot})"]
    for r in runs:
        _, text = parse_headlines(r["stdout"])
        L += ["", f"## {r['name']}", "", f"`{r['command']}` — {r['wall_s']:.0f} s, exit status {r['returncode']}", ""]
        quoted = False
        for line in text.strip().splitlines():
            if line.startswith("## "):
                L.append("#" * 2 + line)  # the benchmark's own sections sit one level down
            elif line.startswith("#"):  # a benchmark's comment lines: quoted, one paragraph each
                L += ["> " + line.lstrip("# "), ">"]
            else:
                if quoted:
                    L[-1] = ""  # end the quote before a table or text
                L.append(line)
            quoted = line.startswith("#") and not line.startswith("## ")
        if quoted:
            L[-1] = ""
        if r["returncode"] != 0:
            L += ["", "```", r["stderr_tail"].strip(), "```"]
    return "\n".join(L) + "\n"


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """A report split at its benchmark sections (``## name`` after the headline table): the head
    (up to the first section) and each section's text by benchmark name."""
    parts = text.split("\n## ")
    head, sections = parts[0], {}
    for part in parts[1:]:
        name = part.split("\n", 1)[0].strip()
        if name == "Headline ratios":
            head += "\n## " + part
        else:
            sections[name] = "## " + part.rstrip("\n")
    return head, sections


def splice(old: str, runs: list[dict], env: dict) -> str:
    """The earlier report ``old`` with the headline rows and sections of ``runs`` replaced (or
    added, in the suite's order). A run made on another machine than the one in the report's
    header is marked † in the table, and its section says where and when it ran."""
    machine = next(
        (
            l[len("- machine: ") :].split(", GPU")[0].rsplit(",", 1)[0]
            for l in old.splitlines()
            if l.startswith("- machine: ")
        ),
        None,
    )
    new_head, new_sections = _sections(render(runs, env, quick=False, plot=None))
    head, sections = _sections(old)
    names = [r["name"] for r in runs]
    elsewhere = env["machine"] != machine
    mark = lambda row: row.replace(f"| {row.split(' | ')[0][2:]} |", f"| {row.split(' | ')[0][2:]}† |", 1)  # noqa: E731
    lines = head.split("\n")
    table = [i for i, l in enumerate(lines) if l.startswith("| ") and not l.startswith("| benchmark |")]
    kept = [lines[i] for i in table if lines[i].split(" | ")[0][2:].rstrip("†") not in names]
    added = [l for l in new_head.split("\n") if l.startswith("| ") and l.split(" | ")[0][2:] in names]
    order = lambda row: NAMES.index(row.split(" | ")[0][2:].rstrip("†"))  # noqa: E731
    rows = sorted(kept + [mark(r) if elsewhere else r for r in added], key=order)
    lines = lines[: table[0]] + rows + lines[table[-1] + 1 :] if table else lines
    note = "† run on another machine than the one above; its section says which."
    if note in lines:
        at = lines.index(note)
        del lines[at - 1 : at + 1]
    if any("† |" in r for r in rows):
        end = lines.index(rows[-1]) + 1
        lines[end:end] = ["", note]
    for name in names:
        text = new_sections[name]
        if elsewhere:
            first, rest = text.split("\n\n", 2)[:2], text.split("\n\n", 2)[2:]
            text = "\n\n".join(
                first
                + [f"Run on {env['machine']}, {env['date']}; added with `python benchmarks/report.py --add`."]
                + rest
            )
        sections[name] = text
    ordered = sorted(sections, key=lambda n: NAMES.index(n) if n in NAMES else len(NAMES))
    return "\n".join(lines).rstrip("\n") + "\n\n" + "\n\n".join(sections[n] for n in ordered) + "\n"


def draw(runs: list[dict], path: Path) -> bool:
    """Each headline that has a target: measured ratio vs its target, on a log axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = []
    for r in runs:
        for h in parse_headlines(r["stdout"])[0]:
            if h.get("target") and h.get("met") is not None:
                digits = "".join(c for c in h["target"] if c.isdigit() or c == ".").rstrip(".")
                try:
                    label = (
                        h["metric"] if len(h["metric"]) <= 70 else "…" + h["metric"][-69:]
                    )  # the tail tells rows apart
                    rows.append((label, h["value"], float(digits), h["met"]))
                except ValueError:
                    continue
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2), dpi=80)
    for i, (label, value, target, met) in enumerate(rows):  # noqa: B007
        ax.barh(i, value, color="tab:green" if met else "tab:red")
        ax.plot([target, target], [i - 0.4, i + 0.4], color="black", lw=2)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (bar) and target (black tick); green = target met")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=NAMES, help="run only these benchmarks")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery, not the numbers")
    ap.add_argument("--from-logs", action="store_true", help="render from --logs without running anything")
    ap.add_argument("--logs", default=str(HERE.parent / ".bench"), help="where each benchmark's output is kept")
    ap.add_argument("--out", default=str(HERE / "REPORT.md"))
    ap.add_argument(
        "--add",
        action="store_true",
        help="replace (or add) only these benchmarks' rows and sections in the existing --out report",
    )
    args = ap.parse_args()
    if args.add and not Path(args.out).exists():  # checked before anything runs
        raise SystemExit(f"--add puts runs into an existing report, and {args.out} does not exist; run without --add.")
    if args.add and args.quick:
        raise SystemExit(
            "--add with --quick would put smoke-run numbers into the report; use --out for a separate one."
        )
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SUITE if not args.only or s[0] in args.only]
    if args.from_logs:
        runs = [
            json.loads((logs / f"{name}.json").read_text()) for name, *_ in chosen if (logs / f"{name}.json").exists()
        ]
    else:
        total = sum(s[3] for s in chosen)
        print(f"# running {len(chosen)} benchmarks" + ("" if args.quick else f", about {total} min"), file=sys.stderr)
        runs = [run(name, quick if args.quick else full, logs) for name, full, quick, _ in chosen]
    out = Path(args.out)
    png = out.with_name("report.png")
    env = runs[0]["env"] if runs else environment()
    if args.add:
        text = splice(out.read_text(), runs, env)  # the plot stays the full run's
        plotted = False
    else:
        plotted = draw(runs, png)
        text = render(runs, env, args.quick, png.name if plotted else None)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}" + (f" and {png}" if plotted else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
