"""A concept's direction from activations: collect hidden states at any ⟨hook, layers, positions⟩,
then fit a unit direction by difference of means (CAA / DiffMean), the first principal component
of paired differences (RepE's LAT) or a logistic-regression probe.

Activations are read through the engine: one read-only :class:`~reftlens.interventions.Collect`
per layer, in one ReftModel, each batch run only up to the highest layer asked for.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from reftlens.errors import AnalysisError
from reftlens.inputs import context_limit, fit, text_tokens
from reftlens.interventions.patching import Collect
from reftlens.model import ReftModel
from reftlens.progress import check_progress, progress_bar
from reftlens.runtime.tl_backend import execute
from reftlens.sets import Intervention

POOLS = ("mean", "max", "last", "first")


@dataclass
class Activations:
    """Hidden states of a list of texts at one hook: per layer, the rows of every selected position.

    ``rows[layer]`` is ``[n_rows, d]``, example-major and, within an example, in position order;
    ``example[i]`` is the text row ``i`` comes from.
    """

    rows: dict[int, Float[Tensor, "n_rows d"]]
    example: Int[Tensor, " n_rows"]
    n_examples: int
    hook: str

    def __getitem__(self, layer: int) -> Float[Tensor, "n_rows d"]:
        if layer not in self.rows:
            raise AnalysisError(f"no activations at layer {layer}; collected layers: {sorted(self.rows)}.")
        return self.rows[layer]

    def pooled(self, layer: int, how: str = "mean") -> Float[Tensor, "n_examples d"]:
        """One vector per text: the mean of its rows, or its first or last row. Every text needs a
        row: a text without any (an empty text collected with ``positions=slice(1, None)``) is refused."""
        if how not in ("mean", "first", "last"):
            raise AnalysisError(f"pooled: how must be 'mean', 'first' or 'last'; got {how!r}.")
        rows = self[layer]
        counts = self._rows_per_text(f"pooled(how={how!r})")
        if how == "mean":
            total = rows.new_zeros(self.n_examples, rows.shape[1]).index_add_(0, self.example, rows)
            return total / counts[:, None].to(rows)
        return rows[self._edge(how, counts)]

    def scores(self, layer: int, directions: Any, pool: str = "max") -> Tensor:
        """Detection scores: each text's projections h·u on the direction(s), pooled over its rows
        (``"max"`` as AxBench, ``"mean"``, ``"first"``, ``"last"``). ``[n_examples]`` for one direction,
        ``[n_examples, k]`` for ``k`` (a ``[k, d]`` tensor or a list of directions). Every text needs a
        row, as in :meth:`pooled`."""
        if pool not in POOLS:
            raise AnalysisError(f"scores: pool must be one of {POOLS}; got {pool!r}.")
        rows, (U, single) = self[layer], _as_matrix(directions)
        counts = self._rows_per_text(f"scores(pool={pool!r})")
        proj = rows.float() @ U.to(rows.device).T
        if pool == "max":
            out = proj.new_full((self.n_examples, U.shape[0]), float("-inf"))
            out = out.scatter_reduce(0, self.example[:, None].expand_as(proj), proj, "amax", include_self=True)
        elif pool == "mean":
            out = proj.new_zeros(self.n_examples, U.shape[0]).index_add_(0, self.example, proj)
            out = out / counts[:, None].to(out)
        else:
            out = proj[self._edge(pool, counts)]
        return out[:, 0] if single else out

    def _rows_per_text(self, where: str) -> Int[Tensor, " n_examples"]:
        """How many rows each text has; an AnalysisError naming the texts with none, since a pool of
        no rows has no value (a zero, −inf or a neighbour's row would pass for one)."""
        counts = torch.bincount(self.example, minlength=self.n_examples)
        empty = (counts == 0).nonzero().squeeze(1).tolist()
        if empty:
            shown = ", ".join(map(str, empty[:10])) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
            raise AnalysisError(
                f"{where}: the text{'s' if len(empty) > 1 else ''} at index{'es' if len(empty) > 1 else ''} {shown} "
                f"(of {self.n_examples}) {'have' if len(empty) > 1 else 'has'} no selected position (no activation rows), so there is "
                "nothing to pool. Drop such texts before collecting (e.g. empty ones, which "
                "positions=slice(1, None) leaves without a token), or collect with positions that select at "
                "least one token of every text; the rows themselves stay in acts[layer] and acts.example."
            )
        return counts

    def _edge(self, which: str, counts: Tensor) -> Tensor:
        """The index of each text's first or last row (rows are example-major, every text has one)."""
        ends = torch.cumsum(counts, 0).to(self.example.device)
        return ends - counts.to(ends) if which == "first" else ends - 1


def collect(
    model: Any,
    texts: Sequence[Any],
    *,
    layers: int | Sequence[int],
    hook: str = "resid_post",
    positions: Any = "all",
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    truncation: str | None = None,
    progress: bool = True,
) -> Activations:
    """Hidden states of ``texts`` at ``hook`` of each of ``layers``, at ``positions`` (any position
    spec, resolved against each text's real tokens; ``slice(1, None)`` skips the start token).

    ``texts``: strings or token-id lists. Batches are formed by length (less padding) and run
    only up to the highest layer asked for. Strings are tokenized by reftlens's one rule,
    :func:`reftlens.inputs.text_tokens`, with ``prepend_bos`` (None: the model's default),
    ``max_length`` and ``truncation``: a text beyond ``max_length`` (default: the model's context)
    is refused unless ``truncation`` ("left" / "right") says which side to cut; with these another
    pipeline's tokenization can be matched (e.g. ``prepend_bos=False, max_length=512,
    truncation="right"``). ``progress``: a progress bar (tqdm)
    counting the texts as each batch finishes; ``False`` prints nothing.

    >>> acts = collect(model, ["a cat sat", "dogs bark"], layers=[2, 3])       # doctest: +SKIP
    >>> acts[3].shape, acts.pooled(3).shape                                   # doctest: +SKIP
    """
    check_progress(progress, "collect")
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not texts:
        raise AnalysisError("collect got no texts: pass at least one string (or token-id list).")
    if not layers:
        raise AnalysisError("collect needs at least one layer.")
    if prepend_bos not in (None, True, False):
        raise AnalysisError(f"collect: prepend_bos must be None, True or False; got {prepend_bos!r}.")
    limit = context_limit(model, max_length, truncation)
    texts = [
        text_tokens(model, t, prepend_bos, max_length=max_length, truncation=truncation).tolist()
        if isinstance(t, str)
        else fit(torch.as_tensor(list(t), dtype=torch.long), limit, truncation, f"texts[{i}]").tolist()
        for i, t in enumerate(texts)
    ]
    collectors = {layer: Collect() for layer in layers}
    reft = ReftModel(
        model,
        [
            Intervention(c, layers=layer, positions=positions, hook=hook, name=f"collect@{layer}")
            for layer, c in collectors.items()
        ],
    )
    stop = max(layers) + 1
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch together
    rows: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    examples: list[Tensor] = []
    unit = reft.units[0]
    with torch.no_grad(), progress_bar(len(texts), desc="collect", enabled=progress, unit="text") as bar:
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            plan = reft.plan([texts[i] for i in chunk])
            for c in collectors.values():
                c.clear()
            execute(model, plan, reft.cast, return_type=None, stop_at_layer=stop if stop < model.cfg.n_layers else None)
            counts = plan.masks[id(unit)].sum(1).cpu()
            examples.append(torch.tensor(chunk).repeat_interleave(counts))
            for layer, c in collectors.items():
                rows[layer].append(torch.cat(c.activations).float().cpu())
            bar.update(len(chunk))
    example = torch.cat(examples)
    back = torch.argsort(example, stable=True)  # example-major in the caller's order; positions stay in order
    return Activations({layer: torch.cat(r)[back] for layer, r in rows.items()}, example[back], len(texts), hook)


@dataclass
class Direction:
    """A unit direction and the statistics to check it by.

    ``norm``: the size of the raw direction before normalising (DiffMean ‖μ₊ − μ₋‖, the probe's
    ‖w‖, PCA's standard deviation along the component); ``separation``: Cohen's d of the
    projections, (m₊ − m₋) / √((s₊² + s₋²)/2); ``fit_auroc``: the AUROC of the projections of
    the very rows the direction was fitted on (one row per selected token of each training text,
    when the rows come from :func:`collect`): a check that the fit separates its own data, **not**
    a detection accuracy. For that, score held-out texts (one score per text,
    ``acts.scores(layer, u, pool="max")``) and call :func:`auroc`. ``pos_mean`` / ``neg_mean``:
    the mean projections; ``mean_norm``: the mean ‖h‖ of the samples, the scale to set a steering
    α against; ``explained_variance``: PCA's share on the component. (``auroc`` is the old name of
    ``fit_auroc``; it still reads, with a DeprecationWarning.)
    """

    vector: Float[Tensor, " d"]
    method: str
    norm: float
    separation: float
    fit_auroc: float
    pos_mean: float
    neg_mean: float
    mean_norm: float
    explained_variance: float | None = None

    def __repr__(self) -> str:
        ev = f", explained_variance={self.explained_variance:.3f}" if self.explained_variance is not None else ""
        return (
            f"Direction({self.method}, d={self.vector.shape[0]}, norm={self.norm:.4g}, separation={self.separation:.3f}, "
            f"fit_auroc={self.fit_auroc:.3f}, pos_mean={self.pos_mean:.4g}, neg_mean={self.neg_mean:.4g}{ev})"
        )

    @property
    def auroc(self) -> float:
        """Deprecated name of :attr:`fit_auroc` (per-row, on the fitted data: not held-out detection)."""
        warnings.warn(
            "Direction.auroc is deprecated; use Direction.fit_auroc, the AUROC of the projections of the rows the "
            "direction was fitted on (per token, not held out). For detection accuracy score held-out texts and "
            "call reftlens.steering.auroc. See docs/changelog.md.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.fit_auroc


def diff_mean(pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"]) -> Direction:
    """Difference of means (CAA, AxBench's DiffMean): u ∝ mean(pos) − mean(neg).

    >>> g = torch.Generator().manual_seed(0)
    >>> pos, neg = torch.randn(50, 4, generator=g) + torch.tensor([3.0, 0, 0, 0]), torch.randn(50, 4, generator=g)
    >>> diff_mean(pos, neg).vector[0] > 0.9
    tensor(True)
    """
    pos, neg = _check(pos, neg, "diff_mean")
    raw = pos.mean(0) - neg.mean(0)
    if float(raw.norm()) == 0.0:
        raise AnalysisError("diff_mean: the two classes have the same mean, so there is no direction to return.")
    return _direction(raw, "diff_mean", float(raw.norm()), pos, neg)


def pca(pos: Float[Tensor, "n d"], neg: Float[Tensor, "n d"], *, seed: int = 0) -> Direction:
    """The first principal component of paired differences (RepE's LAT): pair ``pos[i]`` with
    ``neg[i]`` (equal counts; pair inputs that differ in the concept, e.g. the same prompt with and
    without it), flip each difference's sign at random as RepE does, centre, and take the top
    right singular vector, oriented so that ``pos`` projects higher.
    """
    pos, neg = _check(pos, neg, "pca")
    if pos.shape[0] != neg.shape[0]:
        raise AnalysisError(
            f"pca pairs pos[i] with neg[i], so both need as many rows; got {pos.shape[0]} and "
            f"{neg.shape[0]}. Pair them (e.g. truncate to the shorter) before calling."
        )
    if pos.shape[0] < 2:
        raise AnalysisError("pca needs at least two pairs.")
    diffs = pos - neg
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (diffs.shape[0], 1), generator=g).to(diffs) * 2 - 1
    x = diffs * signs
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    total = float((s.double() ** 2).sum())
    if not total > 1e-12 * max(1.0, float((diffs.double() ** 2).sum())):
        raise AnalysisError(
            "pca: the paired differences pos − neg have no variance (every pair differs by the same amount, up "
            "to sign, or not at all), so there is no principal component to return; check that the pairs differ "
            "in the concept, or use diff_mean."
        )
    v = vh[0]
    if float(diffs.mean(0) @ v) < 0:
        v = -v
    ev = float(s[0] ** 2 / (s**2).sum())
    return _direction(v, "pca", float(s[0]) / math.sqrt(max(1, x.shape[0] - 1)), pos, neg, explained_variance=ev)


def probe(
    pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"], *, l2: float = 1e-4, max_iter: int = 500
) -> Direction:
    """A logistic-regression probe: p(pos | h) = σ(wᵀh + b), fitted by L-BFGS on the mean
    cross-entropy + ``l2``·‖w‖²/2 (in float64, on features centred on the pooled mean); u = w/‖w‖.
    """
    pos, neg = _check(pos, neg, "probe")
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])]).double()
    center = x.mean(0)
    scale = float((x - center).norm(dim=1).mean()) or 1.0  # conditioning only: w is rescaled back below
    xs = (x - center) / scale
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    raw = (w.detach() / scale).float()
    if float(raw.norm()) == 0.0:
        raise AnalysisError(
            "probe: the fitted weights are zero (the classes are not separable by any direction at "
            "this l2); lower l2 or check the labels."
        )
    return _direction(raw, "probe", float(raw.norm()), pos, neg)


