"""Φ, the intervention function: the protocol every intervention follows, and the by-name registry.

A Φ maps hidden vectors to hidden vectors, row by row: ``[..., d] -> [..., d]``. Sourceless Φs
(LoReFT, ablations, steering) see only the base representation ``h``; Φs with a source
(interchange, DII) see the base ``b`` and a source ``s`` taken from another run at the
matching sites. Any ``nn.Module`` or callable with that signature is a Φ; subclassing
:class:`Phi` adds a registered type name (for saving) and the ``d_model`` check.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, Hashable, NamedTuple, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from reftlens.errors import ConfigError

_REGISTRY: dict[str, type[nn.Module]] = {}


def finite_number(value: Any, what: str) -> float:
    """``value`` as a float, or :class:`~reftlens.errors.ConfigError` naming ``what`` if it is not
    a real, finite number (NaN, ±inf, a bool, a string)."""
    import math
    import numbers

    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number; got {value!r}.")
    return float(value)


def finite_tensor(value: Tensor, what: str) -> Tensor:
    """``value`` unchanged, or :class:`~reftlens.errors.ConfigError` naming ``what`` and the first
    non-finite entry if it holds NaN or ±inf."""
    if value.is_floating_point() or value.is_complex():
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ConfigError(
                f"{what} holds {int(bad.sum())} non-finite value(s) (first: {value[where].item()} at index "
                f"{where if len(where) > 1 else where[0]}); give finite values."
            )
    return value


def size(value: Any, what: str, *, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``, or :class:`~reftlens.errors.ConfigError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer of at least {minimum}; got {value!r}.")
    return value


def register(type_name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a Φ class under ``type_name`` so that saved configurations name a type,
    never a Python import path.

    >>> @register("my_scale")
    ... class Scale(Phi):
    ...     def __init__(self, d_model: int): super().__init__(); self.d_model = d_model
    ...     def forward(self, h): return 2 * h
    """

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        known = _REGISTRY.get(type_name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"Φ type name {type_name!r} is already registered to {known.__module__}.{known.__qualname__}; "
                f"pick another name for {cls.__module__}.{cls.__qualname__}."
            )
        _REGISTRY[type_name] = cls
        cls.type_name = type_name  # type: ignore[attr-defined]
        return cls

    return add


def phi_class(type_name: str) -> type[nn.Module]:
    """The Φ class registered under ``type_name``."""
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise KeyError(
            f"Unknown Φ type {type_name!r}. Registered types: {sorted(_REGISTRY)}. "
            "A user-defined Φ must be registered with @reftlens.register('name') before it is loaded."
        ) from None


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


class Phi(nn.Module):
    """Base class of the built-in Φs.

    ``takes_source``: whether ``forward`` is ``(base, source)`` instead of ``(h)``.
    ``read_only``: the Φ never changes its input (collect), so the runtime skips the scatter.
    ``d_model``: the width of the hidden vectors it expects (checked against the hook).
    ``row_wise``: each output row depends on its input row alone (False for noise drawn per call).

    The bank protocol (optional, for any Φ class, subclass or not): when a bank of named sets runs,
    the rows of every set whose Φ returns the same :meth:`bank_key` at one site run as one call
    of :meth:`forward_many` over the stacked parameters; Φs without a key run one call per set.
    """

    takes_source: ClassVar[bool] = False
    read_only: ClassVar[bool] = False
    row_wise: ClassVar[bool] = True
    type_name: ClassVar[str] = ""
    d_model: int | None = None

    def config(self) -> dict[str, Any]:
        """Constructor arguments as JSON-able data (for saving)."""
        return {"d_model": self.d_model}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def bank_key(self) -> Hashable | None:
        """Φs with equal keys can run their rows together (:meth:`forward_many`); None: never."""
        return None

    @classmethod
    def forward_many(
        cls, phis: Sequence["Phi"], h: Float[Tensor, "n d"], which: Int[Tensor, " n"]
    ) -> Float[Tensor, "n d"]:
        """Row ``i`` of the result is ``phis[which[i]](h[i])``, in one computation over the stacked
        parameters of ``phis`` (all with one :meth:`bank_key`)."""
        raise NotImplementedError(f"{cls.__name__} has no forward_many; its bank_key must be None.")


