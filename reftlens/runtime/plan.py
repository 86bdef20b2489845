"""The plan: a set of interventions resolved for one batch.

A :class:`Plan` says, per site (one unit at one layer's hook), which rows of the flattened
``[batch * seq, ...]`` activation the Φ edits and, for Φs with a source, the source rows that
pair with them. Positions are resolved against each example's real tokens and checked for
collisions here, once per batch; a backend (:mod:`reftlens.runtime.tl_backend` for TransformerLens hook
points, :mod:`reftlens.runtime.hf_backend` for plain transformers modules) only executes it: gather the
rows, apply Φ, scatter them back (:func:`reftlens.runtime.kernel.site_hook`). Nothing here knows about either backend.

Every plan also says which set each row runs (``rows``: set name → its examples; a plain set is a
bank of one, see :mod:`reftlens.runtime.bank`, whose one set runs on every row). Each unit's site
mask keeps only its set's examples, disjointness is checked within each set, and when a call runs
several sets the rows of those whose Φs share a bank key at one hook merge into one site plan that
the kernel runs as one ``forward_many`` call (:func:`stack_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import CollisionError
from reftlens.hook_names import hook_name_for  # noqa: F401  (re-exported: runtime.hook_name_for)
from reftlens.interventions.base import bank_key
from reftlens.positions import RealTokens
from reftlens.sets import Unit, may_share_sites

HookFn = Callable[..., Any]
# hook names whose tensors have no position axis at dim 1
NO_POSITION_AXIS = ("hook_pattern", "hook_attn_scores", "hook_cos", "hook_sin")


@dataclass(eq=False)
class Site:
    """A unit bound to one layer's hook (``hook_point``: the module a backend hooks)."""

    unit: Unit
    layer: int
    hook_name: str  # canonical name on its backend
    hook_point: Any = None

    @property
    def label(self) -> str:
        return f"{self.unit.name!r} at {self.hook_name}"


@dataclass
class SitePlan:
    """A site's rows for one batch: flat row indices (None = every row) and source rows.

    ``shape`` is the ``(batch, seq)`` the indices were made for (None: resolve lazily from the
    tensor the hook sees, every token real). A bank group (several sets' sites at one hook, Φs of
    one bank key) also has ``phis`` and ``which``: row ``i`` of ``index`` runs ``phis[which[i]]``;
    ``site`` is then its first member."""

    site: Site
    index: Tensor | None
    source_rows: Tensor | None = None
    shape: tuple[int, int] | None = None
    phis: list[nn.Module] | None = None
    which: Tensor | None = None
    members: list[Site] | None = None


@dataclass
class Plan:
    """A set resolved for one batch: what every backend executes.

    ``sites``: one :class:`SitePlan` per site, in the order their hooks run; ``tokens`` and
    ``attention_mask`` (None when unpadded) are the model inputs; ``real`` the real tokens and
    ``masks`` each unit's boolean site mask ``[batch, seq]`` (keyed by ``id(unit)``).
    """

    sites: list[SitePlan]
    tokens: Tensor | None = None
    attention_mask: Tensor | None = None
    real: RealTokens | None = None
    masks: dict[int, Tensor] = field(default_factory=dict)
    rows: dict[str, Tensor] | None = None  # each set this call runs → its examples (bool [batch]); None: lazy

    @property
    def shape(self) -> tuple[int, int] | None:
        return None if self.tokens is None else (self.tokens.shape[0], self.tokens.shape[1])

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{p.site.hook_name}: {'all' if p.index is None else p.index.numel()} rows" for p in self.sites
        )
        return f"Plan(shape={self.shape}, sites=[{rows}])"


def site_masks(units: Sequence[Unit], real: RealTokens, rows: Mapping[Any, Tensor]) -> dict[int, Tensor]:
    """One boolean site mask ``[batch, seq]`` per unit of the sets in ``rows`` (keyed by
    ``id(unit)``), each kept to its set's examples."""
    return {id(u): u.positions.site_mask(real) & rows[u.adapter][:, None] for u in units if u.adapter in rows}


