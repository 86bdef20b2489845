"""Re-execute the tutorials in place with full settings and store their outputs.

    python tutorials/run_all.py                 # all notebooks
    python tutorials/run_all.py 03_das.ipynb    # some of them

Each notebook runs top to bottom in a fresh ``python3`` kernel with ``REFTLENS_CI`` unset (the
full settings; ``tests/test_tutorials.py`` runs them scaled down), offline, in a temporary
working directory (the files the notebooks save are thrown away). The executed notebook replaces
the stored one only when every cell succeeded.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 1800


def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="reftlens-tutorial-") as tmp:
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
                                         resources={"metadata": {"path": tmp}})
        t0 = time.perf_counter()
        client.execute()
        took = time.perf_counter() - t0
    nbformat.write(nb, path)
    return took


def main(argv: list[str]) -> int:
    os.environ.pop("REFTLENS_CI", None)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    paths = [HERE / a for a in argv] if argv else sorted(HERE.glob("[0-9]*.ipynb"))
    total = 0.0
    for path in paths:
        print(f"{path.name} ...", end=" ", flush=True)
        try:
            took = run(path)
        except nbclient.exceptions.CellExecutionError as e:
            print(f"FAILED (stored notebook left unchanged)\n{e}")
            return 1
        total += took
        print(f"{took:.0f} s")
    print(f"total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
