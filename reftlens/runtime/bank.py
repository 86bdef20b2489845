"""Named sets of interventions bound to one model, and the per-call object that chooses among them.

A :class:`Bank` is what a :class:`~reftlens.ReftModel` holds: named sets of interventions, each
expanded into units and bound to hook points. **A plain set is a bank of one**: it lives under the
name :data:`DEFAULT` and is marked unnamed (``named=False``), which only changes what the public
edge accepts (no ``adapters=`` needed, unit names without a ``set/`` prefix, a plain save). Every
path below the edge — the plan's per-row set choice, widening for generation, the batched Φ rows —
is one code for one set or many.

What one call chooses travels as a :class:`Call` passed explicitly through the engine and the
backends (never written onto a module): which set each row runs, which tokens each set edits
(``intervene_on``) and whether transformers' ``generate`` may have repeated the rows.

Each set also carries its :class:`SetSettings`: the options it was trained with (``intervene_on``,
``chat_template``, ``prepend_bos``), saved with it and applied by default when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from reftlens import inputs as inputs_mod
from reftlens.errors import ConfigError, PositionError
from reftlens.interventions.base import phi_d_model, phi_label
from reftlens.interventions.directional import Scaled
from reftlens.positions import RealTokens
from reftlens.runtime.plan import Plan, Site, SitePlan, resolve, set_names
from reftlens.runtime.tl_backend import bind, gather_sources
from reftlens.sets import Intervention, Unit, check_static_disjoint, set_units

#: the name a plain set lives under (a plain set is a bank of one)
DEFAULT = "default"
#: which tokens a generation edits: the prompt's planned positions, those and every generated token,
#: or the generated tokens only
INTERVENE_ON = ("prompt", "all", "generated")

Sets = Intervention | Sequence[Intervention] | Mapping[str, Intervention | Sequence[Intervention]]


@dataclass(frozen=True)
class SetSettings:
    """What a set was trained with, recorded on it by :func:`reftlens.train`, saved with it and applied
    by default when it runs (an explicit argument overrides). None: not recorded (the defaults).

    ``intervene_on``: the tokens it edits in generation (``"prompt"``, ``"all"``, ``"generated"``);
    ``chat_template`` and ``prepend_bos``: how its training prompts were tokenized."""

    intervene_on: str | None = None
    chat_template: bool | None = None
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        check_settings(
            {"intervene_on": self.intervene_on, "chat_template": self.chat_template, "prepend_bos": self.prepend_bos},
            "SetSettings",
            ConfigError,
        )

    def to_json(self) -> dict[str, Any]:
        return {"intervene_on": self.intervene_on, "chat_template": self.chat_template, "prepend_bos": self.prepend_bos}


def check_settings(values: Mapping[str, Any], where: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``where`` and the field unless each setting is None or a valid value."""
    on = values.get("intervene_on")
    if on is not None and on not in INTERVENE_ON:
        raise error(f"{where}: intervene_on must be null or one of {INTERVENE_ON}; got {on!r}.")
    for key in ("chat_template", "prepend_bos"):
        if values.get(key) is not None and not isinstance(values[key], bool):
            raise error(f"{where}: {key} must be null, true or false; got {values[key]!r}.")


