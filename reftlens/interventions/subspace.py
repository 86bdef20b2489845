"""Subspaces with orthonormal rows, and the distributed interchange intervention (DAS)."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from reftlens.errors import ConfigError
from reftlens.interventions.base import Phi, register


def _check_rank(cls: str, d_model: int, rank: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d_model, rank)):
        raise ConfigError(f"{cls}(d_model, rank) takes integers; got d_model={d_model!r}, rank={rank!r}.")
    if not 1 <= rank <= d_model:
        raise ConfigError(
            f"{cls}: rank must be between 1 and d_model={d_model}; got rank={rank}. "
            "A subspace of a d_model-wide hidden state has at most d_model dimensions."
        )


# set_ keeps rows as given (no re-orthonormalisation) when max |R Rᵀ − I| is at most this
ORTHONORMAL_ATOL = 1e-5


class OrthonormalRows(nn.Module):
    """A matrix R ∈ R^{r×d} with orthonormal rows (R Rᵀ = I_r), kept exact through training.

    Parametrised by an unconstrained ``A ∈ R^{d×r}``: R = Qᵀ with Q the reduced QR factor of
    A, signs fixed so diag of the triangular factor is positive (so R is a smooth, unique
    function of A, and A = Rᵀ is a fixed point). One QR of a d×r matrix per forward:
    O(d r²), cheaper than torch's householder parametrisation at ReFT ranks (see
    benchmarks/orthonormal.py) and orthonormal to fp32 rounding whatever the optimiser does.

    Held rows: after :meth:`set_`, R is *exactly* the rows that were set (Aᵀ, bit for bit) for
    as long as A keeps that value, instead of QR(A), which differs from an already orthonormal
    A in the last bits. A loaded checkpoint thus computes with its saved R. The non-persistent
    buffer ``held`` records A's value at ``set_``; the first change to A (an optimiser step,
    ``copy_``, ``load_state_dict`` of other values) ends the hold and R is QR(A) again. A save
    (:mod:`reftlens.saving`) records which rows are held and :meth:`hold` restores it on load.
    Gradients always flow through the QR (while held, the forward value is Aᵀ and the
    backward is QR's), so training behaves the same with or without a hold.
    """

    held: Tensor | None

    def __init__(self, d_model: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        _check_rank(type(self).__name__, d_model, rank)
        a = torch.empty(d_model, rank)
        nn.init.orthogonal_(a, generator=generator)
        self.A = nn.Parameter(a)
        self.register_buffer("held", None, persistent=False)

    def _qr(self) -> Float[Tensor, "r d"]:
        q, r = torch.linalg.qr(self.A.float())
        sign = torch.sign(torch.diagonal(r))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        # R is returned as the transpose of a row-major [d, r] matrix, like A.T (and like
        # pyreft's rotate_layer.weight [d, r]): held or not, R has one memory layout, so the
        # same matmul kernels (and bits) follow from the same values
        return (q * sign).to(self.A.dtype).contiguous().T

    @property
    def is_held(self) -> bool:
        """Whether R is currently the held value Aᵀ (set by :meth:`set_`, A unchanged since)."""
        held, A = self.held, self.A
        return (
            held is not None
            and held.shape == A.shape
            and held.dtype == A.dtype
            and held.device == A.device
            and torch.equal(held, A.detach())
        )

    @property
    def weight(self) -> Float[Tensor, "r d"]:
        if not self.is_held:
            return self._qr()
        exact = self.A.detach().T.clone()  # a copy with A.T's layout, as the QR path returns
        if not (torch.is_grad_enabled() and self.A.requires_grad):
            return exact
        qr = self._qr()
        return exact + (qr - qr.detach())  # value: exactly Aᵀ (qr − qr is 0); gradient: QR's

    @torch.no_grad()
    def set_(self, rows: Float[Tensor, "r d"], atol: float = ORTHONORMAL_ATOL) -> "OrthonormalRows":
        """Set R to ``rows``, exactly when they are orthonormal (max |R Rᵀ − I| ≤ ``atol``),
        else to their orthonormalisation (QR). Either way R is held at that value, bit for bit,
        until A changes (see the class docstring)."""
        if rows.shape != self.A.T.shape:
            raise ValueError(f"Expected R of shape {tuple(self.A.T.shape)}; got {tuple(rows.shape)}.")
        self.A.copy_(rows.T.to(self.A))
        work = self.A.double()
        err = (work.T @ work - torch.eye(work.shape[1], dtype=torch.float64, device=work.device)).abs().max().item()
        if not err <= atol:
            self.A.copy_(self._qr().T)
        return self.hold()

    @torch.no_grad()
    def hold(self) -> "OrthonormalRows":
        """Hold R at Aᵀ as A is now, bit for bit, until A changes (what :meth:`set_` ends with).
        For an A that was held when it was saved; any other A should go through :meth:`set_`."""
        self.held = self.A.detach().clone()
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
