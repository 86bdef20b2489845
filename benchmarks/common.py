"""What every benchmark reports besides its table: the machine and versions, and its headline
ratios as one machine-readable line each (``report.py`` collects them into one table).

A headline line looks like ``::headline:: {"benchmark": ..., "metric": ..., "value": ...}``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib import metadata

MARK = "::headline::"


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


def environment() -> dict:
    """Machine, thread count and library versions, as the report prints them."""
    import torch

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()} ({platform.machine()}, {instruction_set()}), {os.cpu_count()} cores, {mem:.1f} GiB",
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "transformer-lens": _version("transformer-lens"),
        "reftlens": _version("reftlens"),
    }


def environment_line() -> str:
    e = environment()
    return (
        f"# {e['machine']}, {e['torch_threads']} torch threads; python {e['python']}, torch {e['torch']}, "
        f"transformers {e['transformers']}, transformer-lens {e['transformer-lens']}, reftlens {e['reftlens']}"
    )


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
