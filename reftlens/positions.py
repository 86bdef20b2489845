"""P, the token positions an intervention edits.

Every spec is resolved against the *real* (non-pad) tokens of each example: position 0 is an
example's first real token and ``"l1"`` its last, whatever the padding side. Resolution is
vectorised over the batch and yields a boolean site mask ``[batch, seq]`` over the padded
tensor; pad positions are never selected.

Specs (``parse_positions`` accepts all of these):

===================  =====================================================================
``"all"``            every real token
``"f5+l5"``          the first 5 and the last 5 real tokens (one set: overlap merges);
                     ``"f0"``, ``"l0"``, ``"f0+l0"`` select nothing and are refused
``3`` / ``[0, -1]``  explicit indices into the real tokens (negative counts from the end)
``slice(1, None)``   a slice of the real tokens
tensor ``[B, K]``    per-example indices (a ragged list of lists also works)
callable             a token predicate ``tokens [B, S] -> bool [B, S]``
``after(m, spec)``   ``spec`` counted from just after the last occurrence of the tokens ``m``
                     (e.g. the chat template's user header: :func:`after`)
===================  =====================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from reftlens.errors import PositionError

_FIRST_LAST = re.compile(r"^(?:f(\d+))?\+?(?:l(\d+))?$")
_NOTHING = (
    "position spec {spec} selects no position: its first and last counts are all zero, so it would edit "
    "no token on any input. Ask for at least one token, e.g. 'l1' (the last real token) or 'f1+l1'."
)


@dataclass(frozen=True)
class RealTokens:
    """Where each example's real tokens lie in a padded batch."""

    mask: Bool[Tensor, "batch seq"]
    lengths: Int[Tensor, " batch"]
    starts: Int[Tensor, " batch"]
    tokens: Int[Tensor, "batch seq"] | None = None

    @classmethod
    def from_mask(cls, mask: Tensor, tokens: Tensor | None = None) -> "RealTokens":
        mask = mask.bool()
        lengths = mask.sum(1)
        starts = mask.int().argmax(1)
        idx = torch.arange(mask.shape[1], device=mask.device)
        contiguous = mask == ((idx >= starts[:, None]) & (idx < (starts + lengths)[:, None]))
        if not bool(contiguous.all()):
            bad = int((~contiguous).any(1).nonzero()[0])
            raise PositionError(
                f"attention_mask row {bad} has gaps ({mask[bad].int().tolist()}); reftlens needs each "
                "example's real tokens to be one contiguous run (left or right padding)."
            )
        if bool((lengths == 0).any()):
            bad = int((lengths == 0).nonzero()[0])
            raise PositionError(f"attention_mask row {bad} has no real tokens.")
        return cls(mask, lengths, starts, tokens)

    @classmethod
    def unpadded(cls, batch: int, seq: int, device: torch.device | str = "cpu") -> "RealTokens":
        mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        return cls(mask, mask.sum(1), torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def relative(self) -> Int[Tensor, "batch seq"]:
        """Each padded slot's index among its example's real tokens (garbage on pads)."""
        return torch.arange(self.mask.shape[1], device=self.mask.device) - self.starts[:, None]


class PositionSpec:
    """A resolvable set of positions. Subclasses implement ``site_mask``."""

    def site_mask(self, real: RealTokens) -> Bool[Tensor, "batch seq"]:
        raise NotImplementedError

    def anchored(self) -> tuple[frozenset[int], frozenset[int]] | str | None:
        """Positions known before any input: ``"all"``, or (offsets from the start, offsets
        from the end, 1 = last), or None when they depend on the input."""
        return None

    def split(self, clamp: bool) -> list["PositionSpec"]:
        """Untied groups: each gets its own Φ."""
        raise ValueError(
            f"positions {self} cannot be split into untied groups; untied positions need 'fN+lM' or explicit indices."
        )

    def to_json(self) -> Any:
        raise ValueError(f"positions {self} cannot be saved; use 'all', 'fN+lM', indices or a slice.")


@dataclass(frozen=True)
class All(PositionSpec):
    def site_mask(self, real: RealTokens) -> Tensor:
        return real.mask

    def anchored(self):
        return "all"

    def to_json(self) -> Any:
        return "all"

    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class FirstLast(PositionSpec):
    """The first ``first`` and last ``last`` real tokens, merged into one set.

    ``clamp_half`` is pyreft's remedy for untied first/last groups on short prompts: each
    count is clamped to half the prompt, so the groups never meet.
    """

    first: int = 0
    last: int = 0
    clamp_half: bool = False

    def site_mask(self, real: RealTokens) -> Tensor:
        n = real.lengths[:, None]
        f = torch.clamp(n // 2, max=self.first) if self.clamp_half else self.first
        l = torch.clamp(n // 2, max=self.last) if self.clamp_half else self.last
        r = real.relative
        return real.mask & ((r < f) | (r >= n - l))

    def anchored(self):
        return frozenset(range(self.first)), frozenset(range(1, self.last + 1))

    def split(self, clamp: bool) -> list[PositionSpec]:
        groups = [FirstLast(self.first, 0, clamp), FirstLast(0, self.last, clamp)]
        return [g for g in groups if g.first or g.last]

    def to_json(self) -> Any:
        return {"first": self.first, "last": self.last, "clamp_half": self.clamp_half}

    def __str__(self) -> str:
        s = "+".join(p for p in (f"f{self.first}" if self.first else "", f"l{self.last}" if self.last else "") if p)
        return s + (" (clamped to half)" if self.clamp_half else "")


@dataclass(frozen=True)
class Indices(PositionSpec):
    """Explicit indices into the real tokens; negative ones count from the end."""

    indices: tuple[int, ...]

    def site_mask(self, real: RealTokens) -> Tensor:
        idx = torch.tensor(self.indices, device=real.mask.device, dtype=torch.long)
        n = real.lengths[:, None]
        target = torch.where(idx < 0, n + idx, idx.expand(n.shape[0], -1))
        _check_in_range(target, real, self)
        out = torch.zeros_like(real.mask)
        return out.scatter(1, target + real.starts[:, None], True)

    def anchored(self):
        return frozenset(i for i in self.indices if i >= 0), frozenset(-i for i in self.indices if i < 0)

    def split(self, clamp: bool) -> list[PositionSpec]:
        return [Indices((i,)) for i in self.indices]

    def to_json(self) -> Any:
        return {"indices": list(self.indices)}

    def __str__(self) -> str:
        return str(list(self.indices))


@dataclass(frozen=True)
class Slice(PositionSpec):
    """A Python slice of the real tokens (step > 0)."""

    start: int | None = None
    stop: int | None = None
    step: int = 1

    def site_mask(self, real: RealTokens) -> Tensor:
        n = real.lengths[:, None]

        def bound(v: int | None, default: Tensor) -> Tensor:
            if v is None:
                return default
            b = n + v if v < 0 else torch.full_like(n, v)
            return b.clamp(min=0).minimum(n)

        s, e = bound(self.start, torch.zeros_like(n)), bound(self.stop, n)
        r = real.relative
        return real.mask & (r >= s) & (r < e) & ((r - s) % self.step == 0)

    def anchored(self):
        if self.start is not None and self.stop is not None and 0 <= self.start and 0 <= self.stop:
            return frozenset(range(self.start, self.stop, self.step)), frozenset()
        return None

    def to_json(self) -> Any:
        return {"slice": [self.start, self.stop, self.step]}

    def __str__(self) -> str:
        return f"slice({self.start}, {self.stop}, {self.step})"


@dataclass(frozen=True, eq=False)
class PerExample(PositionSpec):
    """Per-example indices into the real tokens: a ``[batch, K]`` tensor or a ragged list."""

    indices: Tensor
    valid: Tensor

    @classmethod
    def build(cls, spec: Tensor | list[list[int]]) -> "PerExample":
        if isinstance(spec, Tensor):
            if spec.ndim != 2 or spec.is_floating_point():
                raise PositionError(
                    f"per-example positions must be an integer tensor [batch, K]; got {spec.dtype} {tuple(spec.shape)}."
                )
            return cls(spec.long(), torch.ones_like(spec, dtype=torch.bool))
        rows = [list(map(int, r)) for r in spec]
        k = max((len(r) for r in rows), default=0)
        idx = torch.tensor([r + [0] * (k - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), k)
        valid = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows]).reshape(len(rows), k)
        return cls(idx, valid)

    def site_mask(self, real: RealTokens) -> Tensor:
        if self.indices.shape[0] != real.mask.shape[0]:
            raise PositionError(
                f"per-example positions have {self.indices.shape[0]} rows but the batch has "
                f"{real.mask.shape[0]} examples; give one row of positions per example."
            )
        idx, valid = self.indices.to(real.mask.device), self.valid.to(real.mask.device)
        n = real.lengths[:, None]
        target = torch.where(idx < 0, n + idx, idx)
        _check_in_range(torch.where(valid, target, 0), real, self)
        out = torch.zeros(real.mask.shape[0], real.mask.shape[1] + 1, dtype=torch.bool, device=real.mask.device)
        sink = real.mask.shape[1]  # invalid slots land in an extra column, then dropped
        return out.scatter(1, torch.where(valid, target + real.starts[:, None], sink), True)[:, :-1]

    def __str__(self) -> str:
        return f"per-example indices {tuple(self.indices.shape)}"


@dataclass(frozen=True, eq=False)
class Where(PositionSpec):
    """Positions where a token predicate ``tokens [B, S] -> bool [B, S]`` holds."""

    predicate: Callable[[Tensor], Tensor]

    def site_mask(self, real: RealTokens) -> Tensor:
        if real.tokens is None:
            raise PositionError("a token-predicate position spec needs the input tokens.")
        hit = self.predicate(real.tokens)
        if not isinstance(hit, Tensor) or hit.shape != real.mask.shape:
            raise PositionError(
                f"the position predicate must return a bool tensor of shape {tuple(real.mask.shape)}; "
                f"got {getattr(hit, 'shape', type(hit))}."
            )
        return real.mask & hit.bool()

    def __str__(self) -> str:
        return f"where({getattr(self.predicate, '__name__', 'predicate')})"


@dataclass(frozen=True)
class After(PositionSpec):
    """``spec`` resolved against the real tokens that follow the last occurrence of the token
    sequence ``marker`` in each example, as if they were the whole input.

    With a chat template, ``after(tokenizer, "<|im_start|>user\n", "f5+l5")`` edits the first
    five tokens of the last user message and the last five of the prompt, instead of the first
    five of a system prompt that every example shares. Build it with :func:`after`. An example
    without the marker, or with nothing after it, raises :class:`~reftlens.errors.PositionError`.
    """

    marker: tuple[int, ...]
    spec: PositionSpec = All()

    def site_mask(self, real: RealTokens) -> Tensor:
        if real.tokens is None:
            raise PositionError(f"positions {self} need the input tokens to find the marker.")
        tokens, k = real.tokens, len(self.marker)
        seq = tokens.shape[1]
        if seq < k:
            raise PositionError(f"positions {self}: no example contains the marker {list(self.marker)}.")
        windows = tokens.unfold(1, k, 1)  # [B, seq - k + 1, k]
        marker = torch.tensor(self.marker, dtype=tokens.dtype, device=tokens.device)
        ends = torch.arange(k, seq + 1, device=tokens.device)  # the slot just after each window
        starts = ends - k
        inside = real.mask[:, starts] & real.mask[:, ends - 1]
        hit = (windows == marker).all(-1) & inside
        if not bool(hit.any(1).all()):
            bad = int((~hit.any(1)).nonzero()[0])
            raise PositionError(
                f"positions {self}: example {bad} does not contain the marker tokens {list(self.marker)} "
                "among its real tokens. Use a marker every input has (e.g. the chat template's user header)."
            )
        last_end = torch.where(hit, ends, torch.zeros_like(ends)).amax(1)  # [B]: slot after the last marker
        idx = torch.arange(seq, device=tokens.device)
        sub = real.mask & (idx[None] >= last_end[:, None])
        if not bool(sub.any(1).all()):
            bad = int((~sub.any(1)).nonzero()[0])
            raise PositionError(f"positions {self}: example {bad} has no real tokens after the marker.")
        return self.spec.site_mask(RealTokens.from_mask(sub, tokens))

    def split(self, clamp: bool) -> list[PositionSpec]:
        return [After(self.marker, g) for g in self.spec.split(clamp)]

    def to_json(self) -> Any:
        return {"after": list(self.marker), "then": self.spec.to_json()}

    def __str__(self) -> str:
        return f"{self.spec} after {list(self.marker)}"


def after(marker: Any, spec: Any = "all", *, tokenizer: Any = None) -> After:
    """Positions ``spec`` counted from just after the last occurrence of ``marker`` (a string,
    tokenized by ``tokenizer`` without special tokens added, or a list of token ids).

    >>> positions = after("<|im_start|>user\\n", "f5+l5", tokenizer=model.tokenizer)  # doctest: +SKIP
    >>> Intervention(LoReFT(d, 4), layers=[3, 9, 18, 24], positions=positions)      # doctest: +SKIP

    The marker must tokenize inside a prompt as it does alone, which holds for one that starts with
    a special token such as ChatML's ``<|im_start|>``; check with ``tokenizer.tokenize``.
    """
    if isinstance(marker, str):
        if tokenizer is None:
            raise PositionError(
                f"after({marker!r}, ...) needs tokenizer= to turn the marker into tokens (or pass token ids)."
            )
        if not marker:
            raise PositionError("after() needs a non-empty marker.")
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    else:
        ids = list(marker) if isinstance(marker, (list, tuple)) else None
        if ids is None and isinstance(marker, Tensor) and marker.ndim == 1:
            ids = marker.tolist()
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise PositionError(f"after() needs a marker string or a non-empty list of token ids; got {marker!r}.")
    inner = parse_positions(spec)
    if isinstance(inner, (PerExample, Where, After)):
        raise PositionError(f"after() takes 'all', 'fN+lM', indices or a slice as its spec; got {inner}.")
    return After(tuple(ids), inner)


def _check_in_range(target: Tensor, real: RealTokens, spec: PositionSpec) -> None:
    n = real.lengths[:, None]
    bad = (target < 0) | (target >= n)
    if bool(bad.any()):
        b, k = (int(v) for v in bad.nonzero()[0])
        raise PositionError(
            f"positions {spec} ask for real token {int(target[b, k])} of example {b}, which has "
            f"{int(real.lengths[b])} real tokens. Use indices inside every example, or a relative "
            "spec such as 'l1' or slice(...)."
        )


def parse_positions(spec: Any) -> PositionSpec:
    """Turn any accepted position spec into a :class:`PositionSpec`.

    >>> str(parse_positions("f5+l5")), str(parse_positions([0, -1]))
    ('f5+l5', '[0, -1]')
    """
    if isinstance(spec, PositionSpec):
        return spec
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return All()
    if isinstance(spec, str):
        m = _FIRST_LAST.match(spec.replace(" ", ""))
        if m is None or not any(m.groups()):
            raise PositionError(
                f"unknown position spec {spec!r}; use 'all', 'fN+lM' (first N / last M real tokens), "
                "indices, a slice, per-example indices or a token predicate."
            )
        first, last = int(m.group(1) or 0), int(m.group(2) or 0)
        if not (first or last):
            raise PositionError(_NOTHING.format(spec=repr(spec)))
        return FirstLast(first, last)
    if isinstance(spec, bool):
        raise PositionError(f"position spec {spec!r} is a bool; use 'all' or indices.")
    if isinstance(spec, int):
        return Indices((spec,))
    if isinstance(spec, slice):
        if spec.step is not None and spec.step <= 0:
            raise PositionError(f"position slices need a positive step; got {spec}.")
        return Slice(spec.start, spec.stop, spec.step or 1)
    if isinstance(spec, Tensor):
        if spec.ndim == 1:
            return Indices(tuple(int(i) for i in spec.tolist()))
        return PerExample.build(spec)
    if isinstance(spec, dict):
        return from_json(spec)
    if isinstance(spec, (list, tuple)):
        if all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
            if not spec:
                raise PositionError("an empty list of positions selects nothing; use at least one index.")
            return Indices(tuple(spec))
        if all(isinstance(r, (list, tuple)) for r in spec):
            return PerExample.build(spec)  # type: ignore[arg-type]
    if callable(spec):
        return Where(spec)
    raise PositionError(f"cannot read position spec {spec!r} (type {type(spec).__name__}).")


def from_json(data: Any) -> PositionSpec:
    """Inverse of ``PositionSpec.to_json``; anything else raises :class:`PositionError`."""

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def index(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if data == "all":
        return All()
    if isinstance(data, dict) and "after" in data:
        marker = data["after"]
        if not isinstance(marker, list) or not marker or not all(count(i) for i in marker):
            raise PositionError(f"saved positions {data!r} must be {{'after': [token ids], 'then': spec}}.")
        return after(marker, from_json(data.get("then", "all")))
    if isinstance(data, dict) and "first" in data:
        first, last, clamp = data.get("first"), data.get("last"), data.get("clamp_half", False)
        if not (count(first) and count(last) and isinstance(clamp, bool)):
            raise PositionError(
                f"saved positions {data!r} must be {{'first': N, 'last': M, 'clamp_half': bool}} with counts N, M >= 0."
            )
        if not (first or last):
            raise PositionError(_NOTHING.format(spec=repr(data)))
        return FirstLast(first, last, clamp)
    if isinstance(data, dict) and "indices" in data:
        indices = data["indices"]
        if not isinstance(indices, (list, tuple)) or not indices or not all(index(i) for i in indices):
            raise PositionError(f"saved positions {data!r} must be {{'indices': [...]}}, a non-empty list of ints.")
        return Indices(tuple(indices))
    if isinstance(data, dict) and "slice" in data:
        bounds = data["slice"]
        if not (
            isinstance(bounds, (list, tuple))
            and len(bounds) == 3
            and all(b is None or index(b) for b in bounds[:2])
            and index(bounds[2])
            and bounds[2] > 0
        ):
            raise PositionError(
                f"saved positions {data!r} must be {{'slice': [start, stop, step]}}: ints or null, and a step > 0."
            )
        return Slice(*bounds)
    raise PositionError(
        f"cannot read saved positions {data!r}; expected 'all' or an object with 'first'/'last', 'indices' or 'slice'."
    )


def static_overlap(a: PositionSpec, b: PositionSpec) -> str | None:
    """Describe positions that two specs share on every input long enough, or None."""
    pa, pb = a.anchored(), b.anchored()
    if pa is None or pb is None:
        return None
    if pa == "all" or pb == "all":
        return "every position"
    start, end = pa[0] & pb[0], pa[1] & pb[1]
    parts = []
    if start:
        parts.append(f"real token(s) {sorted(start)}")
    if end:
        parts.append(f"real token(s) {sorted(-i for i in end)} from the end")
    return " and ".join(parts) or None
