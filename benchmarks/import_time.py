"""``import reftlens`` as a ratio to ``import torch``, each in fresh processes.

reftlens imports torch and its own modules; TransformerLens and transformers load only when a
model is loaded (a test checks that property). What is left to measure is what reftlens adds to
torch's own import: a ratio, so it means the same on a fast and a slow machine. Each run is a
fresh interpreter that times its one import; the two arms alternate, and the medians are
compared.

    python3 benchmarks/import_time.py            # --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import add_load_argument, environment_line, headline, interleave, wait_for_load

ROOT = Path(__file__).resolve().parents[1]
TIMED = "import time; t = time.perf_counter(); import {0}; print(time.perf_counter() - t)"


def import_seconds(module: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", TIMED.format(module)], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    )
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per arm (median)")
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    import_seconds("reftlens")  # warm the file cache once, for both arms
    # each arm's own measurement of its import, in a fresh interpreter, the arms alternating
    runs = interleave({m: (lambda m=m: import_seconds(m)) for m in ("torch", "reftlens")}, args.runs, keep="all")
    times = runs.results
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["reftlens"] / med["torch"]
    print(environment_line())
    for k, v in times.items():
        print(f"import {k:<9} median {med[k]:.3f} s  ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"import reftlens / import torch: {ratio:.2f}x (median of {args.runs} fresh processes each)")
    headline("import_time", "import reftlens / import torch", ratio, note=f"median of {args.runs} fresh processes")


if __name__ == "__main__":
    main()
