"""The runtime: bind units to hook points, resolve positions for a batch, and build the
gather → Φ → scatter hooks. Vectorised: the only work per hook call is one ``index_select``,
Φ on the selected rows, and one ``index_copy``; indices are computed once per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import CollisionError, ConfigError, PositionError
from reftlens.interventions.base import phi_d_model
from reftlens.positions import RealTokens
from reftlens.sets import Unit, may_share_sites

HookFn = Callable[..., Any]
_NO_POSITION_AXIS = ("hook_pattern", "hook_attn_scores", "hook_cos", "hook_sin")


@dataclass(eq=False)
class Site:
    """A unit bound to one layer's hook point."""

    unit: Unit
    layer: int
    hook_name: str  # canonical TransformerLens name
    hook_point: nn.Module

    @property
    def label(self) -> str:
        return f"{self.unit.name!r} at {self.hook_name}"


def hook_name_for(hook: str, layer: int) -> str:
    """``"resid_post"`` → ``blocks.3.hook_resid_post``; ``"attn.hook_z"`` → ``blocks.3.attn.hook_z``."""
    if "{layer}" in hook:
        return hook.format(layer=layer)
    if hook.startswith("blocks."):
        raise ConfigError(
            f"hook {hook!r} names one layer; give the name within a block ('resid_post', "
            "'attn.hook_z') or a template with '{layer}', and choose layers with layers=."
        )
    if hook.startswith("hook_") or "." in hook:
        return f"blocks.{layer}.{hook}"
    return f"blocks.{layer}.hook_{hook}"


def bind(model: Any, units: Sequence[Unit]) -> list[Site]:
    """Resolve each unit's hook at each of its layers, checking names and widths."""
    hook_dict = model.hook_dict
    sites = []
    for unit in units:
        for layer in unit.layers:
            name = hook_name_for(unit.hook, layer)
            point = hook_dict.get(name)
            if point is None:
                prefix = f"blocks.{layer}."
                known = sorted({n[len(prefix):] for n in hook_dict if n.startswith(prefix)})
                raise ConfigError(
                    f"intervention {unit.name!r}: hook {unit.hook!r} at layer {layer} ({name}) does not exist "
                    f"on this model. Hooks at layer {layer}: {', '.join(known)}."
                )
            canonical = point.name or name
            if canonical.endswith(_NO_POSITION_AXIS) or getattr(point, "pos_dim", None) not in (None, 1):
                raise ConfigError(
                    f"intervention {unit.name!r}: hook {canonical} has no position axis at dim 1, so "
                    "positions cannot select rows of it. Use a hook shaped [batch, pos, ...]."
                )
            sites.append(Site(unit, layer, canonical, point))
    d_model = model.cfg.d_model
    for site in sites:
        d = phi_d_model(site.unit.phi)
        if d is not None and d != d_model and _is_d_model_hook(site.hook_name):
            raise ConfigError(
                f"intervention {site.unit.name!r} expects hidden width d_model={d}, but {site.hook_name} "
                f"carries width {d_model}. Build the Φ with d_model={d_model} (model.cfg.d_model)."
            )
    return sites


def _is_d_model_hook(name: str) -> bool:
    tail = name.split(".", 2)[-1]
    return tail in ("hook_in", "hook_out", "ln2.hook_in", "attn.hook_out", "mlp.hook_out")


@dataclass
class SitePlan:
    """A site's rows for one batch: flat indices (None = every row) and source rows."""

    site: Site
    index: Tensor | None
    source_rows: Tensor | None = None


def site_masks(units: Sequence[Unit], real: RealTokens) -> dict[int, Tensor]:
    """One boolean site mask ``[batch, seq]`` per unit (keyed by ``id(unit)``)."""
    return {id(u): u.positions.site_mask(real) for u in units}


def check_disjoint(sites: Sequence[Site], masks: dict[int, Tensor], real: RealTokens) -> None:
    """Raise if two sites on one hook select the same position of one example."""
    by_hook: dict[str, list[Site]] = {}
    for s in sites:
        by_hook.setdefault(s.hook_name, []).append(s)
    for hook_name, group in by_hook.items():
        if len(group) < 2:
            continue
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


