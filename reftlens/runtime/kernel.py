"""The kernel every backend runs at a site: gather the planned rows, apply Φ, scatter them back.

:func:`site_hook` turns one :class:`~reftlens.runtime.plan.SitePlan` into a hook ``(tensor, hook=None)
-> tensor``; the TransformerLens backend registers it on hook points, the transformers backend on
modules, the sweep executors on the hook points of a batched run. :func:`check_finite_source` is the
one check on the source rows a Φ with a source copies into the base run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from reftlens.errors import ConfigError, NonFiniteError
from reftlens.interventions.base import phi_d_model, phi_label
from reftlens.positions import RealTokens
from reftlens.runtime.plan import HookFn, SitePlan, flat_index, set_names


def check_finite_source(label: str, rows: Tensor, mask: Tensor, real: RealTokens, opt_out: str) -> None:
    """Raise :class:`NonFiniteError` if a source row gathered for an intervention holds NaN or inf.

    ``rows`` are the rows ``mask`` (``[batch, seq]``) selects, in row-major order; ``real`` says
    where each example's real tokens start; ``opt_out`` tells how to let such values through.
    One ``isfinite`` over the rows; the offending example and position are looked up only on failure.
    """
    finite = torch.isfinite(rows)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(rows.shape[0], -1).any(1).nonzero()[0, 0]
    b, p = (int(v) for v in mask.nonzero()[bad])
    rel = p - int(real.starts[b])
    where = f"position {p}" if rel == p else f"real token {rel} (padded position {p})"
    value = "NaN" if bool(rows[bad].isnan().any()) else "inf"
    raise NonFiniteError(
        f"intervention {label}: the source run's activation for example {b} at {where} holds {value}, which the "
        "intervention would copy into the base run. Check that source example (its tokens, and any hooks or "
        f"interventions active in the source run), or {opt_out} to let non-finite values through."
    )


def phi_dtype(phi: nn.Module) -> torch.dtype | None:
    """The floating dtype of a Φ's tensors (None for a Φ without any)."""
    for t in list(phi.parameters()) + list(phi.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def site_hook(plan: SitePlan, cast: bool = False) -> HookFn:
    """The hook ``(tensor, hook=None) -> tensor`` that executes one site of a plan: gather the
    planned rows, apply Φ, scatter the result back. Both backends call it.

    A Φ with ``per_example = True`` is also given ``examples=``: for each of its rows, the row of the
    batch it comes from (``[n_rows]`` long). That is how one forward or one batched generation gives
    each row its own α (:class:`~reftlens.interventions.Scaled`) or pools over an example's own
    positions (:class:`~reftlens.interventions.ReFTr1`)."""
    site = plan.site
    phi = site.unit.phi
    read_only = bool(getattr(phi, "read_only", False))
    with_source = site.unit.takes_source
    per_example = bool(getattr(phi, "per_example", False))
    d_expected = phi_d_model(phi)
    dtype = phi_dtype(phi)
    label = site.label
    if plan.phis is not None:  # a bank group: the rows of every set in one call over stacked parameters
        many, phis, which = type(phi).forward_many, plan.phis, plan.which
        phi = lambda rows: many(phis, rows, which)  # noqa: E731
        label = f"{len(phis)} sets' {phi_label(phis[0])} at {site.hook_name} ({set_names([m.unit.adapter for m in plan.members])})"
    lazy: dict[tuple, Tensor | None] = {}

    def hook(h: Tensor, hook: Any = None) -> Tensor | None:
        batch, seq = h.shape[0], h.shape[1]
        if plan.shape is None:
            key = (batch, seq, h.device)
            if key not in lazy:
                lazy[key] = flat_index(site.unit.positions.site_mask(RealTokens.unpadded(batch, seq, h.device)))
            index = lazy[key]
        else:
            if (batch, seq) != plan.shape:
                raise ConfigError(
                    f"intervention {label}: positions were resolved for inputs of shape {plan.shape} but the "
                    f"hook sees {tuple(h.shape)}. Pass the same inputs to reft.hooks(...) as to the model."
                )
            index = plan.index
        if d_expected is not None and h.shape[-1] != d_expected:
            raise ConfigError(f"intervention {label}: Φ expects width {d_expected}, the hook carries {tuple(h.shape)}.")
        flat = h.reshape(batch * seq, *h.shape[2:])
        rows = flat if index is None else flat.index_select(0, index)
        if dtype is not None and rows.dtype != dtype:
            if not cast and not autocast_on(rows.device.type):  # autocast casts per op
                raise ConfigError(
                    f"intervention {label}: Φ is {dtype} but the hidden states are {rows.dtype}. Call "
                    f"reft.to({rows.dtype}) or build ReftModel(..., cast=True) to run Φ in its own precision."
                )
            rows = rows.to(dtype)
        args = (rows, plan.source_rows.to(rows.dtype)) if with_source else (rows,)
        if per_example:  # flat row r of [batch * seq] belongs to batch row r // seq
            flat_rows = torch.arange(batch * seq, device=h.device) if index is None else index
            out = phi(*args, examples=torch.div(flat_rows, seq, rounding_mode="floor"))
        else:
            out = phi(*args)
        if read_only:
            return None
        _check_output(label, out, rows)
        out = out.to(h.dtype)
        if index is None:
            return out.reshape(h.shape)
        return flat.index_copy(0, index, out).reshape(h.shape)

    hook.__name__ = f"reftlens[{site.unit.name}]"
    return hook


def _check_output(label: str, out: Any, rows: Tensor) -> None:
    """A Φ must return one floating row per input row, of the same shape: a transposed output
    whose element count happens to match would otherwise scramble values across positions."""
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"intervention {label}: Φ returned {type(out).__name__}; it must return a tensor "
            f"shaped like its input {tuple(rows.shape)}."
        )
    if out.shape != rows.shape:
        raise ConfigError(
            f"intervention {label}: Φ returned shape {tuple(out.shape)} for input rows of shape "
            f"{tuple(rows.shape)}; a Φ maps [..., d] -> [..., d] row by row, so both must be equal."
        )
    if not out.is_floating_point():
        raise ConfigError(
            f"intervention {label}: Φ returned {out.dtype} values; it must return floating "
            f"hidden states ({rows.dtype})."
        )