def every_set(units: Sequence[Unit], batch: int, device: torch.device | str) -> dict[Any, Tensor]:
    """Rows for a call that runs each unit's set on every example (a plain set, an analysis's units)."""
    ones = torch.ones(batch, dtype=torch.bool, device=device)
    return dict.fromkeys((u.adapter for u in units), ones)


def set_names(known: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(known)[:8])
    return shown + (f" and {len(known) - 8} more" if len(known) > 8 else "")


def flat_index(mask: Tensor) -> Tensor | None:
    """Row indices into ``[batch*seq, ...]`` for a site mask; None when it selects every row."""
    if bool(mask.all()):
        return None
    return mask.reshape(-1).nonzero().squeeze(1)


def resolve(
    sites: Sequence[Site], units: Sequence[Unit], frame: RealTokens, rows: Mapping[Any, Tensor] | None = None
) -> tuple[list[SitePlan], dict[int, Tensor]]:
    """Site masks → per-site row indices, checked for collisions: ``(site plans, masks)``.

    ``rows``: each set this call runs → its examples (bool ``[batch]``); None runs every unit's set
    on every example. Only the sets present get site plans (:func:`stack_groups`)."""
    if rows is None:
        rows = every_set(units, frame.mask.shape[0], frame.mask.device)
    masks = site_masks(units, frame, rows)
    sites = [s for s in sites if id(s.unit) in masks]
    check_disjoint(sites, masks, frame)
    shape = (frame.mask.shape[0], frame.mask.shape[1])
    return stack_groups([SitePlan(s, flat_index(masks[id(s.unit)]), None, shape) for s in sites]), masks


def every_row(
    sites: Sequence[Site],
    units: Sequence[Unit],
    batch: int,
    seq: int,
    device: torch.device | str,
    rows: Mapping[Any, Tensor] | None = None,
) -> list[SitePlan]:
    """Site plans that edit every token of each set's own examples (``rows``; None: every unit's
    set on every example): the generated tokens of ``intervene_on="all"``. Checked for collisions."""
    if rows is None:
        rows = every_set(units, batch, device)
    masks = {id(u): rows[u.adapter][:, None].expand(batch, seq) for u in units if u.adapter in rows}
    sites = [s for s in sites if id(s.unit) in masks]
    check_disjoint(sites, masks, RealTokens.unpadded(batch, seq, device))
    return stack_groups([SitePlan(s, flat_index(masks[id(s.unit)]), None, (batch, seq)) for s in sites])


def span(
    plan: Plan, sites: Sequence[Site], width: int, prompt: Mapping[Any, bool], generated: Mapping[Any, bool]
) -> list[SitePlan]:
    """The plan's sites over ``width`` columns (the plan's own, then appended ones): each set edits
    its planned positions where ``prompt[set]`` and every appended column of its examples where
    ``generated[set]``; a set that edits neither gets no site. Checked for collisions when appended
    columns are edited."""
    batch, seq = plan.shape
    more = width - seq
    kept, masks = [], {}
    for s in sites:
        u = s.unit
        if id(u) not in plan.masks or not (prompt[u.adapter] or (generated[u.adapter] and more > 0)):
            continue
        planned = plan.masks[id(u)] if prompt[u.adapter] else torch.zeros_like(plan.masks[id(u)])
        extra = plan.rows[u.adapter][:, None].expand(batch, more) & generated[u.adapter]
        masks[id(u)] = torch.cat([planned, extra], 1)
        kept.append(s)
    if more > 0 and any(generated[u.adapter] for u in {id(s.unit): s.unit for s in kept}.values()):
        extra = torch.ones(batch, more, dtype=torch.bool, device=plan.tokens.device)
        check_disjoint(kept, masks, RealTokens.from_mask(torch.cat([plan.real.mask, extra], 1)))
    source = {id(m): p.source_rows for p in plan.sites for m in _members(p)}
    return stack_groups([SitePlan(s, flat_index(masks[id(s.unit)]), source.get(id(s)), (batch, width)) for s in kept])