def flat_index(mask: Tensor) -> Tensor | None:
    """Row indices into ``[batch*seq, ...]`` for a site mask; None when it selects every row."""
    if bool(mask.all()):
        return None
    return mask.reshape(-1).nonzero().squeeze(1)


def _phi_dtype(phi: nn.Module) -> torch.dtype | None:
    for t in list(phi.parameters()) + list(phi.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def make_hook(plan: SitePlan, shape: tuple[int, int] | None, cast: bool) -> HookFn:
    """The TransformerLens hook ``(tensor, hook) -> tensor`` for one site.

    ``shape`` is the (batch, seq) the plan was made for; None makes a lazy hook that treats
    every token as real and resolves positions from the tensor's own shape.
    """
    site = plan.site
    phi = site.unit.phi
    read_only = bool(getattr(phi, "read_only", False))
    with_source = site.unit.takes_source
    d_expected = phi_d_model(phi)
    dtype = _phi_dtype(phi)
    lazy: dict[tuple, Tensor | None] = {}

    def hook(h: Tensor, hook: Any = None) -> Tensor | None:
        batch, seq = h.shape[0], h.shape[1]
        if shape is None:
            key = (batch, seq, h.device)
            if key not in lazy:
                lazy[key] = flat_index(site.unit.positions.site_mask(RealTokens.unpadded(batch, seq, h.device)))
            index = lazy[key]
        else:
            if (batch, seq) != shape:
                raise ConfigError(
                    f"intervention {site.label}: positions were resolved for inputs of shape {shape} but the "
                    f"hook sees {tuple(h.shape)}. Pass the same inputs to reft.hooks(...) as to the model."
                )
            index = plan.index
        if d_expected is not None and h.shape[-1] != d_expected:
            raise ConfigError(
                f"intervention {site.label}: Φ expects width {d_expected}, the hook carries {tuple(h.shape)}."
            )
        flat = h.reshape(batch * seq, *h.shape[2:])
        rows = flat if index is None else flat.index_select(0, index)
        if dtype is not None and rows.dtype != dtype:
            if not cast and not torch.is_autocast_enabled(rows.device.type):  # autocast casts per op
                raise ConfigError(
                    f"intervention {site.label}: Φ is {dtype} but the hidden states are {rows.dtype}. Call "
                    f"reft.to({rows.dtype}) or build ReftModel(..., cast=True) to run Φ in its own precision."
                )
            rows = rows.to(dtype)
        out = phi(rows, plan.source_rows.to(rows.dtype)) if with_source else phi(rows)
        if read_only:
            return None
        out = out.to(h.dtype)
        if index is None:
            return out.reshape(h.shape)
        return flat.index_copy(0, index, out).reshape(h.shape)

    hook.__name__ = f"reftlens[{site.unit.name}]"
    return hook


def gather_sources(
    model: Any,
    plans: Sequence[SitePlan],
    source_masks: dict[int, Tensor],
    tokens: Tensor,
    real: RealTokens,
) -> None:
    """Fill ``source_rows`` of every plan whose Φ takes a source, in one batched forward of
    the frozen model over the sources (stopping after the last layer needed)."""
    wanted = [p for p in plans if p.site.unit.takes_source]
    if not wanted:
        return
    rows: dict[int, Tensor] = {}
    handles = []

    def capture(plan: SitePlan, index: Tensor | None) -> HookFn:
        def fn(h: Tensor, hook: Any = None) -> None:
            flat = h.reshape(h.shape[0] * h.shape[1], *h.shape[2:])
            rows[id(plan)] = (flat if index is None else flat.index_select(0, index)).detach()

        return fn

    try:
        for plan in wanted:
            index = flat_index(source_masks[id(plan.site.unit)])
            handles.append((plan.site.hook_point, plan.site.hook_point.add_hook(capture(plan, index), dir="fwd")))
        stop = max(p.site.layer for p in wanted) + 1
        mask = None if bool(real.mask.all()) else real.mask.long()
        with torch.no_grad():
            model(tokens, attention_mask=mask, return_type=None,
                  stop_at_layer=stop if stop < model.cfg.n_layers else None)
    finally:
        detach(handles)
    for plan in wanted:
        plan.source_rows = rows[id(plan)]


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
