"""The benchmark harness: what every benchmark needs besides its own workload.

One module, used by every script in ``benchmarks/`` (and by ``peers/pyreft_bench.py`` inside the
pyreft venv, so nothing here imports more than the standard library at its top):

- **the machine**: :func:`machine` (CPU, instruction set, cores, memory, threads),
  :func:`versions`, :func:`environment` / :func:`environment_line` (what the report prints);
- **a quiet machine**: :func:`load1`, :func:`wait_for_load` and :func:`add_load_argument`
  (``--max-load``: wait, 60 s at a time, for the 1-min load average to drop);
- **side-by-side timing**: :func:`timed` (wall and CPU seconds of one call),
  :func:`interleave` (arms run in turn, the first arm rotating each rep), :func:`compare` /
  :func:`side_by_side` (medians, ratio of medians, median of per-pair ratios), :func:`repeat`
  (median of repeats of one call);
- **peak memory**: :func:`rss_mb`, :func:`reset_peak`, :func:`peak_rss` (Linux ``VmHWM`` after
  ``/proc/self/clear_refs``);
- **headline rows**: :func:`headline` prints one ``::headline::`` JSON line that ``report.py``
  gathers into the table of ``benchmarks/REPORT.md``; :func:`parse_headlines` reads them back;
  :func:`table` renders a Markdown table.

A headline line looks like ``::headline:: {"benchmark": ..., "metric": ..., "value": ...}``.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

MARK = "::headline::"

# ------------------------------------------------------------------------------------ the machine


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def instruction_set() -> str:
    """torch's vector capability and the bfloat16 units, e.g. ``"AVX512, avx512_bf16"`` or ``"AVX2, no native bf16"``."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    flags = getattr(torch.cpu, "get_capabilities", dict)()
    bf16 = [f for f in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16") if flags.get(f)]
    return f"{capability}, {'+'.join(bf16) if bf16 else 'no native bf16'}"


def _mem_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def machine() -> dict:
    """The machine as a record (for a benchmark's JSON): CPU name, architecture, instruction set,
    cores, memory (GiB), torch threads, and whether it has bfloat16 units."""
    import torch

    isa = instruction_set()
    return dict(
        cpu=cpu_name(),
        arch=platform.machine(),
        isa=isa,
        cores=os.cpu_count(),
        mem_gib=round(_mem_gib(), 1),
        threads=torch.get_num_threads(),
        amx_bf16="amx_bf16" in isa,
        avx512_bf16="avx512_bf16" in isa,
    )


def machine_line(m: dict | None = None) -> str:
    """One line for a machine record (also one written by an older benchmark, without ``isa``)."""
    m = m or machine()
    isa = f", {m['isa']}" if m.get("isa") else (", AMX-bf16" if m.get("amx_bf16") else "")
    return f"{m['cpu']} ({m.get('arch', '?')}{isa}), {m['cores']} cores, {m.get('mem_gib', '?')} GiB, {m['threads']} torch threads"


def versions(dists: Sequence[str] = ("torch", "transformers", "transformer-lens", "reftlens")) -> dict:
    """Python's and each distribution's version ("not installed" when absent)."""
    return {"python": platform.python_version(), **{d: _version(d) for d in dists}}


def environment() -> dict:
    """Machine, thread count and library versions, as the report prints them."""
    import torch

    v = versions()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()} ({platform.machine()}, {instruction_set()}), {os.cpu_count()} cores, {_mem_gib():.1f} GiB",
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        **v,
    }


def environment_line() -> str:
    e = environment()
    return (
        f"# {e['machine']}, {e['torch_threads']} torch threads; python {e['python']}, torch {e['torch']}, "
        f"transformers {e['transformers']}, transformer-lens {e['transformer-lens']}, reftlens {e['reftlens']}"
    )


# ------------------------------------------------------------------------------ a quiet machine