def stack_groups(plans: Sequence[SitePlan]) -> list[SitePlan]:
    """Site plans for execution. With one set in the call they run as planned, each site its own
    call (exactly what the set computes alone). With several sets, sites with no rows are dropped,
    and at each hook the sites whose Φs share a bank key (same type and shape, see
    :meth:`reftlens.Phi.bank_key`) are merged into one plan whose rows run as one ``forward_many``
    call over the stacked parameters. Φs without a key keep one plan each: one call per set at that
    site, never one per example. Merging is safe because each example runs one set and units within
    a set are disjoint per example."""
    if len({p.site.unit.adapter for p in plans}) < 2:
        return list(plans)
    out: list[SitePlan | list[SitePlan]] = []
    groups: dict[tuple, list[SitePlan]] = {}
    for p in plans:
        if p.index is not None and p.index.numel() == 0:
            continue
        key = bank_key(p.site.unit.phi)
        if key is None:
            out.append(p)
            continue
        key = (p.site.hook_name, p.site.unit.stack or 0, key)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(p)
    return [_merge(g) if isinstance(g, list) else g for g in out]


def _merge(members: list[SitePlan]) -> SitePlan:
    if len(members) == 1:
        return members[0]
    batch, seq = members[0].shape
    device = next((m.index.device for m in members if m.index is not None), None)
    slot: dict[int, int] = {}
    phis: list[nn.Module] = []
    index, which = [], []
    for m in members:
        phi = m.site.unit.phi
        k = slot.setdefault(id(phi), len(phis))
        if k == len(phis):
            phis.append(phi)
        idx = m.index if m.index is not None else torch.arange(batch * seq, device=device)
        index.append(idx)
        which.append(torch.full_like(idx, k))
    return SitePlan(
        members[0].site, torch.cat(index), None, (batch, seq), phis, torch.cat(which), [m.site for m in members]
    )


def _members(plan: SitePlan) -> list[Site]:
    return plan.members or [plan.site]


def check_disjoint(sites: Sequence[Site], masks: dict[int, Tensor], real: RealTokens) -> None:
    """Raise if two sites on one hook select the same position of one example."""
    by_hook: dict[tuple[str, str | None], list[Site]] = {}
    for s in sites:  # bank sets never share an example, so only sites of one set can collide
        by_hook.setdefault((s.hook_name, s.unit.adapter), []).append(s)
    for (hook_name, _), group in by_hook.items():
        for i, a in enumerate(group):
            for c in group[i + 1 :]:
                if may_share_sites(a.unit, c.unit):
                    continue
                clash = masks[id(a.unit)] & masks[id(c.unit)]
                if bool(clash.any()):
                    _collision(a, c, clash, hook_name, real)


def _collision(a: Site, c: Site, clash: Tensor, hook_name: str, real: RealTokens) -> None:
    b, p = (int(v) for v in clash.nonzero()[0])
    rel = p - int(real.starts[b])
    hint = (
        " These are untied first/last groups that meet on a short input: pass overlap='clamp' "
        "(pyreft's remedy: first/last n each clamped to half the input) or use longer inputs."
        if a.unit.origin is c.unit.origin
        else " Give them disjoint positions or layers, or an explicit order with stack=."
    )
    raise CollisionError(
        f"interventions {a.unit.name!r} ({a.unit.positions}) and {c.unit.name!r} ({c.unit.positions}) "
        f"both edit {hook_name} at example {b}, real token {rel} (padded position {p}) of an input "
        f"with {int(real.lengths[b])} real tokens.{hint}"
    )
