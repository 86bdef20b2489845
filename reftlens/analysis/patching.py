"""Activation patching sweeps: interchange interventions over (layer × position), batched.

``patch_sweep`` answers the question ``transformer_lens.patching`` answers — "what does the
metric become when the clean activation at (layer, position) is patched into the corrupted
run?" — with the same numbers and far fewer forward passes:

- patched variants run as rows of batched forwards (up to ``max_rows`` a forward);
- for larger models, positions before the patched one are not recomputed: a patch at position p
  cannot change earlier positions under causal attention, so each variant starts from the
  corrupted run's KV cache of the first p tokens and only the last S − p tokens are computed.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from reftlens.errors import ConfigError, ReftError
from reftlens.generation import kv_cache_fix
from reftlens.runtime import _NO_POSITION_AXIS, detach, hook_name_for


class AnalysisError(ReftError):
    """An analysis cannot run on these inputs."""


@dataclass
class PatchResult:
    """A sweep's result: ``values[i, j]`` is the metric with ``hook`` patched at layer
    ``layers[i]`` and position ``j``; ``tokens`` label the positions."""

    values: Float[Tensor, "layer pos"]
    layers: list[int]
    tokens: list[str]
    hook: str
    clean: float | None = None
    corrupted: float | None = None

    def plot(self, path: str | None = None, title: str | None = None, **kwargs: Any) -> Any:
        """A layers × tokens heatmap (matplotlib); saved as PNG when ``path`` is given."""
        from reftlens.analysis.plots import heatmap

        return heatmap(self.values, self.layers, self.tokens, title=title or f"patching {self.hook}", path=path, **kwargs)


def _as_tokens(model: Any, x: Any, what: str) -> Tensor:
    if isinstance(x, str):
        return model.to_tokens(x)
    if isinstance(x, Tensor):
        x = x.unsqueeze(0) if x.ndim == 1 else x
        if x.ndim != 2 or x.is_floating_point():
            raise AnalysisError(f"{what} must be token ids [batch, seq] or a string; got {x.dtype} {tuple(x.shape)}.")
        return x.to(model.cfg.device)
    raise AnalysisError(f"{what} must be token ids or a string; got {type(x).__name__}.")


def _token_pair(model: Any, clean_tokens: Any, corrupted_tokens: Any) -> tuple[Tensor, Tensor]:
    clean = _as_tokens(model, clean_tokens, "clean_tokens")
    corrupt = _as_tokens(model, corrupted_tokens, "corrupted_tokens")
    if clean.shape != corrupt.shape:
        raise AnalysisError(
            f"clean tokens have shape {tuple(clean.shape)} and corrupted tokens {tuple(corrupt.shape)}; patching "
            "swaps activations site by site, so both need the same batch size and length (pad or trim the prompts)."
        )
    return clean, corrupt


def _metric_values(metric: Callable[[Tensor], Any], logits: Tensor, n: int, batch: int, batched: bool) -> Tensor:
    """Metric per variant; ``logits`` is ``[batch * n, S, V]`` in batch-major order."""
    if batched:
        out = metric(logits)
        if not isinstance(out, Tensor) or out.shape != (n,):
            raise AnalysisError(
                f"a batched metric must map logits [{n}, pos, vocab] to a tensor of shape [{n}]; got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )
        return out.detach().float()
    per = logits.view(batch, n, *logits.shape[1:]).transpose(0, 1)
    vals = []
    for i in range(n):
        v = metric(per[i])
        v = torch.as_tensor(v).detach()
        if v.numel() != 1:
            raise AnalysisError(
                f"the metric must return one number for one run's logits [batch, pos, vocab] (or pass batched=True "
                f"for logits [n, pos, vocab] -> [n]); got shape {tuple(v.shape)}."
            )
        vals.append(v.float().reshape(()))
    return torch.stack(vals)


@torch.no_grad()
def patch_sweep(
    model: Any,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Callable[[Tensor], Any],
    hook: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    batched: bool | None = None,
    max_rows: int = 128,
    clean_with: Any = None,
    corrupted_with: Any = None,
    strategy: str = "auto",
) -> PatchResult:
    """Patch clean activations into the corrupted run at every (layer, position) of ``hook``.

    Args:
        model: a TransformerLens ``TransformerBridge``.
        clean_tokens, corrupted_tokens: token ids ``[batch, pos]`` of equal shape (or strings).
        metric: TL style, one run's logits ``[batch, pos, vocab]`` → a number; or batched,
            logits ``[n, pos, vocab]`` → ``[n]`` (the fast path; batch 1 only). ``batched=None``
            tries the batched form and falls back.
        hook: a hook with a position axis at each layer: ``resid_pre`` (default), ``resid_post``,
            ``attn_out``, ``mlp_out``, ``resid_mid``, ...
        layers: which layers (default all).
        max_rows: the most rows in one batched forward.
        clean_with, corrupted_with: a :class:`~reftlens.ReftModel` active during the clean run
            (whose activations are patched in) or during the corrupted runs. With
            ``clean_with=reft`` and the same tokens on both sides, the sweep shows which sites
            carry a trained ReFT's behaviour. In the corrupted runs the patch is applied on top
            of (after) the ReFT's own edit at the same site.
        strategy: ``"batch"`` packs (layer, position) variants into as few forwards as
            ``max_rows`` allows (best when a forward's fixed cost dominates: small models);
            ``"prefix"`` runs one forward per position over its last S − p tokens only, from the
            corrupted run's KV cache (best for larger models); ``"auto"`` picks by model size.

    Returns a :class:`PatchResult` with ``values [n_layers, pos]``, equal to
    ``transformer_lens.patching`` on the same inputs to fp32 rounding.

    >>> res = patch_sweep(model, clean, corrupted, lambda logits: logits[0, -1, tok] - logits[0, -1, other])  # doctest: +SKIP
    >>> res.plot("patching.png")  # doctest: +SKIP
    """
    clean, corrupt = _token_pair(model, clean_tokens, corrupted_tokens)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; the model has layers 0..{n_layers - 1}.")
    names = [hook_name_for(hook, l) for l in layers]
    for name in names:
        point = model.hook_dict.get(name)
        if point is None:
            raise ConfigError(f"hook {hook!r} ({name}) does not exist on this model.")
        if (point.name or name).endswith(_NO_POSITION_AXIS) or getattr(point, "pos_dim", None) not in (None, 1):
            raise ConfigError(f"hook {name} has no position axis at dim 1, so it cannot be swept over positions.")
    points = [model.hook_dict[n] for n in names]

    batch, seq = corrupt.shape
    clean_ctx = clean_with.hooks() if clean_with is not None else contextlib.nullcontext()
    with clean_ctx:
        clean_logits, cache = model.run_with_cache(clean, names_filter=lambda n: n in set(names) | {p.name for p in points})
    clean_acts = [cache[p.name] for p in points]  # [batch, seq, ...] per layer
    corrupt_ctx = (lambda: corrupted_with.hooks()) if corrupted_with is not None else contextlib.nullcontext
    with corrupt_ctx():
        base_logits = model(corrupt)
    if batched is None:
        batched = batch == 1 and _accepts_batched(metric, base_logits)
    if batched and batch != 1:
        raise AnalysisError("a batched metric needs batch 1 clean/corrupted inputs; use a TL-style metric for batches.")
    result = torch.empty(len(layers), seq)
    per_forward = max(1, max_rows // batch)

    def run_cells(cells: list[tuple[int, int]], start: int, prefix: Any) -> None:
        """One batched forward: row i patches (layer index, position) ``cells[i]``; the first
        ``start`` positions come from the corrupted run's KV cache ``prefix``."""
        n = len(cells)
        inputs = corrupt[:, start:].repeat_interleave(n, dim=0)  # batch-major: row = b * n + i
        past = None
        if prefix is not None:
            past = copy.deepcopy(prefix)
            past.batch_repeat_interleave(n)
        handles = []
        with corrupt_ctx():
            try:
                for li in sorted({c[0] for c in cells}):
                    idx = torch.tensor([i for i, c in enumerate(cells) if c[0] == li])
                    pos = torch.tensor([cells[i][1] for i in idx.tolist()])
                    b = torch.arange(batch).repeat_interleave(len(idx))
                    rows = (b * n + idx.repeat(batch)).to(corrupt.device)
                    at = pos.repeat(batch).to(corrupt.device)
                    value = clean_acts[li][b.to(corrupt.device), at]
                    handles.append((points[li], points[li].add_hook(_patch_rows(rows, at - start, value), dir="fwd")))
                out = model(inputs, past_key_values=past, return_type="logits") if past is not None else model(inputs)
            finally:
                detach(handles)
        if start > 0:  # earlier positions are the corrupted run's, unchanged by a later patch
            out = torch.cat([base_logits[:, :start].repeat_interleave(n, dim=0), out], 1)
        for (li, p), v in zip(cells, _metric_values(metric, out, n, batch, batched).cpu()):
            result[li, p] = v

    if strategy == "auto":
        # an active ReFT resolves its positions over whole sequences, so it needs full recomputation;
        # otherwise skipping the prefix pays off once forwards are compute-bound (measured crossover)
        big = sum(p.numel() for p in model.parameters()) >= 20_000_000
        strategy = "prefix" if corrupted_with is None and big else "batch"
    if strategy == "prefix" and corrupted_with is not None:
        raise AnalysisError("strategy='prefix' cannot run with corrupted_with (a ReFT needs whole sequences); use 'batch'.")
    with kv_cache_fix(model):
        if strategy == "prefix":
            for p in range(seq):
                prefix = model(corrupt[:, :p], return_type="logits_and_cache")[1] if p > 0 else None
                cells = [(li, p) for li in range(len(layers))]
                for first in range(0, len(cells), per_forward):
                    run_cells(cells[first : first + per_forward], p, prefix)
        elif strategy == "batch":
            cells = [(li, p) for p in range(seq) for li in range(len(layers))]
            for first in range(0, len(cells), per_forward):
                run_cells(cells[first : first + per_forward], 0, None)
        else:
            raise AnalysisError(f"strategy must be 'auto', 'prefix' or 'batch'; got {strategy!r}.")
    tokens = [model.tokenizer.decode([t]) for t in corrupt[0].tolist()]
    m = lambda lg: float(_metric_values(metric, lg, 1, batch, batched)[0])  # noqa: E731
    return PatchResult(result, layers, tokens, hook, clean=m(clean_logits), corrupted=m(base_logits))


def _patch_rows(rows: Tensor, pos: Tensor, value: Tensor) -> Callable:
    def fn(h: Tensor, hook: Any = None) -> Tensor:
        h = h.clone()
        h[rows, pos] = value.to(h.dtype)
        return h

    return fn


def _accepts_batched(metric: Callable, logits: Tensor) -> bool:
    try:
        out = metric(logits.expand(2, *logits.shape[1:]))
    except Exception:
        return False
    return isinstance(out, Tensor) and out.shape == (2,)


@torch.no_grad()
def patch_heads(
    model: Any,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Callable[[Tensor], Any],
    hook: str = "attn.hook_z",
    *,
    batched: bool | None = None,
    max_rows: int = 128,
) -> PatchResult:
    """Patch each attention head's output (all positions) from the clean run into the corrupted one.

    Returns ``values [n_layers, n_heads]`` (``tokens`` holds the head labels), equal to
    ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``; every (layer, head)
    variant runs as one row of a batched forward.
    """
    clean, corrupt = _token_pair(model, clean_tokens, corrupted_tokens)
    n_layers = model.cfg.n_layers
    names = [hook_name_for(hook, l) for l in range(n_layers)]
    if any(n not in model.hook_dict for n in names):
        raise ConfigError(f"hook {hook!r} does not exist at every layer of this model.")
    points = [model.hook_dict[n] for n in names]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n in set(names) | {p.name for p in points})
    clean_acts = [cache[p.name] for p in points]
    if clean_acts[0].ndim != 4:
        raise ConfigError(f"hook {names[0]} has shape {tuple(clean_acts[0].shape)}; head patching needs [batch, pos, head, d_head].")
    n_heads = clean_acts[0].shape[2]
    batch = corrupt.shape[0]
    base_logits = model(corrupt)
    if batched is None:
        batched = batch == 1 and _accepts_batched(metric, base_logits)
    cells = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    values = torch.empty(len(cells))
    per_forward = max(1, max_rows // batch)
    for first in range(0, len(cells), per_forward):
        chunk = cells[first : first + per_forward]
        n = len(chunk)
        handles = []
        try:
            for l in sorted({l for l, _ in chunk}):
                idx = [i for i, (ll, _) in enumerate(chunk) if ll == l]
                rows = (torch.arange(batch)[:, None] * n + torch.tensor(idx)).reshape(-1).to(corrupt.device)
                heads = torch.tensor([chunk[i][1] for i in idx]).repeat(batch).to(corrupt.device)
                src = clean_acts[l][torch.arange(batch).repeat_interleave(len(idx)).to(corrupt.device), :, heads]

                def fn(h: Tensor, hook: Any = None, rows=rows, heads=heads, src=src) -> Tensor:
                    h = h.clone()
                    h[rows, :, heads] = src.to(h.dtype)
                    return h

                handles.append((points[l], points[l].add_hook(fn, dir="fwd")))
            out = model(corrupt.repeat_interleave(n, dim=0))
        finally:
            detach(handles)
        values[first : first + n] = _metric_values(metric, out, n, batch, batched).cpu()
    return PatchResult(values.view(n_layers, n_heads), list(range(n_layers)), [f"H{h}" for h in range(n_heads)], hook)
