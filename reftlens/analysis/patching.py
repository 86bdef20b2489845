"""Activation patching sweeps: interchange interventions over (layer × position), batched.

``patch_sweep`` answers the question ``transformer_lens.patching`` answers — "what does the
metric become when the clean activation at (layer, position) is patched into the corrupted
run?" — with the same numbers and far fewer forward passes:

- patched variants run as rows of batched forwards (up to ``max_rows`` a forward);
- for larger models (``strategy="replay"``) nothing a patch cannot change is recomputed: a patch
  at (layer l, position p) leaves the blocks below l and, under causal attention, the positions
  before p as they were in the corrupted run, so each variant starts at block l from the recorded
  corrupted residual, covers positions p.. with the recorded keys and values of the earlier
  ones, and only the logits the metric reads are unembedded (:mod:`reftlens.analysis.replay`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from reftlens.errors import ConfigError, ReftError
from reftlens.analysis.replay import BlockReplay, UnsupportedReplay
from reftlens.runtime import _NO_POSITION_AXIS, detach, hook_name_for


# "auto" replays from this model size on (measured: a 0.3M-parameter model sweeps ~4x faster in
# packed whole forwards, SmolLM2-135M ~2x faster replayed)
REPLAY_MIN_PARAMS = 20_000_000


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
    logits_at: Any = "auto",
) -> PatchResult:
    """Patch clean activations into the corrupted run at every (layer, position) of ``hook``.

    Args:
        model: a TransformerLens ``TransformerBridge``.
        clean_tokens: token ids ``[batch, pos]`` (or strings): the run whose activations are patched in.
        corrupted_tokens: token ids (or strings) of the same shape as ``clean_tokens``: the run patched into.
        metric: TL style, one run's logits ``[batch, pos, vocab]`` → a number; or batched,
            logits ``[n, pos, vocab]`` → ``[n]`` (the fast path; batch 1 only). ``batched=None``
            tries the batched form and falls back.
        hook: a hook with a position axis at each layer: ``resid_pre`` (default), ``resid_post``,
            ``attn_out``, ``mlp_out``, ``resid_mid``, ...
        layers: which layers (default all).
        max_rows: the most rows in one batched forward.
        clean_with: a :class:`~reftlens.ReftModel` active during the clean run (whose
            activations are patched in). With ``clean_with=reft`` and the same tokens on both
            sides, the sweep shows which sites carry a trained ReFT's behaviour.
        corrupted_with: a :class:`~reftlens.ReftModel` active during the corrupted runs; the
            patch is applied on top of (after) the ReFT's own edit at the same site.
        logits_at: the positions whose logits ``metric`` reads (``"replay"`` only unembeds those;
            the metric sees NaN elsewhere). ``"auto"`` (default) uses the last position when the
            metric's value on the corrupted run does not change with every other position hidden,
            else all; ``"all"`` always computes every position.
        strategy: ``"replay"`` re-runs, from a recording of the corrupted run, only the blocks
            at and above the patched layer and only the positions from the patched one on (the
            rest cannot change; batch 1, best once a forward is compute-bound); ``"batch"`` packs
            (layer, position) variants into whole forwards of up to ``max_rows`` rows (best when a
            forward's fixed cost dominates: small models); ``"auto"`` picks by model size.

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
    hook_dict = model.hook_dict
    for name in names:
        point = hook_dict.get(name)
        if point is None:
            raise ConfigError(f"hook {hook!r} ({name}) does not exist on this model.")
        if (point.name or name).endswith(_NO_POSITION_AXIS) or getattr(point, "pos_dim", None) not in (None, 1):
            raise ConfigError(f"hook {name} has no position axis at dim 1, so it cannot be swept over positions.")
    points = [hook_dict[n] for n in names]
    batch, seq = corrupt.shape

    auto = strategy == "auto"
    if auto:
        # an active ReFT resolves its positions over whole sequences, so it needs whole forwards;
        # otherwise replaying only the blocks and positions a patch can change pays off once a
        # forward is compute-bound (measured crossover), and small models pack variants instead
        big = sum(p.numel() for p in model.parameters()) >= REPLAY_MIN_PARAMS
        strategy = "replay" if corrupted_with is None and big and batch == 1 else "batch"
    if strategy not in ("replay", "batch"):
        raise AnalysisError(f"strategy must be 'auto', 'replay' or 'batch'; got {strategy!r}.")
    replay = None
    if strategy == "replay":
        if corrupted_with is not None:
            raise AnalysisError("strategy='replay' cannot run with corrupted_with (a ReFT needs whole sequences); use 'batch'.")
        blocks_of = [_block_of(n) for n in names]
        try:
            if batch != 1 or None in blocks_of:
                raise UnsupportedReplay("batch 1 and per-block hooks only")
            replay = BlockReplay(model, corrupt)
            replay.verify(seq // 2)
        except UnsupportedReplay as e:
            if not auto:
                raise AnalysisError(f"strategy='replay' is not available here ({e}); use strategy='batch'.") from e
            strategy = "batch"  # auto: whole forwards give the same numbers

    corrupt_ctx = (lambda: corrupted_with.hooks()) if corrupted_with is not None else contextlib.nullcontext
    if replay is not None:  # the recording already ran the corrupted input
        clean_logits, clean_acts = _capture(model, points, clean, clean_with)
        base_logits = replay.logits
    elif clean_with is None and corrupted_with is None:  # one forward for both runs
        logits, acts = _capture(model, points, torch.cat([clean, corrupt]))
        clean_logits, base_logits, clean_acts = logits[:batch], logits[batch:], [a[:batch] for a in acts]
    else:
        clean_logits, clean_acts = _capture(model, points, clean, clean_with)
        with corrupt_ctx():
            base_logits = model(corrupt)
    if batched is None:
        batched = batch == 1 and _accepts_batched(metric, base_logits)
    if batched and batch != 1:
        raise AnalysisError("a batched metric needs batch 1 clean/corrupted inputs; use a TL-style metric for batches.")
    result = torch.empty(len(layers), seq)
    per_forward = max(1, max_rows // batch)

    def run_cells(cells: list[tuple[int, int]]) -> None:
        """One batched forward: row i patches (layer index, position) ``cells[i]``."""
        n = len(cells)
        inputs = corrupt.repeat_interleave(n, dim=0)  # batch-major: row = b * n + i
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
                    handles.append((points[li], points[li].add_hook(_patch_rows(rows, at, value), dir="fwd")))
                out = model(inputs)
            finally:
                detach(handles)
        for (li, p), v in zip(cells, _metric_values(metric, out, n, batch, batched).cpu()):
            result[li, p] = v

    def run_replay(replay: BlockReplay, p: int) -> None:
        """Every layer's patch at position ``p``: each row starts at its patched block from the
        recorded corrupted run and covers positions p.. only (earlier ones are unchanged)."""
        cells = sorted(((blocks_of[li], li) for li in range(len(layers))))
        for first in range(0, len(cells), per_forward):
            chunk = cells[first : first + per_forward]
            entering, handles, row = {}, [], 0
            for block, li in chunk:
                entering.setdefault(block, []).append(li)
            try:
                for block, lis in entering.items():
                    for li in lis:
                        rows = torch.tensor([row], device=corrupt.device)
                        value = clean_acts[li][:, p]
                        hook = _patch_rows(rows, torch.zeros_like(rows), value)
                        handles.append((points[li], points[li].add_hook(hook, dir="fwd")))
                        row += 1
                live = None if read is None else [q for q in read if q >= p]
                out = replay.run({b: replay.entering(b, p, len(lis)) for b, lis in entering.items()}, p, live)
            finally:
                detach(handles)
            if read is not None:  # only the positions the metric reads; the rest stay NaN
                view = unread[: len(chunk)]
                for q in read:
                    view[:, q] = out[:, live.index(q)] if q >= p else base_logits[0, q]
                out = view
            elif p > 0:
                out = torch.cat([base_logits[:, :p].expand(len(chunk), -1, -1), out], 1)
            for (_, li), v in zip(chunk, _metric_values(metric, out, len(chunk), 1, batched).cpu()):
                result[li, p] = v

    if strategy == "replay":
        read, unread = _read_positions(logits_at, metric, base_logits, batched, min(per_forward, len(layers)))
        for p in range(seq):
            run_replay(replay, p)
    else:
        cells = [(li, p) for p in range(seq) for li in range(len(layers))]
        for first in range(0, len(cells), per_forward):
            run_cells(cells[first : first + per_forward])
    tokens = [model.tokenizer.decode([t]) for t in corrupt[0].tolist()]
    m = lambda lg: float(_metric_values(metric, lg, 1, batch, batched)[0])  # noqa: E731
    return PatchResult(result, layers, tokens, hook, clean=m(clean_logits), corrupted=m(base_logits))


def _capture(model: Any, points: Sequence[Any], tokens: Tensor, reft: Any = None) -> tuple[Tensor, list[Tensor]]:
    """Logits of ``tokens`` and the activation at each hook point (after ``reft``'s edits, if given)."""
    acts: list[Any] = [None] * len(points)

    def keep(i: int) -> Callable:
        def fn(h: Tensor, hook: Any = None) -> None:
            acts[i] = h

        return fn

    handles = []
    with reft.hooks() if reft is not None else contextlib.nullcontext():
        try:
            for i, point in enumerate(points):
                handles.append((point, point.add_hook(keep(i), dir="fwd")))
            logits = model(tokens)
        finally:
            detach(handles)
    return logits, acts


def _read_positions(logits_at: Any, metric: Callable, base: Tensor, batched: bool, rows: int) -> tuple[list[int] | None, Tensor | None]:
    """Which positions' logits the metric reads, and a NaN-filled logits buffer for the rest.

    ``"auto"`` tries the last position alone: if the metric gives exactly its value on the
    corrupted run's logits with every other position set to NaN, only the last position is
    unembedded. Explicit positions are trusted but checked the same way."""
    seq = base.shape[1]
    if logits_at == "all" or logits_at is None:
        return None, None
    if logits_at == "auto":
        read, explicit = [seq - 1], False
    else:
        raw = [logits_at] if isinstance(logits_at, int) else list(logits_at)
        if not raw or any(not isinstance(q, int) or not -seq <= q < seq for q in raw):
            raise ConfigError(f"logits_at must be 'auto', 'all' or positions in [-{seq}, {seq}); got {logits_at!r}.")
        read, explicit = sorted({q % seq for q in raw}), True
    probe = torch.full((rows, *base.shape[1:]), float("nan"), dtype=base.dtype, device=base.device)
    probe[:, read] = base[0, read]
    full = _metric_values(metric, base.expand(rows, -1, -1), rows, 1, batched)
    masked = _metric_values(metric, probe, rows, 1, batched)
    if torch.equal(full, masked):
        return read, probe
    if explicit:
        raise AnalysisError(
            f"the metric reads logits outside logits_at={logits_at!r} (its value changes when the other positions are "
            "hidden); list every position it reads, or pass logits_at='all'."
        )
    return None, None


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


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
    hook_dict = model.hook_dict
    if any(n not in hook_dict for n in names):
        raise ConfigError(f"hook {hook!r} does not exist at every layer of this model.")
    points = [hook_dict[n] for n in names]
    batch = corrupt.shape[0]
    logits, acts = _capture(model, points, torch.cat([clean, corrupt]))  # both runs in one forward
    base_logits, clean_acts = logits[batch:], [a[:batch] for a in acts]
    if clean_acts[0].ndim != 4:
        raise ConfigError(f"hook {names[0]} has shape {tuple(clean_acts[0].shape)}; head patching needs [batch, pos, head, d_head].")
    n_heads = clean_acts[0].shape[2]
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
