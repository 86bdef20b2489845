"""The TransformerLens backend: execute a :class:`~reftlens.runtime.plan.Plan` on hook points.

Hooks are TransformerLens functions ``(tensor, hook) -> tensor`` added to the named hook points
for the span of one call and removed afterwards, also on an exception; nobody else's hooks are
touched, so reftlens's edits mix with a user's own ``run_with_hooks`` code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ConfigError
from reftlens.hook_names import unknown_hook
from reftlens.interventions.base import phi_d_model
from reftlens.positions import RealTokens
from reftlens.runtime.compat import pad_row_guard
from reftlens.runtime.kernel import check_finite_source, site_hook
from reftlens.runtime.plan import (
    NO_POSITION_AXIS,
    HookFn,
    Plan,
    Site,
    SitePlan,
    flat_index,
    hook_name_for,
)
from reftlens.sets import Unit

_D_MODEL_HOOKS = ("hook_in", "hook_out", "ln2.hook_in", "attn.hook_out", "mlp.hook_out")


def hook_points(model: Any, names: Sequence[str]) -> list[nn.Module]:
    """The hook points named ``names`` (TransformerLens 4.3 rebuilds ``hook_dict`` with its aliases
    on every access, so it is read once)."""
    hook_dict = model.hook_dict
    return [hook_dict[n] for n in names]


def bind(model: Any, units: Sequence[Unit], hook_dict: dict[str, nn.Module] | None = None) -> list[Site]:
    """Resolve each unit's hook at each of its layers, checking names, position axes and widths.
    ``hook_dict``: the model's, read once by a caller that binds many times (TransformerLens 4.3
    rebuilds it on every access)."""
    hook_dict = model.hook_dict if hook_dict is None else hook_dict
    sites = []
    for unit in units:
        for layer in unit.layers:
            name = hook_name_for(unit.hook, layer)
            point = hook_dict.get(name)
            if point is None:
                raise unknown_hook(unit.hook, layer, hook_dict, who=f"intervention {unit.name!r}: ")
            canonical = point.name or name
            if canonical.endswith(NO_POSITION_AXIS) or getattr(point, "pos_dim", None) not in (None, 1):
                raise ConfigError(
                    f"intervention {unit.name!r}: hook {canonical} has no position axis at dim 1, so "
                    "positions cannot select rows of it. Use a hook shaped [batch, pos, ...]."
                )
            sites.append(Site(unit, layer, canonical, point))
    d_model = model.cfg.d_model
    for site in sites:
        d = phi_d_model(site.unit.phi)
        if d is not None and d != d_model and site.hook_name.split(".", 2)[-1] in _D_MODEL_HOOKS:
            raise ConfigError(
                f"intervention {site.unit.name!r} expects hidden width d_model={d}, but {site.hook_name} "
                f"carries width {d_model}. Build the Φ with d_model={d_model} (model.cfg.d_model)."
            )
    return sites


def attach(hooks: Sequence[tuple[nn.Module, HookFn]]) -> list[tuple[nn.Module, Any]]:
    """Add hooks to their hook points, all or none."""
    handles: list[tuple[nn.Module, Any]] = []
    try:
        for point, fn in hooks:
            handles.append((point, point.add_hook(fn, dir="fwd")))
    except BaseException:
        detach(handles)
        raise
    return handles


def detach(handles: Sequence[tuple[nn.Module, Any]]) -> None:
    """Remove exactly these hooks (and nobody else's)."""
    for point, handle in handles:
        handle.hook.remove()
        if handle in point.fwd_hooks:
            point.fwd_hooks.remove(handle)


def plan_hooks(plan: Plan | Sequence[SitePlan], cast: bool = False) -> list[tuple[nn.Module, HookFn]]:
    """``(hook point, fn)`` for every site of a plan, in order."""
    sites = plan.sites if isinstance(plan, Plan) else plan
    return [(p.site.hook_point, site_hook(p, cast)) for p in sites]


@contextmanager
def hooked(model: Any, hooks: Sequence[tuple[nn.Module, HookFn]]) -> Iterator[Any]:
    """Attach ``hooks`` for a ``with`` block; exactly these are removed on exit."""
    handles = attach(hooks)
    try:
        yield model
    finally:
        detach(handles)


def execute(
    model: Any, plan: Plan, cast: bool = False, extra: Sequence[tuple[nn.Module, HookFn]] = (), **kwargs: Any
) -> Any:
    """Run ``model`` on the plan's inputs with its edits (and ``extra`` hooks after them)."""
    guard = pad_row_guard(model, plan.attention_mask)
    with hooked(model, plan_hooks(plan, cast) + list(extra) + guard):
        return model(plan.tokens, attention_mask=plan.attention_mask, **kwargs)


def gather_sources(
    model: Any,
    plans: Sequence[SitePlan],
    source_masks: dict[int, Tensor],
    tokens: Tensor,
    real: RealTokens,
    check_finite: bool = True,
) -> None:
    """Fill ``source_rows`` of every site whose Φ takes a source, in one batched forward of the
    frozen model over the sources (stopping after the last layer needed).

    With ``check_finite`` (the default) a NaN or inf among the gathered rows raises
    :class:`~reftlens.errors.NonFiniteError` naming the intervention, the example and the position."""
    wanted = [p for p in plans if p.site.unit.takes_source]
    if not wanted:
        return
    rows: dict[int, Tensor] = {}

    def capture(plan: SitePlan, index: Tensor | None) -> HookFn:
        def fn(h: Tensor, hook: Any = None) -> None:
            flat = h.reshape(h.shape[0] * h.shape[1], *h.shape[2:])
            rows[id(plan)] = (flat if index is None else flat.index_select(0, index)).detach()

        return fn

    hooks = [(p.site.hook_point, capture(p, flat_index(source_masks[id(p.site.unit)]))) for p in wanted]
    stop = max(p.site.layer for p in wanted) + 1
    mask = None if bool(real.mask.all()) else real.mask.long()
    with hooked(model, hooks), torch.no_grad():
        model(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop if stop < model.cfg.n_layers else None)
    for plan in wanted:
        if check_finite:
            check_finite_source(
                plan.site.label,
                rows[id(plan)],
                source_masks[id(plan.site.unit)],
                real,
                "build ReftModel(..., check_finite=False)",
            )
    for plan in wanted:
        plan.source_rows = rows[id(plan)]