def auroc(scores: Float[Tensor, " n"], labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive): the chance that
    a random positive scores above a random negative, ties counting half (Mann–Whitney U).

    >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    0.75
    """
    scores = torch.as_tensor(scores).detach().double().flatten().cpu()
    labels = torch.as_tensor(labels).flatten().cpu().bool()
    if scores.shape != labels.shape:
        raise AnalysisError(f"auroc: {scores.numel()} scores but {labels.numel()} labels; give one label per score.")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise AnalysisError(f"auroc needs both classes; got {n_pos} positives and {n_neg} negatives.")
    if bool(torch.isnan(scores).any()):
        raise AnalysisError("auroc: some scores are NaN.")
    order = torch.argsort(scores)
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = (ends - (counts.double() - 1) / 2)[inverse]  # 1-based ranks, ties averaged
    ranks = torch.empty_like(average_rank)
    ranks[order] = average_rank
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _check(pos: Tensor, neg: Tensor, what: str) -> tuple[Tensor, Tensor]:
    pos, neg = torch.as_tensor(pos).detach().float(), torch.as_tensor(neg).detach().float()
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise AnalysisError(
            f"{what} takes two [n, d] tensors of the same width d (rows = samples); got "
            f"{tuple(pos.shape)} and {tuple(neg.shape)}."
        )
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise AnalysisError(
            f"{what} needs samples of both classes; got {pos.shape[0]} positive and {neg.shape[0]} negative."
        )
    return pos, neg.to(pos.device)


def _direction(
    raw: Tensor, method: str, norm: float, pos: Tensor, neg: Tensor, explained_variance: float | None = None
) -> Direction:
    u = F.normalize(raw.float(), dim=0)
    p, n = pos @ u, neg @ u
    pooled_sd = math.sqrt(
        (float(p.var()) if p.numel() > 1 else 0.0) / 2 + (float(n.var()) if n.numel() > 1 else 0.0) / 2
    )
    gap = float(p.mean() - n.mean())
    separation = gap / pooled_sd if pooled_sd > 0 else math.copysign(math.inf, gap) if gap else 0.0
    labels = torch.cat([torch.ones(p.numel()), torch.zeros(n.numel())])
    mean_norm = float(torch.cat([pos, neg]).norm(dim=1).mean())
    return Direction(
        u,
        method,
        norm,
        separation,
        auroc(torch.cat([p, n]), labels),
        float(p.mean()),
        float(n.mean()),
        mean_norm,
        explained_variance,
    )


def _as_matrix(directions: Any) -> tuple[Tensor, bool]:
    if isinstance(directions, Direction):
        return directions.vector[None].float(), True
    if isinstance(directions, (list, tuple)):
        return torch.stack(
            [d.vector if isinstance(d, Direction) else torch.as_tensor(d) for d in directions]
        ).float(), False
    t = torch.as_tensor(directions).detach().float()
    if t.ndim == 1:
        return t[None], True
    if t.ndim == 2:
        return t, False
    raise AnalysisError(
        f"directions must be a Direction, a [d] or [k, d] tensor or a list of them; got shape {tuple(t.shape)}."
    )
