"""Subspaces with orthonormal rows, and the distributed interchange intervention (DAS)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from reftlens.interventions.base import Phi, register


def _check_rank(cls: str, d_model: int, rank: int) -> None:
    if not (isinstance(d_model, int) and isinstance(rank, int)):
        raise TypeError(f"{cls}(d_model, rank) takes integers; got d_model={d_model!r}, rank={rank!r}.")
    if not 1 <= rank <= d_model:
        raise ValueError(
            f"{cls}: rank must be between 1 and d_model={d_model}; got rank={rank}. "
            "A subspace of a d_model-wide hidden state has at most d_model dimensions."
        )


class OrthonormalRows(nn.Module):
    """A matrix R ∈ R^{r×d} with orthonormal rows (R Rᵀ = I_r), kept exact through training.

    Parametrised by an unconstrained ``A ∈ R^{d×r}``: R = Qᵀ with Q the reduced QR factor of
    A, signs fixed so diag of the triangular factor is positive (so R is a smooth, unique
    function of A, and A = Rᵀ is a fixed point). One QR of a d×r matrix per forward:
    O(d r²), cheaper than torch's householder parametrisation at ReFT ranks (see
    benchmarks/orthonormal.py) and orthonormal to fp32 rounding whatever the optimiser does.
    """

    def __init__(self, d_model: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        _check_rank(type(self).__name__, d_model, rank)
        a = torch.empty(d_model, rank)
        nn.init.orthogonal_(a, generator=generator)
        self.A = nn.Parameter(a)

    @property
    def weight(self) -> Float[Tensor, "r d"]:
        q, r = torch.linalg.qr(self.A.float())
        sign = torch.sign(torch.diagonal(r))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (q * sign).T.to(self.A.dtype)

    @torch.no_grad()
    def set_(self, rows: Float[Tensor, "r d"]) -> "OrthonormalRows":
        """Set R to ``rows`` (orthonormalised if they are not already)."""
        if rows.shape != self.A.T.shape:
            raise ValueError(f"Expected R of shape {tuple(self.A.T.shape)}; got {tuple(rows.shape)}.")
        self.A.copy_(rows.T.to(self.A))
        self.A.copy_(self.weight.T)
        return self


@register("dii")
class DII(Phi):
    """Distributed interchange intervention (DAS): Φ(b, s) = b + Rᵀ(Rs − Rb), R orthonormal rows.

    >>> dii = DII(4, rank=4)                      # a full-rank R makes DII an interchange
    >>> b, s = torch.randn(2, 4), torch.randn(2, 4)
    >>> torch.allclose(dii(b, s), s, atol=1e-5)
    True
    """

    takes_source = True

    def __init__(self, d_model: int, rank: int):
        super().__init__()
        _check_rank("DII", d_model, rank)
        self.d_model, self.rank = d_model, rank
        self.R = OrthonormalRows(d_model, rank)

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "rank": self.rank}

    def forward(self, base: Float[Tensor, "... d"], source: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        R = self.R.weight
        return base + (source @ R.T - base @ R.T) @ R
