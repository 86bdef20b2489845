"""How to keep R's rows orthonormal: reftlens's QR parametrisation vs torch's
``parametrizations.orthogonal`` (what pyreft uses; householder for non-square R, and the
matrix_exp / cayley maps for comparison).

For each: microseconds per forward+backward of LoReFT's projection at ReFT sizes, and
max |R Rᵀ − I| after 500 Adam steps at a large learning rate.

    python benchmarks/orthonormal.py
    python benchmarks/orthonormal.py --reps 5 --steps 5     # a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_load_argument, environment_line, headline, wait_for_load
from torch import nn
from torch.nn.utils import parametrizations

from reftlens.interventions import OrthonormalRows


class TorchOrthogonal(nn.Module):
    def __init__(self, d: int, r: int, orthogonal_map: str | None):
        super().__init__()
        self.lin = parametrizations.orthogonal(nn.Linear(d, r, bias=False), orthogonal_map=orthogonal_map)

    @property
    def weight(self) -> torch.Tensor:
        return self.lin.weight


def make(kind: str, d: int, r: int) -> nn.Module:
    torch.manual_seed(0)
    return OrthonormalRows(d, r) if kind == "qr (reftlens)" else TorchOrthogonal(d, r, kind.split()[-1])


def time_step(m: nn.Module, d: int, reps: int = 200) -> float:
    h = torch.randn(80, d)  # a batch of 8 × (f5+l5) rows
    for _ in range(10):
        R = m.weight
        ((h @ R.T) @ R).sum().backward()
    t = time.perf_counter()
    for _ in range(reps):
        R = m.weight
        ((h @ R.T) @ R).sum().backward()
    return (time.perf_counter() - t) / reps * 1e6


def drift(m: nn.Module, d: int, r: int, steps: int = 500) -> float:
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    target = torch.randn(64, d)
    for _ in range(steps):
        h = torch.randn(64, d)
        R = m.weight
        loss = ((h @ R.T) @ R - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        R = m.weight
        return (R @ R.T - torch.eye(r)).abs().max().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200, help="timed forward+backward passes per parametrisation")
    ap.add_argument("--steps", type=int, default=500, help="Adam steps for the drift measurement")
    add_load_argument(ap)
    args = ap.parse_args()
    wait_for_load(args.max_load, args.load_tries)  # before the first measurement
    kinds = ["qr (reftlens)", "torch householder", "torch matrix_exp", "torch cayley"]
    print(environment_line())
    print(f"| parametrisation | d_model | rank | µs / fwd+bwd | max abs(R Rᵀ − I) after {args.steps} Adam steps |")
    print("|---|---|---|---|---|")
    for d, r in [(576, 4), (576, 32), (64, 4)]:
        times = {}
        for kind in kinds:
            us = time_step(make(kind, d, r), d, args.reps)
            err = drift(make(kind, d, r), d, r, args.steps)
            print(f"| {kind} | {d} | {r} | {us:.0f} | {err:.1e} |", flush=True)
            times[kind] = us
        headline(
            "orthonormal",
            f"speed-up of QR over torch householder (pyreft's), fwd+bwd, d={d} r={r}",
            times["torch householder"] / times["qr (reftlens)"],
            peer="torch.nn.utils.parametrizations.orthogonal",
        )


if __name__ == "__main__":
    main()
