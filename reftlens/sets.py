"""⟨Φ, P, L⟩: the intervention tuple, tied/untied expansion and the static disjointness check."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from torch import nn

from reftlens.errors import CollisionError, ConfigError
from reftlens.hook_names import canonical_hook
from reftlens.interventions.base import as_phi, phi_label, takes_source
from reftlens.positions import PositionSpec, parse_positions, static_overlap

_UNTIED = (False, True, "layers", "positions")


class Intervention:
    """The ReFT paper's intervention ⟨Φ, P, L⟩: apply ``phi`` at ``positions`` of ``layers``.

    Args:
        phi: a Φ (``LoReFT(d, r)``, ``Interchange()``, any module or callable).
        layers: an int, a list of ints, a range or ``"all"``.
        positions: ``"all"``, ``"f5+l5"``, indices, a slice, per-example indices, a predicate
            (see :mod:`reftlens.positions`).
        hook: the TransformerLens hook at each layer: ``"resid_post"`` (default),
            ``"resid_pre"``, ``"resid_mid"``, ``"attn_out"``, ``"mlp_out"``, ROME's ``"resid"`` /
            ``"attn"`` / ``"mlp"`` (recorded as ``"resid_post"`` / ``"attn_out"`` / ``"mlp_out"``),
            or any hook in a block (``"attn.hook_z"``); see :mod:`reftlens.hook_names`.
        source_positions: where to read the source for a Φ with a source (default: the same
            spec, resolved against the source example).
        untied: ``False`` shares one Φ everywhere (tied). ``"layers"`` gives every layer its
            own copy, ``"positions"`` every position group (``"f5+l5"`` → f5 and l5), ``True``
            both. Copies start equal to ``phi`` and train apart.
        overlap: for untied position groups that meet on short inputs: ``"error"`` (default)
            or ``"clamp"`` (pyreft's remedy: first/last n each clamped to half the input).
        stack: an explicit order for interventions that edit the same site on purpose (e.g. a
            patch on top of a LoReFT's output). Two interventions may share a site only when
            both set ``stack`` to different values; the lower one applies first.
        name: a label used in messages and saves.

    >>> from reftlens import LoReFT
    >>> Intervention(LoReFT(64, 4), layers=[1, 3], positions="f5+l5", untied=True)
    Intervention(loreft(rank=4), layers=[1, 3], positions=f5+l5, hook=resid_post, untied=True)
    """

    def __init__(
        self,
        phi: Any,
        layers: int | Sequence[int] | str = 0,
        positions: Any = "all",
        hook: str = "resid_post",
        *,
        source_positions: Any = None,
        untied: bool | str = False,
        overlap: str = "error",
        stack: int | None = None,
        name: str | None = None,
    ):
        self.phi = as_phi(phi)
        self.takes_source = takes_source(self.phi)
        self.layers = _parse_layers(layers)
        self.positions = parse_positions(positions)
        self.source_positions = None if source_positions is None else parse_positions(source_positions)
        if not isinstance(hook, str) or not hook:
            raise ConfigError(f"hook must be a TransformerLens hook name such as 'resid_post'; got {hook!r}.")
        self.hook = canonical_hook(hook)  # "mlp" → "mlp_out": one set of names everywhere
        if untied not in _UNTIED:
            raise ConfigError(f"untied must be one of {_UNTIED}; got {untied!r}.")
        self.untied = untied
        if overlap not in ("error", "clamp"):
            raise ConfigError(f"overlap must be 'error' or 'clamp'; got {overlap!r}.")
        self.overlap = overlap
        if stack is not None and (not isinstance(stack, int) or isinstance(stack, bool)):
            raise ConfigError(f"stack must be an int (the order among interventions sharing a site); got {stack!r}.")
        self.stack = stack
        if self.source_positions is not None and not self.takes_source:
            raise ConfigError(f"source_positions given for {phi_label(self.phi)}, which takes no source.")
        self.name = name or phi_label(self.phi)

    def __repr__(self) -> str:
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        extra = f", untied={self.untied!r}" if self.untied else ""
        extra += f", stack={self.stack}" if self.stack is not None else ""
        return f"Intervention({self.name}, layers={layers}, positions={self.positions}, hook={self.hook}{extra})"

    def __eq__(self, other: object) -> bool:
        """Equal when they hold the same Φ object at the same sites with the same options."""
        if not isinstance(other, Intervention):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((id(self.phi), self.layers, self.hook))

    def _key(self) -> tuple:
        return (
            id(self.phi),
            self.layers,
            self.positions,
            self.source_positions,
            self.hook,
            self.untied,
            self.overlap,
            self.stack,
            self.name,
        )

    def to(self, *args: Any, **kwargs: Any) -> "Intervention":
        """Move or cast Φ (``nn.Module.to`` arguments); returns the intervention itself."""
        self.phi.to(*args, **kwargs)
        return self

    def expand(self, n_layers: int) -> list["Unit"]:
        """Materialise into units that each own one Φ (copies for untied groups)."""
        layers = list(range(n_layers)) if self.layers == "all" else list(self.layers)
        for layer in layers:
            if not 0 <= layer < n_layers:
                raise ConfigError(
                    f"intervention {self.name}: layer {layer} does not exist; the model has layers 0..{n_layers - 1}."
                )
        split_layers = self.untied in (True, "layers")
        split_pos = self.untied in (True, "positions")
        groups = self.positions.split(self.overlap == "clamp") if split_pos else [self.positions]
        layer_groups = [[l] for l in layers] if split_layers else [layers]
        units: list[Unit] = []
        many = len(groups) * len(layer_groups) > 1
        for lg in layer_groups:
            for pos in groups:
                phi = copy.deepcopy(self.phi) if many and units else self.phi
                label = self.name
                if split_layers:
                    label += f"@L{lg[0]}"
                if split_pos and len(groups) > 1:
                    label += f"[{pos}]".replace(" (clamped to half)", "")
                src = self.source_positions if self.source_positions is not None else None
                units.append(Unit(label, phi, self.takes_source, tuple(lg), pos, src, self.hook, self))
        return units


@dataclass(eq=False)
class Unit:
    """One Φ at one position group over one or more layers (the result of expansion)."""

    name: str
    phi: nn.Module
    takes_source: bool
    layers: tuple[int, ...]
    positions: PositionSpec
    source_positions: PositionSpec | None
    hook: str
    origin: Intervention = field(repr=False)
    adapter: str | None = None  # the set it belongs to (a plain set's: runtime.bank.DEFAULT; None: no set)

    @property
    def stack(self) -> int | None:
        return self.origin.stack


def set_units(
    interventions: Sequence[Intervention], n_layers: int, adapter: str | None = None, *, named: bool = True
) -> list[Unit]:
    """Expand a set into units marked with their set ``adapter``; in a bank (``named``) each unit is
    named ``set/name``, in a plain set (a bank of one, ``named=False``) by its own name."""
    units = [u for iv in interventions for u in iv.expand(n_layers)]
    if adapter is None:
        return units
    return [dataclasses.replace(u, name=f"{adapter}/{u.name}" if named else u.name, adapter=adapter) for u in units]


def may_share_sites(a: "Unit", b: "Unit") -> bool:
    """Units may edit the same site only when both carry distinct explicit stack orders."""
    return a.stack is not None and b.stack is not None and a.stack != b.stack


def _parse_layers(layers: Any) -> tuple[int, ...] | str:
    if isinstance(layers, str):
        if layers == "all":
            return "all"
        try:
            return tuple(int(x) for x in layers.replace(",", ";").split(";"))
        except ValueError:
            raise ConfigError(f"layers must be an int, a list of ints, 'all' or '3;9;18'; got {layers!r}.") from None
    if isinstance(layers, bool):
        raise ConfigError(f"layers must be an int, a list of ints or 'all'; got {layers!r}.")
    if isinstance(layers, int):
        return (layers,)
    if isinstance(layers, Iterable):
        out = tuple(layers)
        if not out or not all(isinstance(l, int) and not isinstance(l, bool) for l in out):
            raise ConfigError(f"layers must be a non-empty list of ints; got {layers!r}.")
        if len(set(out)) != len(out):
            raise ConfigError(f"layers {list(out)} repeat a layer; list each layer once.")
        return out
    raise ConfigError(f"layers must be an int, a list of ints or 'all'; got {layers!r}.")


def check_static_disjoint(units: Sequence[tuple[Unit, str, int]]) -> None:
    """Raise if two units certainly edit the same (hook, layer, position).

    ``units`` holds (unit, canonical hook name, layer) triples. Units of different bank sets never
    collide: each example runs one set.
    """
    by_site: dict[str, list[Unit]] = {}
    for unit, hook_name, _ in units:
        by_site.setdefault(hook_name, []).append(unit)
    for hook_name, group in by_site.items():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                if may_share_sites(a, b) or a.adapter != b.adapter:
                    continue
                where = static_overlap(a.positions, b.positions)
                if where is not None:
                    raise CollisionError(
                        f"interventions {a.name!r} ({a.positions}) and {b.name!r} ({b.positions}) both edit "
                        f"{hook_name} at {where}. Two Φs may not edit one site: give them disjoint positions "
                        "or layers, or, to apply one on top of the other, give both an explicit order with stack=."
                    )
