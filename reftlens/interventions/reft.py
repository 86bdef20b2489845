"""The ReFT family (Wu et al. 2024, §3): Φs that train on a frozen model's hidden states.

Each ``forward`` is the paper's equation. ``init="identity"`` (the default, where the math
allows it) starts Φ at the identity, as LoRA starts at zero, so training begins from the
base model's own loss; ``init="random"`` reproduces pyreft's initialisation. ``dropout``
acts on the edit Φ(h) − h only, never on the hidden state itself. ``bias=False`` drops the
learned shift b (Φ becomes linear: what :func:`reftlens.merge` needs on a projection that has no
bias of its own, such as Qwen2's ``o_proj``).

Every Φ here is affine, and ``affine()`` returns it as h + up·(down·h + shift) (see
:class:`~reftlens.interventions.base.Affine`): the form that folds into weights.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from reftlens.errors import ConfigError
from reftlens.interventions.base import Affine, Phi, finite_number, low_rank_many, register
from reftlens.interventions.subspace import OrthonormalRows, _check_rank

_INITS = ("identity", "random")


def _learned_bias(linear: nn.Linear) -> Tensor:
    """The b of Wh + b: the layer's bias, or zeros for a Φ built with ``bias=False``."""
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


class _LowRank(Phi):
    """Shared plumbing: d_model, rank, init, dropout on the edit."""

    identity_init_possible = True

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        _check_rank(type(self).__name__, d_model, rank)
        if init not in _INITS:
            raise ValueError(f"{type(self).__name__}: init must be one of {_INITS}; got {init!r}.")
        if init == "identity" and not self.identity_init_possible:
            raise ValueError(f"{type(self).__name__} cannot start at the identity; use init='random'.")
        dropout = finite_number(dropout, f"{type(self).__name__}: dropout")
        if not 0 <= dropout < 1:
            raise ConfigError(f"{type(self).__name__}: dropout must be in [0, 1) (a probability); got {dropout!r}.")
        self.d_model, self.rank, self.init, self.has_bias = d_model, rank, init, bool(bias)
        self.dropout = nn.Dropout(dropout)

    def config(self) -> dict[str, Any]:
        out = {"d_model": self.d_model, "rank": self.rank, "init": self.init, "dropout": self.dropout.p}
        return out if self.has_bias else {**out, "bias": False}  # saves from before the option stay the same

    # ---- the bank protocol: Φ(h) = h + upᵀ(down h + bias), stacked over sets ----

    def factors(self) -> tuple[Float[Tensor, "r d"], Float[Tensor, " r"] | None, Float[Tensor, "r d"]]:
        """``(down, bias, up)`` with Φ(h) = h + upᵀ(down·h + bias): the form a bank stacks."""
        raise NotImplementedError

    def bank_key(self) -> Hashable | None:
        return (type(self), self.d_model, self.rank, self.has_bias, self.dropout.p, next(self.parameters()).dtype)

    @classmethod
    def forward_many(
        cls, phis: Sequence["_LowRank"], h: Float[Tensor, "n d"], which: Int[Tensor, " n"]
    ) -> Float[Tensor, "n d"]:
        downs, biases, ups = zip(*(phi.factors() for phi in phis))
        bias = None if biases[0] is None else torch.stack(biases)
        return h + phis[0].dropout(low_rank_many(h, which, torch.stack(downs), bias, torch.stack(ups)))


@register("loreft")
class LoReFT(_LowRank):
    """LoReFT: Φ(h) = h + Rᵀ(Wh + b − Rh), R ∈ R^{r×d} with orthonormal rows.

    >>> phi = LoReFT(16, rank=4)                    # init="identity": W = R, b = 0
    >>> h = torch.randn(3, 16)
    >>> (phi(h) - h).abs().max() < 1e-5             # Wh and Rh: two matmuls, float32 rounding apart
    tensor(True)
    >>> phi = LoReFT(16, rank=4, init="random")     # affine: h + Rᵀ((W − R)h + b)
    >>> torch.allclose(phi.affine()(h), phi(h), atol=1e-5)
    True
    """

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, rank, init, dropout, bias)
        self.R = OrthonormalRows(d_model, rank)
        self.W = nn.Linear(d_model, rank, bias=bias)  # W and b
        if init == "identity":
            with torch.no_grad():
                self.W.weight.copy_(self.R.weight)
                if bias:
                    self.W.bias.zero_()

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        R = self.R.weight
        return h + self.dropout((self.W(h) - h @ R.T) @ R)

    @property
    def b(self) -> Tensor:
        """The learned shift b (zeros with ``bias=False``)."""
        return _learned_bias(self.W)

    def affine(self) -> Affine:
        R = self.R.weight
        return Affine(R.T, self.W.weight - R, self.b)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        R = self.R.weight
        return self.W.weight - R, self.W.bias, R


