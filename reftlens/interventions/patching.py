"""The analysis Φs: activation patching, ablations, steering, noise and collection."""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from reftlens.errors import ConfigError
from reftlens.interventions.base import Affine, Phi, finite_number, finite_tensor, register, size


@register("interchange")
class Interchange(Phi):
    """Activation patching: Φ(b, s) = s.

    With ``heads``, for hooks shaped ``[..., head, d_head]`` (``attn.hook_z``, ...): Φ(b, s) = s on
    those heads and b elsewhere (head patching).

    >>> Interchange()(torch.zeros(2, 4), torch.ones(2, 4)).sum().item()
    8.0
    >>> Interchange(heads=[1])(torch.zeros(1, 3, 2), torch.ones(1, 3, 2))[0, :, 0].tolist()
    [0.0, 1.0, 0.0]
    """

    takes_source = True

    def __init__(self, d_model: int | None = None, heads: list[int] | None = None):
        super().__init__()
        self.d_model = d_model
        self.heads = None if heads is None else [int(h) for h in heads]

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "heads": self.heads}

    def forward(self, base: Float[Tensor, "... d"], source: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.heads is None:
            return source
        on = torch.zeros(base.shape[-2], 1, dtype=torch.bool, device=base.device)
        on[self.heads] = True
        return torch.where(on, source, base)


@register("zero_ablation")
class ZeroAblation(Phi):
    """Φ(h) = 0."""

    def __init__(self, d_model: int | None = None):
        super().__init__()
        self.d_model = d_model

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return torch.zeros_like(h)


@register("mean_ablation")
class MeanAblation(Phi):
    """Φ(h) = μ, a fixed mean activation (e.g. over a reference dataset).

    >>> MeanAblation(torch.tensor([1.0, 2.0]))(torch.zeros(3, 2))[0].tolist()
    [1.0, 2.0]
    """

    def __init__(self, mean: Float[Tensor, "d"] | int):  # noqa: F821
        super().__init__()
        if isinstance(mean, int):
            mean = torch.zeros(size(mean, "MeanAblation: mean (a width)"))
        else:
            mean = finite_tensor(torch.as_tensor(mean).detach().clone(), "MeanAblation: mean")
        if mean.ndim != 1:
            raise ValueError(f"MeanAblation needs a mean vector of shape [d_model]; got shape {tuple(mean.shape)}.")
        self.register_buffer("mean", mean)
        self.d_model = mean.shape[0]

    def config(self) -> dict[str, Any]:
        return {"mean": self.d_model}

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.mean.to(h.dtype).expand_as(h)


@register("steer")
class Steer(Phi):
    """Additive steering (ActAdd / CAA): Φ(h) = h + α·v. ``v`` is a parameter (zero by default), so
    a steering vector can be set by hand (e.g. a :mod:`reftlens.steering` direction) or trained.

    To sweep α in one batch, or to steer each example with its own α, wrap it:
    ``Scaled(Steer(v), alpha=tensor)`` (see :func:`reftlens.steering.alpha_sweep`).

    >>> Steer(torch.tensor([1.0, 0.0]), alpha=2.0)(torch.zeros(1, 2)).tolist()
    [[2.0, 0.0]]
    """

    def __init__(self, vector: Float[Tensor, "d"] | int, alpha: float = 1.0, *, scale: float | None = None):  # noqa: F821
        super().__init__()
        if isinstance(vector, int):
            vector = torch.zeros(size(vector, "Steer: vector (a width)"))
        else:
            vector = finite_tensor(torch.as_tensor(vector).detach().clone(), "Steer: vector")
        if vector.ndim != 1:
            raise ValueError(f"Steer needs a vector of shape [d_model]; got shape {tuple(vector.shape)}.")
        self.vector = nn.Parameter(vector.float() if not vector.is_floating_point() else vector)
        # `scale` is what saves before `alpha` called it; they still load
        self.alpha = finite_number(
            alpha if scale is None else scale, "Steer: alpha" if scale is None else "Steer: scale"
        )
        self.d_model = vector.shape[0]

    def config(self) -> dict[str, Any]:
        return {"vector": self.d_model, "alpha": self.alpha}

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return h + self.alpha * self.vector

    def affine(self) -> Affine:
        """h + v·(0·h + α): a rank-1 edit with no dependence on h."""
        v = self.vector
        return Affine(v[:, None], v.new_zeros(1, self.d_model), v.new_full((1,), self.alpha))

    def bank_key(self) -> Hashable | None:
        return (type(self), self.d_model, self.vector.dtype)

    @classmethod
    def forward_many(
        cls, phis: Sequence["Steer"], h: Float[Tensor, "n d"], which: Int[Tensor, " n"]
    ) -> Float[Tensor, "n d"]:
        """Each row plus its own set's α·v (one gather over the stacked vectors)."""
        return h + torch.stack([phi.alpha * phi.vector for phi in phis])[which]


@register("noise")
class Noise(Phi):
    """Gaussian corruption for causal tracing: Φ(h) = h + σ·ε, ε ~ N(0, I).

    With ``seed`` set, every call draws the same noise for the same number of rows (one
    fixed corruption, as in ROME's tracing); with ``seed=None`` each call draws afresh
    from torch's global generator. Noise is drawn on the CPU and moved, so a seed gives
    the same corruption on every device. The noise depends on how many rows a call sees, not on
    each row alone (``row_wise = False``): a sweep keeps it in the recorded base run.
    """

    row_wise = False

    def __init__(self, std: float, seed: int | None = 0, d_model: int | None = None):
        super().__init__()
        self.std = finite_number(std, "Noise: std")
        if self.std < 0:
            raise ConfigError(f"Noise: std must be at least 0 (a standard deviation); got {std!r}.")
        self.seed = seed
        self.d_model = d_model

    def config(self) -> dict[str, Any]:
        return {"std": self.std, "seed": self.seed, "d_model": self.d_model}

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        eps = torch.randn(h.shape, generator=gen, dtype=torch.float32)
        return h + (self.std * eps).to(device=h.device, dtype=h.dtype)


@register("collect")
class Collect(Phi):
    """Read-only: records the selected rows and leaves the run unchanged.

    After a run, ``activations`` holds one ``[n_sites, ...]`` tensor per call, rows in
    example-major order and, within an example, in increasing position. With ``detach=False``
    the recorded rows are the very tensors the rest of the forward reads, so
    ``torch.autograd.grad(loss, collect.activations)`` gives the gradient at each site
    (attribution patching uses this).
    """

    def __init__(self, d_model: int | None = None, detach: bool = True):
        super().__init__()
        self.d_model = d_model
        self.detach = detach
        self.activations: list[Tensor] = []

    def config(self) -> dict[str, Any]:
        return {"d_model": self.d_model, "detach": self.detach}

    @property
    def read_only(self) -> bool:  # kept rows must flow on for their gradients to exist
        return self.detach

    def clear(self) -> None:
        self.activations = []

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not self.detach and not h.requires_grad:  # a frozen model builds no graph: start one here
            h = h + h.new_zeros(()).requires_grad_()
        self.activations.append(h.detach() if self.detach else h)
        return h
