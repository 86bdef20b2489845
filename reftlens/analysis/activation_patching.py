"""Activation patching sweeps: interchange interventions over (layer × position), batched.

``patch_sweep`` answers the question ``transformer_lens.patching`` answers — "what does the
metric become when the clean activation at (layer, position) is patched into the corrupted
run?" — with the same numbers and far fewer forward passes:

- patched variants run as rows of batched forwards (up to ``batch_size`` rows a forward);
- for larger models (``strategy="replay"``) nothing a patch cannot change is recomputed: a patch
  at (layer l, position p) leaves the blocks below l and, under causal attention, the positions
  before p as they were in the corrupted run, so each variant starts at block l from the recorded
  corrupted residual, covers positions p.. with the recorded keys and values of the earlier
  ones, and only the logits the metric reads are unembedded (:mod:`reftlens.analysis.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from reftlens.errors import AnalysisError, ConfigError
from reftlens.hook_names import canonical_hook, unknown_hook
from reftlens.inputs import text_tokens
from reftlens.interventions.directional import Scaled
from reftlens.interventions.patching import Collect, Interchange
from reftlens.positions import RealTokens
from reftlens.progress import check_progress
from reftlens.runtime.kernel import check_finite_source
from reftlens.runtime.plan import NO_POSITION_AXIS, Plan, hook_name_for, resolve
from reftlens.runtime.sweep import REPLAY_MIN_PARAMS, Sweep  # noqa: F401  (re-exported)
from reftlens.runtime.tl_backend import bind, execute
from reftlens.sets import Intervention


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
        """A layers × tokens heatmap (matplotlib Figure); saved as PNG when ``path`` is given.

        ``title`` defaults to ``"patching <hook>"``. Other options go to
        :func:`~reftlens.analysis.plots.heatmap`: ``cmap``, ``center`` (default ``"auto"``: a
        diverging scale centred at 0 when the values straddle 0, else sequential over their range;
        ``center=0`` forces the diverging one), ``label``, ``figsize``, ``dpi`` and ``ax``."""
        from reftlens.analysis.plots import heatmap

        return heatmap(
            self.values, self.layers, self.tokens, title=title or f"patching {self.hook}", path=path, **kwargs
        )


def _as_tokens(model: Any, x: Any, what: str) -> Tensor:
    if isinstance(x, str):
        return text_tokens(model, x)[None]
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
    """Metric per variant; ``logits`` is ``[n * batch, S, V]``, variant-major (row ``i * batch + b``)."""
    if batched:
        out = metric(logits)
        if not isinstance(out, Tensor) or out.shape != (n,):
            raise AnalysisError(
                f"a batched metric must map logits [{n}, pos, vocab] to a tensor of shape [{n}]; got "
                f"{getattr(out, 'shape', type(out).__name__)}."
            )
        return out.detach().float()
    per = logits.view(n, batch, *logits.shape[1:])
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


def patch_sweep(
    model: Any,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Callable[[Tensor], Any],
    hook: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    method: str = "exact",
    ig_steps: int = 4,
    batched: bool | None = None,
    batch_size: int = 128,
    clean_with: Any = None,
    corrupted_with: Any = None,
    strategy: str = "auto",
    logits_at: Any = "auto",
    check_finite: bool = True,
    progress: bool = True,
) -> PatchResult:
    """Patch clean activations into the corrupted run at every (layer, position) of ``hook``.

    Every cell is the intervention ``Intervention(Interchange(), layers=l, positions=[p], hook=hook)``
    run against the corrupted run with the clean run as its source, through the engine's batched
    sweep (:class:`reftlens.runtime.sweep.Sweep`).

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
        method: ``"exact"`` (every cell patched and run), ``"attribution"`` (the gradient
            approximation of every cell from one clean forward, one corrupted forward and one
            backward: (clean − corrupted) · ∂metric/∂activation, Nanda 2023 / AtP, Kramár et al. 2024)
            or ``"attribution-ig"`` (the same product with the gradient averaged along the straight
            path from the corrupted to the clean input embeddings, at ``ig_steps`` midpoints run
            as one batch: integrated gradients, as EAP-IG, Hanna et al. 2024; one backward of a
            batch of ``ig_steps`` rows; closer to the exact sweep where the metric is far from
            linear, e.g. at the subject tokens of early layers).
        ig_steps: the points on the path for ``"attribution-ig"`` (midpoint rule).
        batch_size: the most rows in one batched forward.
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
            rest cannot change; best once a forward is compute-bound); ``"batch"`` packs
            (layer, position) variants into whole forwards of up to ``batch_size`` rows (best when a
            forward's fixed cost dominates: small models); ``"auto"`` picks by model size.
        check_finite: a clean activation with NaN or inf at a patched site raises
            :class:`~reftlens.errors.NonFiniteError` (the layer, example and position) rather than
            filling cells with NaN; ``False`` patches it in as it is.
        progress: a progress bar (tqdm, on stderr or a notebook widget) counting the patched cells
            as each chunk of the sweep finishes; ``False`` prints nothing. The attribution methods
            run a few forwards and show none.

    Returns a :class:`PatchResult` with ``values [n_layers, pos]``, equal to
    ``transformer_lens.patching`` on the same inputs to fp32 rounding (``method="exact"``).

    >>> res = patch_sweep(model, clean, corrupted, lambda logits: logits[0, -1, tok] - logits[0, -1, other])  # doctest: +SKIP
    >>> res.plot("patching.png")  # doctest: +SKIP
    """
    clean, corrupt = _token_pair(model, clean_tokens, corrupted_tokens)
    hook = canonical_hook(hook)
    layers = _check_sweep_options(model, hook, layers, method, ig_steps, progress)
    base, source_base = _set_of(corrupted_with), _set_of(clean_with)
    cast = bool(getattr(corrupted_with, "cast", False) or getattr(clean_with, "cast", False))
    if method != "exact":
        steps = ig_steps if method == "attribution-ig" else 0
        return _attribution(model, clean, corrupt, metric, hook, layers, base, source_base, cast, steps, check_finite)
    with torch.no_grad():
        sweep = Sweep(
            model,
            corrupt,
            base=base,
            sources=clean,
            source_base=source_base,
            strategy=strategy,
            batch_size=batch_size,
            cast=cast,
            check_finite=check_finite,
            keep=[hook_name_for(hook, l) for l in layers],
        )
        base_logits, clean_logits = sweep.base_logits, sweep.source_run()
        batched = _metric_form(metric, batched, base_logits)
        read = None
        if sweep.strategy == "replay":
            read = _read_positions(logits_at, metric, base_logits, batched, min(batch_size, len(layers)))
        result = _patch_cells(sweep, metric, hook, layers, batched, read, progress)
    tokens = [model.tokenizer.decode([t]) for t in corrupt[0].tolist()]
    m = lambda lg: float(_metric_values(metric, lg, 1, sweep.batch, batched)[0])  # noqa: E731
    return PatchResult(result, layers, tokens, hook, clean=m(clean_logits), corrupted=m(base_logits))


def _check_sweep_options(
    model: Any, hook: str, layers: Sequence[int] | None, method: str, ig_steps: Any, progress: Any
) -> list[int]:
    """patch_sweep's options checked; the layers to sweep."""
    check_progress(progress, "patch_sweep")
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ConfigError(f"layers {bad} do not exist; the model has layers 0..{n_layers - 1}.")
    if method not in ("exact", "attribution", "attribution-ig"):
        raise AnalysisError(f"method must be 'exact', 'attribution' or 'attribution-ig'; got {method!r}.")
    if method == "attribution-ig" and (not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1):
        raise ConfigError(f"ig_steps must be a positive integer (points on the integration path); got {ig_steps!r}.")
    _check_position_hooks(model, hook, layers)
    return layers


def _metric_form(metric: Callable, batched: bool | None, logits: Tensor) -> bool:
    """Whether ``metric`` is batched (``None``: try it on the base run's ``logits``); batch 1 only."""
    batch = logits.shape[0]
    if batched is None:
        batched = batch == 1 and _accepts_batched(metric, logits)
    if batched and batch != 1:
        raise AnalysisError("a batched metric needs batch 1 clean/corrupted inputs; use a TL-style metric for batches.")
    return batched


def _patch_cells(
    sweep: Sweep,
    metric: Callable,
    hook: str,
    layers: list[int],
    batched: bool,
    read: list[int] | None,
    progress: bool,
) -> Tensor:
    """Every (layer, position) cell as one variant of ``sweep``: the metric per cell ``[layer, pos]``."""
    batch, seq = sweep.batch, sweep.seq
    phi = Interchange()
    cells = [(li, p) for p in range(seq) for li in range(len(layers))]
    variants = [[Intervention(phi, layers=layers[li], positions=[p], hook=hook, name="patch")] for li, p in cells]
    result = torch.empty(len(layers), seq)
    unread: list[Tensor] = []  # one NaN-filled [rows, seq, vocab] buffer for every chunk: only `read` is written

    def consume(indices: list[int], logits: Tensor) -> None:
        if read is not None:
            n = logits.shape[0]
            if not unread or unread[0].shape[0] < n:
                unread[:] = [
                    torch.full((n, seq, logits.shape[-1]), float("nan"), dtype=logits.dtype, device=logits.device)
                ]
            full = unread[0][:n]
            full[:, read] = logits
            logits = full
        for i, v in zip(indices, _metric_values(metric, logits, len(indices), batch, batched).cpu()):
            result[cells[i]] = v

    sweep.run(variants, consume, read=read, only_read=read is not None, progress=progress, desc="patch_sweep")
    return result


def _set_of(reft: Any) -> list[Intervention]:
    """The interventions of a ReftModel (or a list of them) to keep active in a run."""
    if reft is None:
        return []
    if isinstance(reft, Intervention):
        return [reft]
    return list(getattr(reft, "interventions", reft))


def _check_position_hooks(model: Any, hook: str, layers: Sequence[int]) -> None:
    hook_dict = model.hook_dict
    for layer in layers:
        name = hook_name_for(hook, layer)
        point = hook_dict.get(name)
        if point is None:
            raise unknown_hook(hook, layer, hook_dict)
        if (point.name or name).endswith(NO_POSITION_AXIS) or getattr(point, "pos_dim", None) not in (None, 1):
            raise ConfigError(f"hook {name} has no position axis at dim 1, so it cannot be swept over positions.")


def _attribution(
    model: Any,
    clean: Tensor,
    corrupt: Tensor,
    metric: Callable,
    hook: str,
    layers: list[int],
    base: list[Intervention],
    source_base: list[Intervention],
    cast: bool,
    ig_steps: int = 0,
    check_finite: bool = True,
) -> PatchResult:
    """Attribution patching: metric(patched) − metric(corrupted) ≈ (a_clean − a_corrupted) · ḡ.

    ``ig_steps == 0``: ḡ = ∂metric/∂a on the corrupted run (AtP): one clean forward, one corrupted
    forward and one backward. ``ig_steps = k``: ḡ = the mean of ∂metric/∂a over k runs whose input
    embeddings (``resid_pre`` of layer 0) lie at the midpoints (j + ½)/k of the straight path from
    the corrupted to the clean ones (integrated gradients), run as one batch of k copies."""
    batch, seq = corrupt.shape
    reads = lambda cs, **kw: [
        Intervention(c, layers=l, positions="all", hook=hook, name="read", **kw)  # noqa: E731
        for c, l in zip(cs, layers)
    ]
    clean_c, end = [Collect() for _ in layers], Collect()  # end: the path's clean endpoint, layer 0's resid_pre
    ends = (
        [Intervention(end, layers=0, positions="all", hook="resid_pre", name="path end", stack=1)] if ig_steps else []
    )
    with torch.no_grad():
        clean_logits = execute(model, _plan(model, clean, source_base, reads(clean_c, stack=0) + ends), cast)
    run_c = [Collect(detach=False) for _ in layers]
    if ig_steps:
        path_end = end.activations[0]
        value, grads, corrupted = _path_gradients(
            model, corrupt, metric, base, reads(run_c, stack=1), run_c, path_end, cast, ig_steps, check_finite
        )
    else:
        with torch.enable_grad():
            value = _metric_values_grad(metric, execute(model, _plan(model, corrupt, base, reads(run_c)), cast), batch)
            acts = [c.activations[0] for c in run_c]
            grads = torch.autograd.grad(value, acts, allow_unused=True)
        corrupted = [a.detach() for a in acts]
    rows = []
    for cc, a, g in zip(clean_c, corrupted, grads):
        diff = (cc.activations[0] - a).float()
        g = torch.zeros_like(diff) if g is None else g.float().reshape(max(ig_steps, 1), *diff.shape).mean(0)
        rows.append((diff * g).reshape(batch, seq, -1).sum(-1).sum(0))  # cells add over the batch
    value = value.detach()
    result = torch.stack(rows).cpu() + float(value)
    tokens = [model.tokenizer.decode([t]) for t in corrupt[0].tolist()]
    clean_value = float(_metric_values(metric, clean_logits, 1, batch, False)[0])
    return PatchResult(result, layers, tokens, hook, clean=clean_value, corrupted=float(value))


def _path_gradients(
    model: Any,
    corrupt: Tensor,
    metric: Callable,
    base: list[Intervention],
    reads: list[Intervention],
    run_c: list[Collect],
    path_end: Tensor,
    cast: bool,
    ig_steps: int,
    check_finite: bool,
) -> tuple[Tensor, list[Tensor | None], list[Tensor]]:
    """Integrated gradients along the path: one batch whose rows are the corrupted run, then the
    ``ig_steps`` path points (each copy's metric reads its own rows), and one backward. Returns the
    corrupted run's metric, each layer's summed gradient over the path rows (None where the metric
    does not depend on it) and the corrupted run's activations."""
    batch, seq = corrupt.shape
    n = ig_steps + 1
    alphas = torch.cat([torch.zeros(1), (torch.arange(ig_steps, dtype=torch.float32) + 0.5) / ig_steps])
    path = Intervention(
        Scaled(Interchange(), alphas.repeat_interleave(batch)),
        layers=0,
        positions="all",
        hook="resid_pre",
        name="path",
        stack=0,
    )
    run_plan = _plan(model, corrupt.repeat(n, 1), base, [path] + reads)
    site = next(p for p in run_plan.sites if p.site.unit.origin is path)
    if check_finite:
        check_finite_source(
            "the integration path's clean end (layer 0's resid_pre)",
            path_end,
            torch.ones(batch, seq, dtype=torch.bool),
            run_plan.real,
            "pass check_finite=False",
        )
    site.source_rows = path_end.repeat(n, 1)
    with torch.enable_grad():
        logits = execute(model, run_plan, cast)
        value = _metric_values_grad(metric, logits[:batch], batch)
        total = sum(_metric_values_grad(metric, logits[j * batch : (j + 1) * batch], batch) for j in range(1, n))
        acts = [c.activations[0] for c in run_c]
        grads = [None if g is None else g[batch * seq :] for g in torch.autograd.grad(total, acts, allow_unused=True)]
    return value, grads, [a.detach()[: batch * seq] for a in acts]


def _plan(model: Any, tokens: Tensor, interventions: list[Intervention], own: list[Intervention]) -> Plan:
    """The user's interventions, then the sweep's ``own`` reads and path at the same sites (they see
    the activations as the user's edits leave them). Each group is checked for collisions alone."""
    real = RealTokens.unpadded(tokens.shape[0], tokens.shape[1], tokens.device)
    plans, masks = [], {}
    for group in (interventions, own):
        units = [u for iv in group for u in iv.expand(model.cfg.n_layers)]
        group_plans, group_masks = resolve(bind(model, units), units, real)
        plans += group_plans
        masks.update(group_masks)
    return Plan(plans, tokens, None, real, masks)


def _metric_values_grad(metric: Callable, logits: Tensor, batch: int) -> Tensor:
    """The metric of one run as a differentiable scalar (TL style or batched with n = 1)."""
    out = metric(logits)
    out = out if isinstance(out, Tensor) else torch.as_tensor(out)
    if out.numel() != 1:
        raise AnalysisError(
            f"method='attribution' needs a metric that returns one number for the run; got shape {tuple(out.shape)}."
        )
    if not out.requires_grad:
        raise AnalysisError(
            "method='attribution' differentiates the metric, but it does not depend on the logits "
            "through torch operations (did it call .item() or numpy?)."
        )
    return out.reshape(())


def _read_positions(logits_at: Any, metric: Callable, base: Tensor, batched: bool, rows: int) -> list[int] | None:
    """Which positions' logits the metric reads (None: all).

    ``"auto"`` tries the last position alone: if the metric gives exactly its value on the
    corrupted run's logits with every other position set to NaN, only the last position is
    unembedded. Explicit positions are trusted but checked the same way."""
    seq = base.shape[1]
    if logits_at == "all" or logits_at is None:
        return None
    if logits_at == "auto":
        read, explicit = [seq - 1], False
    else:
        raw = [logits_at] if isinstance(logits_at, int) else list(logits_at)
        if not raw or any(not isinstance(q, int) or not -seq <= q < seq for q in raw):
            raise ConfigError(f"logits_at must be 'auto', 'all' or positions in [-{seq}, {seq}); got {logits_at!r}.")
        read, explicit = sorted({q % seq for q in raw}), True
    batch = base.shape[0]
    probe = torch.full((rows * batch, *base.shape[1:]), float("nan"), dtype=base.dtype, device=base.device)
    full = base.repeat(rows, 1, 1)
    probe[:, read] = full[:, read]
    if torch.equal(
        _metric_values(metric, full, rows, batch, batched), _metric_values(metric, probe, rows, batch, batched)
    ):
        return read
    if explicit:
        raise AnalysisError(
            f"the metric reads logits outside logits_at={logits_at!r} (its value changes when the other positions are "
            "hidden); list every position it reads, or pass logits_at='all'."
        )
    return None


def _accepts_batched(metric: Callable, logits: Tensor) -> bool:
    try:
        out = metric(logits.expand(2, *logits.shape[1:]))
    except Exception:
        return False
    return isinstance(out, Tensor) and out.shape == (2,)


def patch_heads(
    model: Any,
    clean_tokens: Any,
    corrupted_tokens: Any,
    metric: Callable[[Tensor], Any],
    hook: str = "attn.hook_z",
    *,
    batched: bool | None = None,
    batch_size: int = 128,
    strategy: str = "auto",
    check_finite: bool = True,
    progress: bool = True,
) -> PatchResult:
    """Patch each attention head's output (all positions) from the clean run into the corrupted one.

    Each cell is ``Intervention(Interchange(heads=[h]), layers=l, positions="all", hook=hook)``,
    run through the engine's batched sweep. Returns ``values [n_layers, n_heads]`` (``tokens``
    holds the head labels), equal to ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``.
    ``check_finite`` and ``progress`` (a bar counting the patched heads) as in :func:`patch_sweep`.
    """
    check_progress(progress, "patch_heads")
    clean, corrupt = _token_pair(model, clean_tokens, corrupted_tokens)
    n_layers = model.cfg.n_layers
    hook = canonical_hook(hook)
    names = [hook_name_for(hook, l) for l in range(n_layers)]
    hook_dict = model.hook_dict
    for l, n in enumerate(names):
        if n not in hook_dict:
            raise unknown_hook(hook, l, hook_dict)
    batch = corrupt.shape[0]
    with torch.no_grad():
        sweep = Sweep(
            model,
            corrupt,
            sources=clean,
            strategy=strategy,
            batch_size=batch_size,
            check_finite=check_finite,
            keep=names,
        )
        z = sweep.activation(names[0])
        if z.ndim != 4:
            raise ConfigError(
                f"hook {names[0]} has shape {tuple(z.shape)}; head patching needs [batch, pos, head, d_head]."
            )
        n_heads = z.shape[2]
        batched = _metric_form(metric, batched, sweep.base_logits)
        phis = [Interchange(heads=[h]) for h in range(n_heads)]
        cells = [(l, h) for l in range(n_layers) for h in range(n_heads)]
        variants = [[Intervention(phis[h], layers=l, positions="all", hook=hook, name=f"patch H{h}")] for l, h in cells]
        values = torch.empty(n_layers, n_heads)

        def consume(indices: list[int], logits: Tensor) -> None:
            for i, v in zip(indices, _metric_values(metric, logits, len(indices), batch, batched).cpu()):
                values[cells[i]] = v

        sweep.run(variants, consume, progress=progress, desc="patch_heads")
    return PatchResult(values, list(range(n_layers)), [f"H{h}" for h in range(n_heads)], hook)
