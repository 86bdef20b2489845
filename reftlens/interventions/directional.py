"""Steering Φs: scaling any Φ's edit (per example, for α sweeps in one batch), projecting a
direction out (suppression), and ReFT-r1, AxBench's rank-1 detector-and-steerer.

A Φ here may set ``per_example = True``: the engine then calls it with ``examples=``, the batch row
of each of its rows (see :func:`reftlens.runtime.kernel.site_hook`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from reftlens.errors import ConfigError
from reftlens.interventions.base import Phi, finite_number, finite_tensor, phi_label, register, size, takes_source


class Scaled(Phi):
    """Any Φ with its edit scaled by α: Φ_α(h) = h + α·(Φ(h) − h).

    ``alpha`` is a number, or a vector with one value per row of the batch (``alpha[b]`` scales
    example ``b``): the rows of one forward, or of one batched generation, each get their own α.
    α = 0 is the identity, α = 1 is Φ itself, α = −1 edits the other way. For ``Steer(v)`` this is
    h + α·v; for LoReFT it extrapolates (or reverses) the learned edit.

    A view for running and training (:func:`reftlens.steering.alpha_sweep`, the preference
    objective); it wraps the Φ it is given (the same parameters) and is not saved itself.

    >>> from reftlens.interventions import Steer
    >>> phi = Scaled(Steer(torch.ones(2)), alpha=torch.tensor([0.0, 3.0]))
    >>> phi(torch.zeros(2, 2), examples=torch.tensor([0, 1])).tolist()
    [[0.0, 0.0], [3.0, 3.0]]
    """

    def __init__(self, phi: nn.Module, alpha: float | Tensor = 1.0):
        super().__init__()
        self.phi = phi
        if isinstance(alpha, Tensor):
            if alpha.ndim > 1:
                raise ConfigError(
                    f"Scaled: alpha must be a number or one value per example [batch]; got shape {tuple(alpha.shape)}."
                )
            alpha = finite_tensor(alpha.detach(), "alpha")
        else:
            alpha = finite_number(alpha, "alpha")
        self._alpha = alpha
        self.d_model = getattr(phi, "d_model", None)

    @property
    def alpha(self) -> float | Tensor:
        """The scale, fixed when the view is built: another α is another view (``reft.scaled(α)``)."""
        return self._alpha

    @property
    def takes_source(self) -> bool:  # type: ignore[override]
        return takes_source(self.phi)

    @property
    def row_wise(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.phi, "row_wise", True))

    @property
    def per_example(self) -> bool:
        return (isinstance(self._alpha, Tensor) and self._alpha.ndim == 1) or bool(
            getattr(self.phi, "per_example", False)
        )

    def config(self) -> dict[str, Any]:
        alpha = self._alpha.tolist() if isinstance(self._alpha, Tensor) else self._alpha
        return {"phi": phi_label(self.phi), "alpha": alpha}

    def forward(
        self, h: Float[Tensor, "n d"], *source: Tensor, examples: Int[Tensor, " n"] | None = None
    ) -> Float[Tensor, "n d"]:
        inner = (
            self.phi(h, *source, examples=examples) if getattr(self.phi, "per_example", False) else self.phi(h, *source)
        )
        return h + self._row_alpha(h, examples) * (inner - h)

    def _row_alpha(self, h: Tensor, examples: Tensor | None) -> Tensor | float:
        a = self._alpha
        if not isinstance(a, Tensor):
            return a
        if a.ndim == 0:
            return a.to(h)
        if examples is None:
            raise ConfigError(
                "Scaled: a per-example alpha needs examples= (the engine passes it; call the Φ "
                "through a ReftModel, or pass examples= yourself)."
            )
        if examples.numel() and int(examples.max()) >= a.shape[0]:
            raise ConfigError(
                f"Scaled({phi_label(self.phi)}): alpha holds {a.shape[0]} values, one per example, but the batch has "
                f"at least {int(examples.max()) + 1} rows. Give one α per row of the batch."
            )
        return a.to(h.device, h.dtype)[examples].reshape(-1, *([1] * (h.ndim - 1)))


@register("project_out")
class ProjectOut(Phi):
    """Suppression by directional ablation: Φ(h) = h − Uᵀ(Uh), U ∈ R^{r×d} with orthonormal rows
    (one direction u: Φ(h) = h − (hᵀu)u). Given directions are orthonormalised (QR).

    >>> u = torch.tensor([3.0, 4.0])                 # normalised to (0.6, 0.8)
    >>> torch.allclose(ProjectOut(u)(torch.tensor([[3.0, 4.0]])), torch.zeros(1, 2), atol=1e-6)
    True
    """

    def __init__(self, directions: Float[Tensor, "*r d"] | int, rank: int = 1):
        super().__init__()
        if isinstance(directions, int):
            d = size(directions, "ProjectOut: directions (a width)")
            r = size(rank, "ProjectOut: rank")
            if r > d:
                raise ConfigError(f"ProjectOut: rank must be at most the width {d}; got rank={rank!r}.")
            U = torch.zeros(r, d)
        else:
            U = finite_tensor(torch.as_tensor(directions).detach().float(), "ProjectOut: directions")
            U = U[None] if U.ndim == 1 else U
            if U.ndim != 2 or U.shape[0] > U.shape[1]:
                raise ValueError(
                    f"ProjectOut needs a direction [d_model] or directions [r, d_model] with r ≤ d_model; "
                    f"got shape {tuple(U.shape)}."
                )
            q, r = torch.linalg.qr(U.T.double())
            if bool((torch.diagonal(r).abs() < 1e-8 * max(1.0, float(r.abs().max()))).any()):
                raise ValueError(
                    "ProjectOut: the directions are zero or linearly dependent; give independent directions."
                )
            U = (q * torch.sign(torch.diagonal(r))).T.float()
        self.register_buffer("U", U)
        self.d_model, self.rank = U.shape[1], U.shape[0]

    def config(self) -> dict[str, Any]:
        return {"directions": self.d_model, "rank": self.rank}

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        U = self.U.to(h.dtype)
        return h - (h @ U.T) @ U


@register("reft_r1")
class ReFTr1(Phi):
    """ReFT-r1 (AxBench, Wu et al. 2025): one direction w that detects a concept and steers toward it.

    Latent z = ReLU(hᵀw) per position (w kept unit norm); the edit adds the mean of the example's
    top-k latents along w: Φ(h) = h + mean(TopK_k(z over the example's positions))·w. Trained with
    the LM loss plus ``l1`` × the mean of the latents outside the top k (:meth:`penalty`), so z
    fires on few positions; read z (or hᵀw) as the concept detector, and steer at inference with
    ``Steer(phi.direction, alpha)`` as AxBench does.

    >>> phi = ReFTr1(8, k=2)
    >>> h = torch.randn(5, 8)
    >>> out = phi(h, examples=torch.tensor([0, 0, 0, 1, 1]))
    >>> edit = (out - h) @ phi.direction             # each example's top-2 mean, on all its rows
    >>> torch.allclose(edit[:3], phi.latent(h[:3]).topk(2).values.mean().expand(3), atol=1e-5)
    True
    """

    per_example = True
    row_wise = False  # the magnitude pools over the example's rows

    def __init__(self, d_model: int, k: int = 8, l1: float = 1e-3):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ConfigError(f"ReFTr1(d_model, ...) takes a positive integer width; got d_model={d_model!r}.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(
                f"ReFTr1: k (the top latents averaged per example) must be a positive integer; got {k!r}."
            )
        l1 = finite_number(l1, "ReFTr1: l1")
        if l1 < 0:
            raise ConfigError(f"ReFTr1: l1 (a penalty weight) must be at least 0; got {l1!r}.")
        self.d_model, self.k, self.l1 = d_model, k, l1
        self.w = nn.Parameter(torch.randn(d_model) / d_model**0.5)
        self._pending: list[Tensor] = []

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "k": self.k, "l1": self.l1}

    @property
    def direction(self) -> Float[Tensor, " d"]:
        """The unit direction w / ‖w‖."""
        return F.normalize(self.w, dim=0)

    def latent(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
        """The detector z = ReLU(hᵀw)."""
        return torch.relu(h @ self.direction.to(h.dtype))

    def forward(self, h: Float[Tensor, "n d"], examples: Int[Tensor, " n"] | None = None) -> Float[Tensor, "n d"]:
        w = self.direction.to(h.dtype)
        z = torch.relu(h @ w)
        magnitude, outside = topk_mean(z, examples, self.k)
        if self.training and torch.is_grad_enabled():
            self._pending.append(self.l1 * (z * outside).mean())
        return h + magnitude[:, None] * w

    def penalty(self) -> Tensor | None:
        """The L1 term of the training loss since the last call (summed over calls), then cleared."""
        pending, self._pending = self._pending, []
        return torch.stack(pending).sum() if pending else None


def topk_mean(z: Float[Tensor, " n"], examples: Int[Tensor, " n"] | None, k: int) -> tuple[Tensor, Tensor]:
    """Per row, the mean of the top-k values of ``z`` among its example's rows (all rows are one
    example when ``examples`` is None), and a 0/1 mask of the rows outside their example's top k."""
    n = z.shape[0]
    if examples is None:
        examples = torch.zeros(n, dtype=torch.long, device=z.device)
    ids, slot = torch.unique(examples, return_inverse=True)
    counts = torch.bincount(slot, minlength=ids.numel())
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(slot, stable=True)
    within = torch.empty_like(slot)
    within[order] = torch.arange(n, device=z.device) - first[slot[order]]
    dense = z.new_full((ids.numel(), int(counts.max()) if n else 1), float("-inf"))
    dense[slot, within] = z
    top = dense.topk(min(k, dense.shape[1]), dim=1)
    valid = torch.isfinite(top.values)
    mean = torch.where(valid, top.values, 0).sum(1) / valid.sum(1).clamp(min=1)
    inside = torch.zeros_like(dense, dtype=torch.bool).scatter_(1, top.indices, valid)
    return mean[slot], (~inside[slot, within]).to(z.dtype)