@dataclass(frozen=True)
class Call:
    """One call's choices, passed explicitly to the engine and the backends.

    ``sets``: the set each row runs — one name per row (None: the base model) or one name for
    every row. ``intervene_on``: one mode for every set, a mode per set name, or None for each
    set's own (its :class:`SetSettings`, else ``"prompt"``). ``repeat_rows``: the rows may have been
    repeated by transformers' ``generate`` (``num_return_sequences``, beams), so a list of names
    shorter than the batch by a whole factor is repeated to match."""

    sets: str | tuple[str | None, ...] | None = DEFAULT
    intervene_on: str | Mapping[str, str] | None = None
    repeat_rows: bool = False

    def rows(self, known: Sequence[str], batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Each set this call runs → a boolean mask of its rows ``[batch]``."""
        names = self.sets
        if self.repeat_rows and isinstance(names, tuple) and names and batch != len(names) and batch % len(names) == 0:
            names = tuple(n for n in names for _ in range(batch // len(names)))  # generate's row expansion
        return choose_rows(names, known, batch, device)

    def modes(self, settings: Mapping[str, SetSettings]) -> dict[str, str]:
        """Each set's ``intervene_on`` for this call: the call's, else the set's own, else ``"prompt"``."""
        own = {name: s.intervene_on or "prompt" for name, s in settings.items()}
        if self.intervene_on is None:
            return own
        if isinstance(self.intervene_on, str):
            return dict.fromkeys(own, self.intervene_on)
        return {**own, **self.intervene_on}


def choose_rows(
    adapters: str | Sequence[str | None] | None, known: Sequence[str], batch: int, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Each set named in ``adapters`` (one name per example, None for the base model; a single
    name for every example) → a boolean mask of its examples ``[batch]``."""
    if adapters is None:
        raise ConfigError(
            f"this ReftModel holds a bank of {len(known)} sets ({set_names(known)}): pass adapters= with one set "
            "name per example (None for the base model), or one name for every example."
        )
    if isinstance(adapters, str):
        if adapters not in known:
            raise ConfigError(
                f"adapters[0] is {adapters!r}, which is not a set of this bank; the sets are {set_names(known)}. "
                "Add it with reft.add_adapter(name, interventions) or use None for the base model."
            )
        return {adapters: torch.ones(batch, dtype=torch.bool, device=device)}
    adapters = list(adapters)
    if len(adapters) != batch:
        raise ConfigError(
            f"adapters= names {len(adapters)} sets but the batch has {batch} examples; give one name per example "
            "(None for the base model)."
        )
    wanted = set(known)
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(adapters):
        if name is None:
            continue
        if not isinstance(name, str) or name not in wanted:
            raise ConfigError(
                f"adapters[{i}] is {name!r}, which is not a set of this bank; the sets are {set_names(known)}. "
                "Add it with reft.add_adapter(name, interventions) or use None for the base model."
            )
        positions.setdefault(name, []).append(i)
    out = {}
    for name, idx in positions.items():
        row = torch.zeros(batch, dtype=torch.bool)
        row[idx] = True
        out[name] = row.to(device)
    return out


class Bank:
    """Named sets of interventions bound to a TransformerLens model: their units, sites and settings.

    ``interventions``: one Intervention or a list (a plain set, held under :data:`DEFAULT`), or a
    dict of named sets (``named=True``)."""

    def __init__(self, model: Any, interventions: Sets):
        self.model = model
        self.named = isinstance(interventions, Mapping)
        self.sets: dict[str, list[Intervention]] = {}
        self.settings: dict[str, SetSettings] = {}
        self.units: list[Unit] = []
        self.sites: list[Site] = []
        if self.named:
            if not interventions:
                raise ConfigError("a bank needs at least one named set: {'name': [Intervention(...), ...]}.")
            sets = {set_name(name): as_set(ivs, f"bank set {name!r}") for name, ivs in interventions.items()}
        else:
            sets = {DEFAULT: as_set(interventions, "ReftModel")}
        if self.named:  # a plain set's widths are checked per site by bind(), with the hook's own message
            check_same_model(sets, model.cfg.d_model)
        for name, ivs in sets.items():
            self._bind(name, ivs)

    @property
    def names(self) -> list[str]:
        return list(self.sets)

    @property
    def interventions(self) -> list[Intervention]:
        return [iv for ivs in self.sets.values() for iv in ivs]

    def phis(self) -> list[nn.Module]:
        """Every distinct Φ, in order."""
        return unique_phis(self.units)

    def _bind(self, name: str, ivs: list[Intervention]) -> list[Unit]:
        units = set_units(ivs, self.model.cfg.n_layers, name, named=self.named)
        sites = bind(self.model, units)
        check_static_disjoint([(s.unit, s.hook_name, s.layer) for s in sites])
        self.sets[name] = ivs
        self.settings.setdefault(name, SetSettings())
        self.units += units
        # hooks run in registration order: explicitly stacked interventions go by their stack value
        self.sites = sorted(self.sites + sites, key=lambda s: s.unit.stack or 0)
        return units

    def add(self, name: Any, interventions: Intervention | Sequence[Intervention]) -> list[Unit]:
        """Add a named set; returns its units."""
        if not self.named:
            raise ConfigError("add_adapter needs a bank: build ReftModel(model, {'name': [...], ...}) with named sets.")
        name = set_name(name)
        if name in self.sets:
            raise ConfigError(
                f"the bank already has a set {name!r}; remove it first with reft.remove_adapter({name!r})."
            )
        ivs = as_set(interventions, f"bank set {name!r}")
        check_same_model({**self.sets, name: ivs}, self.model.cfg.d_model)
        return self._bind(name, ivs)

    def remove(self, name: str) -> list[Intervention]:
        if not self.named or name not in self.sets:
            raise ConfigError(f"there is no set {name!r} to remove; the sets are {self.names if self.named else []}.")
        if len(self.sets) == 1:
            raise ConfigError(f"{name!r} is the bank's only set; a bank keeps at least one.")
        self.settings.pop(name)
        self.units = [u for u in self.units if u.adapter != name]
        self.sites = [s for s in self.sites if s.unit.adapter != name]
        return self.sets.pop(name)

    def record(self, names: Any, **settings: Any) -> None:
        """Record settings on the sets ``names`` (None stands for a plain set's one set)."""
        for name in {DEFAULT if n is None and not self.named else n for n in names}:
            if name in self.settings:
                self.settings[name] = replace(self.settings[name], **settings)

    def call(self, adapters: str | Sequence[str | None] | None, intervene_on: Any = None) -> Call:
        """The :class:`Call` for the public ``adapters=`` choice: a plain set runs on every row and
        takes no choice; a bank needs one (checked when rows are chosen)."""
        if not self.named:
            if adapters is not None:
                raise ConfigError(
                    "adapters= chooses a set per example, but this ReftModel holds one set. Build a bank "
                    "with named sets: ReftModel(model, {'name': [...], ...})."
                )
            return Call(DEFAULT, intervene_on)
        return Call(adapters if adapters is None or isinstance(adapters, str) else tuple(adapters), intervene_on)

    # ---- planning -----------------------------------------------------------------------

    def plan(
        self,
        inputs: Any = None,
        sources: Any = None,
        *,
        attention_mask: Tensor | None = None,
        source_attention_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        call: Call = Call(),
        check_finite: bool = True,
    ) -> Plan:
        """Resolve the sets for one batch (see :meth:`reftlens.ReftModel.plan`)."""
        if inputs is None:
            if self.named:
                raise ConfigError("a bank resolves its sets per example: pass the inputs together with adapters=.")
            needs_source = [s for s in self.sites if s.unit.takes_source]
            if needs_source or sources is not None:
                raise ValueError(
                    f"intervention {needs_source[0].label if needs_source else ''} takes a source: pass the "
                    "base inputs and sources= to reft.hooks(inputs, sources=...)."
                )
            return Plan([SitePlan(s, None) for s in self.sites])
        tokens, real = inputs_mod.encode(self.model, inputs, attention_mask, prepend_bos=prepend_bos)
        frame = real
        if prompt_mask is not None:
            frame = RealTokens.from_mask(prompt_mask.to(real.mask.device).bool() & real.mask, tokens)
        rows = call.rows(self.names, tokens.shape[0], tokens.device)
        sites, masks = resolve(self.sites, self.units, frame, rows)
        plan = Plan(sites, tokens, None if bool(real.mask.all()) else real.mask.long(), real, masks, rows)
        self._add_sources(plan, sources, source_attention_mask, prepend_bos, check_finite)
        return plan

    def _add_sources(
        self,
        plan: Plan,
        sources: Any,
        source_attention_mask: Tensor | None,
        prepend_bos: bool | None,
        check_finite: bool,
    ) -> None:
        needs_source = [p.site for p in plan.sites if p.site.unit.takes_source]  # of the sets present
        if needs_source and sources is None:
            raise ValueError(
                f"intervention {needs_source[0].label} takes a source; pass sources= (one per input example)."
            )
        if sources is None:
            return
        if not any(s.unit.takes_source for s in self.sites):
            raise ValueError("sources= given but no intervention in this set takes a source.")
        if not needs_source:
            return
        src_tokens, src_real = inputs_mod.encode(
            self.model, sources, source_attention_mask, what="sources", prepend_bos=prepend_bos
        )
        if src_tokens.shape[0] != plan.tokens.shape[0]:
            raise ValueError(
                f"sources have {src_tokens.shape[0]} examples but the inputs have {plan.tokens.shape[0]}; "
                f"intervention {needs_source[0].label} pairs source example i with input example i."
            )
        src_masks = {}
        for u in {id(s.unit): s.unit for s in needs_source}.values():
            spec = u.source_positions or u.positions
            m = spec.site_mask(src_real) & plan.rows[u.adapter][:, None]
            n_base, n_src = plan.masks[id(u)].sum(1), m.sum(1)
            if not torch.equal(n_base, n_src):
                b = int((n_base != n_src).nonzero()[0])
                raise PositionError(
                    f"intervention {u.name!r}: example {b} selects {int(n_base[b])} input positions "
                    f"({u.positions}) but {int(n_src[b])} source positions ({spec}); each base row needs one "
                    "source row. Use equal-length inputs, a spec with fixed counts such as 'l3', or source_positions=."
                )
            src_masks[id(u)] = m
        gather_sources(self.model, plan.sites, src_masks, src_tokens, src_real, check_finite)


def check_placed(phis: Sequence[nn.Module], units: Sequence[Unit], device: torch.device) -> None:
    """Raise unless every Φ holds values (no ``meta`` tensors) and sits on ``device``."""
    check_materialised(phis, units, device)
    for phi in phis:
        for t in list(phi.parameters()) + list(phi.buffers()):
            if t.device != device:
                raise ConfigError(
                    f"Φ {phi_label(phi)} has tensors on {t.device} but the model is on {device}; "
                    f"call reft.to({str(device)!r})."
                )
            break


def check_materialised(phis: Sequence[nn.Module], units: Sequence[Unit], device: torch.device) -> None:
    """Raise if a Φ has tensors on the ``meta`` device: they hold no values, so the Φ can
    neither run nor be moved (``.to()`` cannot copy out of a meta tensor)."""
    for phi in phis:
        meta = [n for n, t in [*phi.named_parameters(), *phi.named_buffers()] if t.is_meta]
        if meta:
            user = next(u.name for u in units if u.phi is phi)
            raise ConfigError(
                f"Φ {phi_label(phi)} of intervention {user!r} is on the meta device: its tensors "
                f"({', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}) have shapes but no values, so it can "
                f"neither run nor be moved. Materialise it first: phi.to_empty(device={str(device)!r}), then "
                "give it values (phi.load_state_dict(...) or your own initialisation); or build it off the meta "
                "device."
            )


def as_set(interventions: Any, what: str) -> list[Intervention]:
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions) if isinstance(interventions, (list, tuple)) else interventions
    if (
        not isinstance(interventions, list)
        or not interventions
        or not all(isinstance(iv, Intervention) for iv in interventions)
    ):
        raise ConfigError(
            f"{what} needs one Intervention or a non-empty list of them; got {type(interventions).__name__}."
        )
    return interventions


def set_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a bank's sets are named by non-empty strings; got {name!r}.")
    return name


def check_same_model(bank: Mapping[str, Sequence[Intervention]], d_model: int) -> None:
    """Every set of a bank runs on the one base model: each Φ that declares a width must have its d_model."""
    widths = {name: sorted({d for iv in ivs if (d := phi_d_model(iv.phi)) is not None}) for name, ivs in bank.items()}
    for name, w in widths.items():
        if w and w != [d_model]:
            fits = [n for n, v in widths.items() if v == [d_model]]
            also = f"sets {fits[:3]} and " if fits else ""
            raise ConfigError(
                f"the bank's sets target different models: set {name!r} has Φs of width {w}, but {also}this model "
                f"have d_model={d_model}. Every set of a bank runs on the one base model: build its Φs with "
                "d_model=model.cfg.d_model, or keep sets for another model in a bank of their own."
            )


def scaled_interventions(units: Sequence[Unit], alpha: float | Tensor) -> dict[str, list[Intervention]]:
    """``units`` as interventions whose Φs are :class:`~reftlens.interventions.Scaled` views (one per
    distinct Φ, sharing its parameters), at the same sites, grouped by set under their names within
    it (see :meth:`reftlens.ReftModel.scaled`)."""
    wrappers: dict[int, Scaled] = {}
    sets: dict[str, list[Intervention]] = {}
    for u in units:  # the bound units: an untied set's per-layer Φs are the ones that train
        sets.setdefault(u.adapter, []).append(
            Intervention(
                wrappers.setdefault(id(u.phi), Scaled(u.phi, alpha)),
                layers=list(u.layers),
                positions=u.positions,
                hook=u.hook,
                source_positions=u.source_positions,
                stack=u.stack,
                name=u.name.removeprefix(f"{u.adapter}/"),
            )
        )
    return sets


def unique_phis(units: Sequence[Unit]) -> list[nn.Module]:
    unique: dict[int, nn.Module] = {}
    for u in units:
        unique.setdefault(id(u.phi), u.phi)
    return list(unique.values())