@register("noreft")
class NoReFT(_LowRank):
    """LoReFT without orthogonality: Φ(h) = h + Pᵀ(Wh + b − Ph), P free."""

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, rank, init, dropout, bias)
        self.P = nn.Linear(d_model, rank, bias=False)
        self.W = nn.Linear(d_model, rank, bias=bias)
        if init == "identity":
            with torch.no_grad():
                self.W.weight.copy_(self.P.weight)
                if bias:
                    self.W.bias.zero_()

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return h + self.dropout((self.W(h) - self.P(h)) @ self.P.weight)

    @property
    def b(self) -> Tensor:
        """The learned shift b (zeros with ``bias=False``)."""
        return _learned_bias(self.W)

    def affine(self) -> Affine:
        return Affine(self.P.weight.T, self.W.weight - self.P.weight, self.b)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.W.weight - self.P.weight, self.W.bias, self.P.weight


@register("direft")
class DiReFT(_LowRank):
    """DiReFT: Φ(h) = h + W₂ᵀ(W₁h + b), no orthogonality. Identity init: W₂ = 0.

    >>> phi = DiReFT(16, rank=4)
    >>> h = torch.randn(3, 16)
    >>> torch.equal(phi(h), h)
    True
    """

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, rank, init, dropout, bias)
        self.W1 = nn.Linear(d_model, rank, bias=bias)  # W₁ and b
        w2 = nn.Linear(d_model, rank, bias=False).weight.detach()
        self.W2 = nn.Parameter(torch.zeros_like(w2) if init == "identity" else w2.clone())

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return h + self.dropout(self.W1(h) @ self.W2)

    @property
    def b(self) -> Tensor:
        """The learned shift b (zeros with ``bias=False``)."""
        return _learned_bias(self.W1)

    def affine(self) -> Affine:
        return Affine(self.W2.T, self.W1.weight, self.b)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.W1.weight, self.W1.bias, self.W2


@register("nodireft")
class NodiReFT(_LowRank):
    """NodiReFT: Φ(h) = h + Pᵀ(Wh + b), P ∈ R^{r×d} free (no orthogonality, no difference).

    pyreft's ``NodireftIntervention`` (``learned_source`` = W and b, ``proj_layer.weight`` = P).
    Identity init: P = 0 (as DiReFT's W₂ = 0); ``init="random"`` is pyreft's initialisation.

    >>> phi = NodiReFT(16, rank=4)
    >>> h = torch.randn(3, 16)
    >>> torch.equal(phi(h), h)
    True
    """

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, rank, init, dropout, bias)
        self.W = nn.Linear(d_model, rank, bias=bias)  # W and b
        self.P = nn.Linear(d_model, rank, bias=False)
        if init == "identity":
            with torch.no_grad():
                self.P.weight.zero_()

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return h + self.dropout(self.W(h) @ self.P.weight)

    @property
    def b(self) -> Tensor:
        """The learned shift b (zeros with ``bias=False``)."""
        return _learned_bias(self.W)

    def affine(self) -> Affine:
        return Affine(self.P.weight.T, self.W.weight, self.b)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.W.weight, self.W.bias, self.P.weight


@register("consreft")
class ConsReFT(_LowRank):
    """ConsReFT: Φ(h) = h + Rᵀ(b − Rh), a constant target b in the subspace. Never the identity."""

    identity_init_possible = False

    def __init__(self, d_model: int, rank: int, init: str = "random", dropout: float = 0.0):
        super().__init__(d_model, rank, init, dropout)
        self.R = OrthonormalRows(d_model, rank)
        self.b = nn.Parameter(torch.rand(rank))

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        R = self.R.weight
        return h + self.dropout((self.b - h @ R.T) @ R)

    def affine(self) -> Affine:
        R = self.R.weight
        return Affine(R.T, -R, self.b)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        R = self.R.weight
        return -R, self.b, R


@register("lobireft")
class LoBiReFT(_LowRank):
    """LoBiReFT: Φ(h) = h + Rᵀb, a learned bias inside an orthonormal subspace. Identity init: b = 0."""

    def __init__(self, d_model: int, rank: int, init: str = "identity", dropout: float = 0.0):
        super().__init__(d_model, rank, init, dropout)
        self.R = OrthonormalRows(d_model, rank)
        self.b = nn.Parameter(torch.zeros(rank) if init == "identity" else torch.rand(rank))

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return h + self.dropout(self.b @ self.R.weight).to(h.dtype)

    def affine(self) -> Affine:
        R = self.R.weight
        return Affine(R.T, R.new_zeros(self.rank, self.d_model), self.b)

    def bank_key(self) -> Hashable | None:
        return None  # no h-dependent factor: one call per set is already cheap