class Affine(NamedTuple):
    """A Φ written as a low-rank affine edit: Φ(h) = h + up · (down · h + shift).

    ``up`` is ``[d, r]``, ``down`` ``[r, d]``, ``shift`` ``[r]``. A Φ that has this form says so
    with an ``affine()`` method returning it (in eval mode: dropout off); that is what lets
    :func:`reftlens.merge` fold it into the weight of a linear map and :func:`reftlens.save_peft`
    write it as a LoRA. LoReFT is ``(Rᵀ, W − R, b)``, DiReFT ``(W₂ᵀ, W₁, b)``.
    """

    up: torch.Tensor
    down: torch.Tensor
    shift: torch.Tensor

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the edit to rows ``[..., d]`` (for checks; the Φ's own forward is the reference)."""
        return h + (h @ self.down.T + self.shift) @ self.up.T


class FunctionPhi(nn.Module):
    """Wraps a plain callable as a Φ (no parameters)."""

    def __init__(self, fn: Callable[..., torch.Tensor], takes_source: bool):
        super().__init__()
        self.fn = fn
        self.takes_source = takes_source

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _required_positional(fn: Callable[..., Any]) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    # `examples` is what the engine passes to a per-example Φ, never a hidden tensor
    params = [p for p in sig.parameters.values() if p.kind in kinds and p.name != "examples"]
    required = [p for p in params if p.default is inspect.Parameter.empty]
    return len(required) if required else len(params)


def takes_source(phi: Any) -> bool:
    """Whether a Φ is called as ``phi(base, source)`` (True) or ``phi(h)`` (False).

    Read from a ``takes_source`` attribute when the Φ has one, else from the number of
    required positional arguments of its ``forward`` (or ``__call__``), not counting ``examples``
    (what the engine passes to a Φ with ``per_example = True``).
    """
    flag = getattr(phi, "takes_source", None)
    if flag is not None:
        return bool(flag)
    fn = phi.forward if isinstance(phi, nn.Module) else phi
    n = _required_positional(fn)
    if n is None or n not in (1, 2):
        raise TypeError(
            f"Cannot tell how to call Φ {phi!r}: it should take one hidden tensor `h` "
            "or two (`base`, `source`). Give it a `takes_source` attribute to say which."
        )
    return n == 2


def as_phi(phi: Any) -> nn.Module:
    """Return ``phi`` as an ``nn.Module`` (a callable is wrapped; a module is used as is, so
    passing one instance in several places shares its parameters)."""
    if isinstance(phi, nn.Module):
        return phi
    if callable(phi):
        return FunctionPhi(phi, takes_source(phi))
    raise TypeError(f"A Φ must be an nn.Module or a callable mapping [..., d] -> [..., d]; got {type(phi).__name__}.")


def phi_d_model(phi: nn.Module) -> int | None:
    """The hidden width a Φ declares, if any."""
    d = getattr(phi, "d_model", None)
    return int(d) if isinstance(d, int) else None


def phi_label(phi: nn.Module) -> str:
    """A short readable name for a Φ in messages: its type and, if present, its rank."""
    name = getattr(phi, "type_name", "") or type(phi).__name__
    if isinstance(phi, FunctionPhi):
        name = getattr(phi.fn, "__name__", "function")
    rank = getattr(phi, "rank", None)
    return f"{name}(rank={rank})" if rank is not None else name


def bank_key(phi: Any) -> Hashable | None:
    """The key under which a Φ's rows batch with other sets' rows in a bank (None: they do not).
    A Φ with a source never batches (its source rows are per set), nor does one that reads which
    example each row comes from (``per_example``: pooling over rows of one set's examples)."""
    fn = getattr(phi, "bank_key", None)
    if (
        fn is None
        or takes_source(phi)
        or getattr(phi, "per_example", False)
        or not callable(getattr(type(phi), "forward_many", None))
    ):
        return None
    return fn()


def low_rank_many(
    h: Float[Tensor, "n d"],
    which: Int[Tensor, " n"],
    down: Float[Tensor, "k r d"],
    bias: Float[Tensor, "k r"] | None,
    up: Float[Tensor, "k r d"],
) -> Float[Tensor, "n d"]:
    """The edit ``up[which[i]]ᵀ (down[which[i]] h[i] + bias[which[i]])`` of every row, for ``k``
    stacked low-rank Φs (LoReFT, DiReFT, NoReFT, NodiReFT are all this shape).

    Dense over the adapter axis: one ``h @ down`` against every set at once, each row keeping only
    its own set's ``r`` coordinates, one matmul back up; its backward is two dense matmuls (no
    scatter-add into stacked parameters). Measured on 2 CPU cores at SmolLM2's width (d 576, rank 4;
    ``python benchmarks/bank.py --micro``) against gathering each row's weights (``down[which]``,
    einsum) and against a loop of index_select groups, one per set: it was the fastest, or within
    0.1 ms, for 8 and 64 sets over 32 to 4096 rows, forward and backward (up to 11× faster than the
    gather, 15× than the loop). Its work grows with ``k · r``, the sets present at the site; it was
    not measured past 64 (a GPU serving thousands would want a grouped kernel, Punica's BGMV).
    """
    k, r, d = down.shape
    z = h @ down.reshape(k * r, d).T
    if bias is not None:
        z = z + bias.reshape(k * r)
    if k > 1:
        keep = (which[:, None] == torch.arange(k, device=which.device)).repeat_interleave(r, 1)
        z = z * keep.to(z.dtype)
    return z @ up.reshape(k * r, d)