def load1() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def wait_for_load(max_load: float | None, tries: int = 5, wait_s: float = 60.0, log: list | None = None) -> list[float]:
    """Wait (``wait_s`` at a time, at most ``tries`` times) for the 1-min load average to drop below
    ``max_load``; ``None`` does not wait. Returns the loads seen (each also appended to ``log`` as
    ``{"time", "load1"}``). Call it once, before the first measurement: later, the load average
    includes the benchmark's own work."""
    seen: list[float] = []

    def look() -> float:
        seen.append(load1())
        if log is not None:
            log.append(dict(time=time.strftime("%H:%M:%S"), load1=seen[-1]))
        return seen[-1]

    look()
    if max_load is None:
        return seen
    for i in range(tries):
        if seen[-1] < max_load:
            return seen
        print(
            f"# load {seen[-1]:.2f} >= {max_load}: waiting {wait_s:.0f} s ({i + 1}/{tries})",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(wait_s)
        look()
    if seen[-1] >= max_load:
        print(f"# load still >= {max_load}; measuring anyway (recorded)", file=sys.stderr, flush=True)
    return seen


def add_load_argument(ap: Any) -> None:
    """``--max-load`` (and ``--load-tries``) on an ``argparse`` parser, for :func:`wait_for_load`."""
    ap.add_argument(
        "--max-load", type=float, default=None, help="first wait (60 s at a time) for a 1-min load average below this"
    )
    ap.add_argument("--load-tries", type=int, default=5, help="how many 60 s waits --max-load allows")


# ------------------------------------------------------------------------------------- timing

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Timed:
    wall: float  # seconds
    cpu: float  # this process's CPU seconds, every thread's (not the time other jobs hold the cores)
    result: Any


def timed(fn: Callable[[], Any]) -> Timed:
    """One call of ``fn``: wall seconds, CPU seconds of this process, and its result."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return Timed(time.perf_counter() - t, time.process_time() - c, out)


def repeat(fn: Callable[[], Any], reps: int = 1, *, budget_s: float = 0.0, max_reps: int = 9) -> tuple[float, Any]:
    """(median wall seconds, first result) over ``reps`` calls; with ``budget_s``, more calls (up to
    ``max_reps``) while their total stays under it, so short runs get a steadier median."""
    first = timed(fn)
    times = [first.wall]
    while len(times) < reps or (sum(times) < budget_s and len(times) < max_reps):
        times.append(timed(fn).wall)
    return statistics.median(times), first.result


@dataclass(frozen=True)
class Interleaved:
    times: dict[str, list[float]]  # per arm, the measured reps (after warm-up) on the chosen clock, in order
    cpu: dict[str, list[float]]  # the same reps' CPU seconds of this process
    results: dict[str, list[Any]]  # per arm, what the measured calls returned (as ``keep`` says)

    def median(self, arm: str) -> float:
        return statistics.median(self.times[arm])


def interleave(
    arms: dict[str, Callable[..., Any]],
    reps: int,
    *,
    warmup: int = 0,
    inputs: Sequence[Any] | None = None,
    clock: str = "wall",
    keep: str = "none",
) -> Interleaved:
    """Run every arm once per rep, the first arm rotating from rep to rep (with two arms: a b, b a,
    a b, ...), so drifting machine load and cache state hit every arm alike. ``warmup`` reps run
    the same way and are not kept. With ``inputs``, rep ``i`` calls each arm with
    ``inputs[i % len(inputs)]`` (e.g. the same batch for every arm). ``keep``: which results to keep,
    ``"none"`` (a forward's logits can be hundreds of MB: each is dropped before the next call),
    ``"last"`` (each arm's last) or ``"all"``."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}; got {clock!r}")
    if keep not in ("none", "last", "all"):
        raise ValueError(f"keep must be 'none', 'last' or 'all'; got {keep!r}")
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, list[Any]] = {n: [] for n in names}
    for i in range(warmup + reps):
        args = () if inputs is None else (inputs[i % len(inputs)],)
        k = i % len(names)
        for n in names[k:] + names[:k]:
            if keep == "last":
                results[n].clear()  # before the call: never two results of an arm alive at once
            t = timed(lambda n=n: arms[n](*args))  # noqa: B023 (called at once)
            if i >= warmup:
                times[n].append(t.wall if clock == "wall" else t.cpu)
                cpu[n].append(t.cpu)
                if keep != "none":
                    results[n].append(t.result)
            del t
    return Interleaved(times, cpu, results)


@dataclass(frozen=True)
class Comparison:
    base_s: float  # median seconds of the base arm
    other_s: float  # median seconds of the other arm
    ratio: float  # other / base, ratio of the medians
    paired: float  # median of the per-rep ratios other / base: robust to drift between reps
    delta_s: float  # median of the per-rep differences other - base


def compare(base: Sequence[float], other: Sequence[float]) -> Comparison:
    """Two arms' paired timings (rep ``i`` of each ran back to back)."""
    b, o = statistics.median(base), statistics.median(other)
    return Comparison(
        base_s=b,
        other_s=o,
        ratio=o / b,
        paired=statistics.median(y / x for x, y in zip(base, other)),
        delta_s=statistics.median(y - x for x, y in zip(base, other)),
    )


def side_by_side(
    base: Callable[[], Any], other: Callable[[], Any], reps: int, *, warmup: int = 0, clock: str = "wall"
) -> Comparison:
    """:func:`interleave` two calls and :func:`compare` them."""
    r = interleave({"base": base, "other": other}, reps, warmup=warmup, clock=clock)
    return compare(r.times["base"], r.times["other"])


# --------------------------------------------------------------------------------- peak memory


def rss_mb(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MB (``VmRSS`` now, ``VmHWM`` the peak); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    """Hand freed memory back (``malloc_trim``), reset the peak-RSS mark to the current RSS, and
    return the current RSS (MB). Linux >= 4.0 (``/proc/self/clear_refs``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    return rss_mb("VmRSS")


def peak_rss(fn: Callable[[], Any]) -> dict:
    """Run ``fn`` and measure its peak RSS above the RSS at its start: ``{"rss_before_mb",
    "peak_rss_mb", "peak_rss_delta_mb", "result"}``. Use a fresh process per arm: the allocator
    keeps what an earlier arm freed."""
    before = reset_peak()
    out = fn()
    peak = rss_mb("VmHWM")
    return dict(rss_before_mb=before, peak_rss_mb=peak, peak_rss_delta_mb=peak - before, result=out)


# ------------------------------------------------------------------------------ headline rows


def command() -> str:
    """How this benchmark was started, as run from the repository root (``python benchmarks/x.py ...``),
    whatever the working directory or absolute path it was started with."""
    script = os.path.abspath(sys.argv[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = os.path.relpath(script, root) if script.startswith(root + os.sep) else sys.argv[0]
    return " ".join(["python", shown, *sys.argv[1:]])


def headline(
    benchmark: str,
    metric: str,
    value: float,
    *,
    target: str = "",
    met: bool | None = None,
    peer: str = "",
    note: str = "",
) -> None:
    """Print one headline result. ``value`` is a ratio as the metric's name states it
    ("reftlens / floor", "speed-up"); ``target`` the issue's target in words ("≤ 1.02×")."""
    record = {
        "benchmark": benchmark,
        "metric": metric,
        "value": float(value),
        "target": target,
        "met": met,
        "peer": peer,
        "note": note,
        "command": command(),
    }
    print(f"{MARK} {json.dumps(record, ensure_ascii=False)}", flush=True)


def parse_headlines(text: str) -> tuple[list[dict], str]:
    """The headline records in a benchmark's output, and the output without them."""
    records, rest = [], []
    for line in text.splitlines():
        if line.startswith(MARK):
            records.append(json.loads(line[len(MARK) :]))
        else:
            rest.append(line)
    return records, "\n".join(rest)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells as given: format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------- shared workload bits

PAPER_LAYERS = [3, 9, 18, 24]  # LoReFT's instruction-tuning layers (Wu et al. 2024), for a 30-layer model


def paper_layers(n_layers: int) -> list[int]:
    """The paper's layers 3;9;18;24 on a model deep enough, else the same fractions of the depth."""
    if n_layers >= 25:
        return list(PAPER_LAYERS)
    return sorted({max(0, round(n_layers * f) - 1) for f in (0.125, 0.375, 0.625, 0.875)})
