"""How long does the main job (``python3 -m reftlens demo``) take on a CPU we do not have? (issue 23 §5)

The demo was timed on a 2-core AMD EPYC Zen 3 at 2.0 GHz (AVX2 only): 19 s per step of the old demo
(40 steps of 16 examples, prompts with the chat template's system turn), quiet. This script measures,
on this machine and in one run:

- one step of that old demo (the same 16 examples, the same prompts, batch 16; median of ``--steps``
  after a warm-up step), and
- the whole current demo (``python3 -m reftlens demo``: model load, three generations, training,
  save, reload; wall clock),

optionally with torch's kernels held to AVX2 (``--isa avx2``: ``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``), and estimates the current demo's time
on the other CPU as ``demo here × (old step there / old step here)``: the old step is the
calibration, measured on both machines. An estimate, not a measurement: it assumes the whole job
scales like a training step between the two CPUs (model loading and generation are a minority of
the job).

    python benchmarks/demo_time.py --isa avx2            # the estimate for the Zen 3 of issue 23
    python benchmarks/demo_time.py --there-step 19.0     # the other CPU's old step time, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def old_step(steps: int) -> dict:
    """Seconds per step of the old demo (batch 16, prompts with the system turn), in this process."""
    import torch

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel
    from reftlens.cli import demo_data
    from reftlens.training import chat_prompt

    model = reftlens.load_model("smollm2-135m")
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(576, rank=4), layers=[3, 9, 18, 24], positions="f5+l5"))
    rows = [
        {"prompt": chat_prompt(model.tokenizer, r["prompt"]), "completion": r["completion"]}
        for r in demo_data()["train"]
    ]
    times = []
    for k in range(steps + 1):  # one optimizer step per call: its wall time alone
        t0 = time.perf_counter()
        reftlens.train(reft, rows, max_steps=1, batch_size=16, lr=4e-3, seed=k, progress=False)
        times.append(time.perf_counter() - t0)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "step_s": statistics.median(times[1:]),
        "times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=("native", "avx2"), default="native", help="hold torch's kernels to AVX2")
    ap.add_argument("--steps", type=int, default=3, help="old-demo steps timed (after one warm-up)")
    ap.add_argument("--there-step", type=float, default=19.0, help="the other CPU's old-demo step, seconds")
    ap.add_argument("--there", default="AMD EPYC Zen 3, 2.0 GHz, AVX2, 2 cores, quiet (issue 23)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or not (0 < args.there_step < float("inf")):
        ap.error("--steps must be ≥ 1 and --there-step a finite positive number of seconds")
    if args.child:
        print(json.dumps(old_step(args.steps)))
        return

    from common import environment_line, headline

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(AVX2 if args.isa == "avx2" else {})}
    print(environment_line() + f"; kernels: {args.isa}")
    child = [sys.executable, __file__, "--child", "--steps", str(args.steps)]
    done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    old = json.loads(done.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "reftlens", "demo", "--out", str(Path(tmp) / "reft-emoji")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        demo_s = time.perf_counter() - t0
    if run.returncode:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-3000:])
    factor = args.there_step / old["step_s"]
    print(f"kernels in use: {old['capability']}, {old['threads']} torch threads")
    print(f"old demo step here: {old['step_s']:.2f} s (steps {', '.join(f'{t:.2f}' for t in old['times'])})")
    print(f"current demo here: {demo_s:.0f} s (whole job, wall clock)")
    print(f"{args.there}: old step {args.there_step:.1f} s → factor {factor:.2f}")
    print(f"estimated current demo there: {demo_s * factor:.0f} s ({demo_s * factor / 60:.1f} min)")
    print("\n" + "\n".join("  " + line for line in run.stdout.strip().splitlines()[-8:]))
    headline(
        "demo_time",
        f"estimated minutes of the whole demo on {args.there}",
        demo_s * factor / 60,
        target="≤ 3 (about)",
        met=demo_s * factor / 60 <= 3.3,
        note=f"calibrated by the old demo's step; kernels here: {old['capability']}",
    )


if __name__ == "__main__":
    main()
