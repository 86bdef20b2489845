"""Where to train: score every candidate site of a ReFT for a task, and a recipe within a budget.

A candidate is one Φ of the chosen family at one ``(hook, layer, position group)``; the position
groups are prompt-relative (``"l1"``, ``"f3+l3"``, ...), resolved against each example's prompt as
training resolves them. Two scores:

- ``"gradient"`` (first order, one backward per batch for every site at once). A read-only
  :class:`~reftlens.interventions.Collect` with ``detach=False`` at every ``(hook, layer)`` keeps the
  activations ``h`` in the autograd graph; one backward of the task loss gives ``g = ∂loss/∂h`` at
  every row. The edits of the low-rank families (LoReFT, NoReFT, DiReFT, NodiReFT) are rank-r affine
  maps of the activation, ``Δ(h) = U (V h + c)``; at the identity the loss changes by
  ``⟨G, UV⟩ + ⟨Σg, Uc⟩`` with ``G = Σ_rows g [h; s]ᵀ`` (``s`` the site's RMS activation norm, so the
  constant part is measured in the site's own units). The largest first-order decrease over rank-r
  maps of unit spectral norm is the sum of the r largest singular values of ``G`` (its Ky Fan
  r-norm): that is the score. For ``family="steer"`` (a constant vector) it is ``s·‖Σ g‖``.
  Why not ``‖Σ g‖`` for every family: a task whose answer depends on the input (classification)
  has gradients that cancel over examples, and an input-dependent edit does not need them to agree.
- ``"train"`` (short training). One small set per candidate, all trained jointly for ``steps``
  steps as a bank (every set gets exactly the updates it would get alone, on the same batches),
  then each scored by its loss drop on a fixed evaluation sample (base loss − the set's loss).

Both run through the engine (:class:`~reftlens.ReftModel`, :func:`reftlens.train`); nothing here
registers a hook.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import AnalysisError, ReftError
from reftlens.insight.common import (
    check_int,
    check_model,
    encode_data,
    logits_and_labels,
    row_losses,
    to_batch,
)
from reftlens.interventions import DiReFT, LoReFT, NodiReFT, NoReFT, Steer
from reftlens.interventions.patching import Collect
from reftlens.model import ReftModel
from reftlens.positions import FirstLast, Indices, PositionSpec, RealTokens, parse_positions, static_overlap
from reftlens.runtime.plan import NO_POSITION_AXIS, hook_name_for
from reftlens.sets import Intervention

FAMILIES = {"loreft": LoReFT, "noreft": NoReFT, "direft": DiReFT, "nodireft": NodiReFT, "steer": Steer}
SCORES = ("gradient", "train")
DEFAULT_HOOKS = ("resid_post", "attn_out", "mlp_out")
DEFAULT_POSITIONS = ("f1", "l1", "f3+l3", "f5+l5")
DEFAULT_STEPS = {"gradient": 4, "train": 20}
ROWS_PER_STEP = 64  # the default bank_size keeps a step of the train score at this many rows
TIE = 1e-4  # scores within this fraction of the best score count as equal (ties go to fewer positions)


@dataclass(frozen=True)
class Candidate:
    """One candidate site: a Φ of the family at ``hook`` of ``layer``, at ``positions``."""

    hook: str
    layer: int
    positions: str
    params: int

    @property
    def label(self) -> str:
        return f"{self.hook}@L{self.layer}[{self.positions}]"


@dataclass
class LocalizeResult:
    """Every candidate scored, and the recipe.

    ``scores[i]`` scores ``candidates[i]`` (higher: a better place to train); ``order`` ranks them;
    ``recipe`` holds fresh :class:`~reftlens.Intervention` s for the best candidates within
    ``budget`` parameters, in the base's dtype, ready for ``ReftModel(model, result.recipe)`` and
    :func:`reftlens.train`.
    ``seconds`` is the wall time localizing took (to compare with the training it guides).
    """

    candidates: list[Candidate]
    scores: Tensor
    order: list[int]
    recipe: list[Intervention]
    score: str
    family: str
    rank: int
    budget: int
    hooks: list[str]
    layers: list[int]
    positions: list[str]
    seconds: float
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """The candidates in rank order: ``{"rank", "hook", "layer", "positions", "score", "params",
        "chosen"}`` (chosen: in the recipe)."""
        chosen = {(iv.hook, iv.layers[0], str(iv.positions)) for iv in self.recipe}
        return [
            {
                "rank": k + 1,
                "hook": self.candidates[i].hook,
                "layer": self.candidates[i].layer,
                "positions": self.candidates[i].positions,
                "score": float(self.scores[i]),
                "params": self.candidates[i].params,
                "chosen": (self.candidates[i].hook, self.candidates[i].layer, self.candidates[i].positions) in chosen,
            }
            for k, i in enumerate(self.order)
        ]

    def top(self, k: int = 1) -> list[Candidate]:
        """The ``k`` best candidates."""
        return [self.candidates[i] for i in self.order[:k]]

    def values(self, hook: str) -> Tensor:
        """The scores at ``hook`` as a ``[layers, position groups]`` grid."""
        if hook not in self.hooks:
            raise AnalysisError(f"hook {hook!r} was not among the candidates; the hooks are {self.hooks}.")
        grid = torch.full((len(self.layers), len(self.positions)), float("nan"))
        for c, s in zip(self.candidates, self.scores.tolist()):
            if c.hook == hook:
                grid[self.layers.index(c.layer), self.positions.index(c.positions)] = s
        return grid

    def heatmap(self, path: str | None = None, title: str | None = None, **kwargs: Any) -> Any:
        """One layers × position-groups panel per hook (matplotlib Figure; PNG when ``path`` is given)."""
        import matplotlib.pyplot as plt

        from reftlens.analysis.plots import heatmap

        n = len(self.hooks)
        fig, axes = plt.subplots(
            1, n, figsize=kwargs.pop("figsize", (3.2 * n + 1, max(3.0, 0.25 * len(self.layers) + 1.5))), squeeze=False
        )
        for ax, hook in zip(axes[0], self.hooks):
            heatmap(
                self.values(hook),
                self.layers,
                self.positions,
                title=hook,
                ax=ax,
                center=None,
                cmap=kwargs.get("cmap", "viridis"),
                label=f"{self.score} score",
            )
        fig.suptitle(title or f"localize: {self.family} r{self.rank}, {self.score} score")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=kwargs.get("dpi", 120))
        return fig

    plot = heatmap

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "family": self.family,
            "rank": self.rank,
            "budget": self.budget,
            "steps": self.steps,
            "seconds": self.seconds,
            "recipe": [
                {"hook": iv.hook, "layers": list(iv.layers), "positions": str(iv.positions)} for iv in self.recipe
            ],
            "candidates": self.table(),
            **self.extra,
        }

    def to_json(self, path: str | None = None) -> str:
        """The result as JSON (written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __repr__(self) -> str:
        best = ", ".join(f"{c.label} {float(self.scores[i]):.4g}" for c, i in zip(self.top(3), self.order[:3]))
        return (
            f"LocalizeResult({len(self.candidates)} candidates by {self.score!r} score in {self.seconds:.1f}s; "
            f"best: {best}; recipe: {len(self.recipe)} intervention(s))"
        )


@dataclass(frozen=True)
class _AnyOf(PositionSpec):
    """The union of position specs (the rows a site's probe keeps)."""

    specs: tuple[PositionSpec, ...]

    def site_mask(self, real: RealTokens) -> Tensor:
        out = self.specs[0].site_mask(real)
        for s in self.specs[1:]:
            out = out | s.site_mask(real)
        return out

    def __str__(self) -> str:
        return " | ".join(str(s) for s in self.specs)


def localize(
    model: Any,
    data: Any,
    *,
    family: str = "loreft",
    rank: int = 4,
    hooks: Sequence[str] = DEFAULT_HOOKS,
    layers: Sequence[int] | None = None,
    positions: Sequence[Any] = DEFAULT_POSITIONS,
    budget: int | None = None,
    score: str = "gradient",
    steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-2,
    task: str = "lm",
    label_names: Sequence[str] | None = None,
    chat_template: bool = False,
    max_length: int = 512,
    bank_size: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> LocalizeResult:
    """Score every candidate site for a ReFT on a task and return the best ones within a budget.

    Args:
        model: a TransformerLens bridge (:func:`reftlens.load_model`).
        data: task examples in any form :func:`reftlens.train` takes (``prompt`` + ``completion``;
            ``prompt`` + ``label`` with ``task="classification"``).
        family: the Φ to place: ``"loreft"`` (default), ``"noreft"``, ``"direft"``, ``"nodireft"``
            or ``"steer"``.
        rank: the Φ's rank (ignored by ``"steer"``).
        hooks: the hooks to consider at every layer (default ``resid_post``, ``attn_out``, ``mlp_out``).
        layers: the layers to consider (default all).
        positions: prompt-relative position groups, each one candidate (default ``f1``, ``l1``,
            ``f3+l3``, ``f5+l5``); any position spec.
        budget: the most trainable parameters the recipe may hold (default: one Φ, the best site).
        score: ``"gradient"`` (first order, default) or ``"train"`` (short joint training); see the
            module docs and the docs page for how they compare.
        steps: batches of the gradient score (default 4) or training steps of the train score (default 20).
        batch_size: examples per batch (per candidate for ``"train"``).
        lr: the train score's learning rate.
        task, label_names, chat_template, max_length: as in :func:`reftlens.train`.
        bank_size: the train score trains at most this many candidates in one bank (exactly equal
            to training them one by one; it bounds the rows, and the memory, of one step). Default:
            as many as keep a step at ``ROWS_PER_STEP`` (64) rows, ``64 // batch_size``.
        progress: show progress bars.
        seed: the seed of the Φs' initialisation and of the batches.

    Returns a :class:`LocalizeResult` (``.table()``, ``.heatmap()``, ``.recipe``).

    >>> res = localize(model, data, budget=4612)           # doctest: +SKIP
    >>> reft = ReftModel(model, res.recipe); reftlens.train(reft, data)  # doctest: +SKIP
    """
    start = time.perf_counter()
    check_model(model, "localize")
    if family not in FAMILIES:
        raise AnalysisError(f"family must be one of {sorted(FAMILIES)}; got {family!r}.")
    check_int("rank", rank)
    if score not in SCORES:
        raise AnalysisError(f"score must be 'gradient' or 'train'; got {score!r}.")
    check_int("batch_size", batch_size)
    bank_size = max(1, ROWS_PER_STEP // batch_size) if bank_size is None else check_int("bank_size", bank_size)
    steps = DEFAULT_STEPS[score] if steps is None else check_int("steps", steps)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise AnalysisError(f"lr must be a finite positive number; got {lr!r}.")
    if not isinstance(progress, bool):
        raise AnalysisError(f"progress must be True or False; got {progress!r}.")
    check_int("seed", seed, 0)
    d, n_layers = model.cfg.d_model, model.cfg.n_layers
    dtype = next(model.parameters()).dtype  # the Φs take the base's dtype (as load_pyreft builds them)
    if family != "steer" and rank > d:
        raise AnalysisError(f"rank {rank} exceeds the model's width d_model={d}.")
    hooks = _check_hooks(model, hooks, n_layers)
    layers = _check_layers(layers, n_layers)
    specs, pos_labels = _check_positions(positions)
    params = sum(p.numel() for p in _new_phi(family, d, rank, dtype).parameters())
    if budget is None:
        budget = params
    elif not isinstance(budget, int) or isinstance(budget, bool):
        raise AnalysisError(f"budget must be an integer number of parameters; got {budget!r}.")
    elif budget < params:
        raise AnalysisError(
            f"budget={budget} parameters is below one candidate's {params} ({family} rank {rank} at d_model={d}); "
            f"raise the budget or lower the rank."
        )
    examples, label_names = encode_data(
        model,
        data,
        what="data",
        task=task,
        label_names=label_names,
        chat_template=chat_template,
        max_length=max_length,
    )
    _check_widths(model, hooks, layers[0], examples[0])
    candidates = [Candidate(h, l, p, params) for h in hooks for l in layers for p in pos_labels]
    spec_of = dict(zip(pos_labels, specs))
    if score == "gradient":
        values, extra = _gradient_scores(
            model, examples, candidates, spec_of, family, rank, steps, batch_size, seed, progress
        )
    else:
        values, extra = _train_scores(
            model,
            data,
            examples,
            candidates,
            spec_of,
            family,
            rank,
            dtype,
            steps,
            batch_size,
            lr,
            task,
            label_names,
            chat_template,
            max_length,
            bank_size,
            seed,
            progress,
        )
    order = _rank(values, candidates, spec_of)
    recipe = _recipe(candidates, order, spec_of, family, d, rank, dtype, budget, seed)
    return LocalizeResult(
        candidates,
        values,
        order,
        recipe,
        score,
        family,
        rank,
        budget,
        hooks,
        layers,
        pos_labels,
        time.perf_counter() - start,
        steps,
        extra,
    )


# ---- arguments ---------------------------------------------------------------------------------


def _check_hooks(model: Any, hooks: Any, n_layers: int) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, (list, tuple)) or not hooks or not all(isinstance(h, str) and h for h in hooks):
        raise AnalysisError(f"hooks must be a non-empty list of hook names such as 'resid_post'; got {hooks!r}.")
    if len(set(hooks)) != len(hooks):
        raise AnalysisError(f"hooks {list(hooks)} repeat a hook; list each once.")
    hook_dict = model.hook_dict
    for h in hooks:
        try:
            names = [hook_name_for(h, l) for l in range(n_layers)]
        except ReftError as e:
            raise AnalysisError(f"hooks: {e}") from None
        missing = [n for n in names if n not in hook_dict]
        if missing:
            raise AnalysisError(f"hooks: {h!r} is not a hook of this model ({missing[0]} does not exist).")
        point = hook_dict[names[0]]
        if (point.name or names[0]).endswith(NO_POSITION_AXIS):
            raise AnalysisError(f"hooks: {h!r} has no position axis, so it has no position groups to localize over.")
    return list(hooks)


def _check_widths(model: Any, hooks: list[str], layer: int, example: Any) -> None:
    """Every hook must carry d_model-wide rows (what the Φ families edit): read one example once."""
    reads = {h: Collect() for h in hooks}
    reft = ReftModel(model, [Intervention(c, layers=layer, positions="l1", hook=h) for h, c in reads.items()])
    with torch.no_grad():
        reft(torch.tensor([example.prompt], device=reft.device), stop_at_layer=layer + 1)
    for h, c in reads.items():
        width = tuple(c.activations[0].shape[1:]) if c.activations else None
        if width != (model.cfg.d_model,):
            raise AnalysisError(
                f"hooks: {h!r} carries rows of shape {width}, not d_model={model.cfg.d_model}; the Φ families edit "
                "d_model-wide activations (resid_post, resid_pre, resid_mid, attn_out, mlp_out)."
            )


def _check_layers(layers: Any, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if (
        not isinstance(layers, (list, tuple, range))
        or not layers
        or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers)
    ):
        raise AnalysisError(f"layers must be None (all) or a non-empty list of ints; got {layers!r}.")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise AnalysisError(f"layers {bad} do not exist; the model has layers 0..{n_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise AnalysisError(f"layers {list(layers)} repeat a layer; list each once.")
    return list(layers)


def _check_positions(positions: Any) -> tuple[list[PositionSpec], list[str]]:
    if isinstance(positions, str) or not isinstance(positions, (list, tuple)) or not positions:
        raise AnalysisError(
            f"positions must be a non-empty list of position groups such as ('l1', 'f3+l3'); got {positions!r}."
        )
    specs = []
    for p in positions:
        try:
            specs.append(parse_positions(p))
        except ReftError as e:
            raise AnalysisError(f"positions: {e}") from None
    labels = [str(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise AnalysisError(f"positions {labels} repeat a group; list each once.")
    return specs, labels


def _new_phi(family: str, d: int, rank: int, dtype: torch.dtype) -> nn.Module:
    """A fresh Φ in ``dtype`` (the base's, as ``load_pyreft`` builds them, so a set of them runs and
    trains on the base as it is); initialised in float32 first, so one seed gives one Φ in every dtype."""
    phi = Steer(d) if family == "steer" else FAMILIES[family](d, rank)
    return phi.to(dtype)


def _size(spec: PositionSpec) -> float:
    if isinstance(spec, FirstLast):
        return spec.first + spec.last
    if isinstance(spec, Indices):
        return len(spec.indices)
    return math.inf


def _rank(values: Tensor, candidates: list[Candidate], spec_of: dict[str, PositionSpec]) -> list[int]:
    """Best first; scores within ``TIE`` of the best score's size count as equal, and then the group
    with fewer positions goes first (it edits fewer tokens for the same gain)."""
    v = torch.nan_to_num(values.double(), nan=-math.inf)
    scale = float(v[torch.isfinite(v)].abs().max()) if torch.isfinite(v).any() else 1.0
    scale = scale or 1.0
    bucket = torch.where(torch.isfinite(v), torch.round(v / (scale * TIE)), torch.full_like(v, -math.inf))
    return sorted(
        range(len(candidates)),
        key=lambda i: (-float(bucket[i]), _size(spec_of[candidates[i].positions]), -float(v[i]), i),
    )


def _collides(a: Candidate, b: Candidate, spec_of: dict[str, PositionSpec]) -> bool:
    if a.hook != b.hook or a.layer != b.layer:
        return False
    sa, sb = spec_of[a.positions], spec_of[b.positions]
    if sa.anchored() is None or sb.anchored() is None:
        return True
    return static_overlap(sa, sb) is not None


def _recipe(
    candidates: list[Candidate],
    order: list[int],
    spec_of: dict[str, PositionSpec],
    family: str,
    d: int,
    rank: int,
    dtype: torch.dtype,
    budget: int,
    seed: int,
) -> list[Intervention]:
    """The best candidates, in rank order, while they fit the budget and edit disjoint sites."""
    taken: list[Candidate] = []
    left = budget
    for i in order:
        c = candidates[i]
        if c.params <= left and not any(_collides(c, t, spec_of) for t in taken):
            taken.append(c)
            left -= c.params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            Intervention(
                _new_phi(family, d, rank, dtype),
                layers=c.layer,
                positions=spec_of[c.positions],
                hook=c.hook,
                name=c.label,
            )
            for c in taken
        ]


# ---- the first-order score ---------------------------------------------------------------------


def _gradient_scores(
    model: Any,
    examples: list,
    candidates: list[Candidate],
    spec_of: dict[str, PositionSpec],
    family: str,
    rank: int,
    steps: int,
    batch_size: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, dict[str, Any]]:
    sites = list(dict.fromkeys((c.hook, c.layer) for c in candidates))
    groups = list(spec_of)
    union = _AnyOf(tuple(spec_of[p] for p in groups))
    probes = {s: Collect(detach=False) for s in sites}
    reft = ReftModel(
        model,
        [Intervention(c, layers=l, positions=union, hook=h, name=f"probe {h}@L{l}") for (h, l), c in probes.items()],
    )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    chosen = order[: steps * batch_size]
    batches = [chosen[k : k + batch_size] for k in range(0, len(chosen), batch_size)]
    n_tokens = sum(len(examples[i].completion) for i in chosen)
    rows_h: dict[tuple, list[Tensor]] = {s: [] for s in sites}
    rows_g: dict[tuple, list[Tensor]] = {s: [] for s in sites}
    member: dict[str, list[Tensor]] = {p: [] for p in groups}  # per group: which union rows are its own
    loss_total = 0.0
    bar = _bar(len(batches), progress, "localize (gradient)")
    try:
        for ids in batches:
            batch = to_batch(model, [examples[i] for i in ids])
            for c in probes.values():
                c.clear()
            with torch.enable_grad():
                logits, labels = logits_and_labels(reft, batch)
                losses, _ = row_losses(logits, labels)
                loss = losses.sum() / n_tokens
                acts = [probes[s].activations[0] for s in sites]
                grads = torch.autograd.grad(loss, acts, allow_unused=True)
            loss_total += float(loss.detach())
            for s, a, gr in zip(sites, acts, grads):
                rows_h[s].append(a.detach().float().cpu())
                rows_g[s].append(torch.zeros_like(rows_h[s][-1]) if gr is None else gr.detach().float().cpu())
            frame = RealTokens.from_mask(batch.prompt_mask.bool() & batch.attention_mask.bool(), batch.tokens)
            in_union = union.site_mask(frame)
            for p in groups:
                member[p].append(spec_of[p].site_mask(frame)[in_union].cpu())
            bar.update(1)
    finally:
        bar.close()
        for c in probes.values():
            c.clear()
    values = torch.empty(len(candidates))
    index = {(c.hook, c.layer, c.positions): i for i, c in enumerate(candidates)}
    scales = {}
    for s in sites:
        H, G = torch.cat(rows_h[s]), torch.cat(rows_g[s])
        scale = float(H.pow(2).sum(1).mean().sqrt()) if H.shape[0] else 0.0
        scales[f"{s[0]}@L{s[1]}"] = scale
        for p in groups:
            keep = torch.cat(member[p])
            A, B = G[keep], H[keep]
            if family == "steer":
                val = scale * float(A.sum(0).norm())
            else:
                val = _ky_fan(A, torch.cat([B, B.new_full((B.shape[0], 1), scale)], 1), rank)
            values[index[(s[0], s[1], p)]] = val
    return values, {"base_loss": loss_total, "site_scale": scales, "examples": len(chosen)}


def _ky_fan(A: Tensor, B: Tensor, r: int) -> float:
    """The sum of the ``r`` largest singular values of ``Aᵀ B`` (rows paired), computed in the
    smaller of the two spaces: through the rows' QR factors when there are fewer rows than features."""
    n = A.shape[0]
    if n == 0:
        return 0.0
    A, B = A.double(), B.double()
    if n < min(A.shape[1], B.shape[1]):
        ra = torch.linalg.qr(A.T, mode="r").R  # Aᵀ = Q_a R_a, Bᵀ = Q_b R_b: AᵀB = Q_a (R_a R_bᵀ) Q_bᵀ
        rb = torch.linalg.qr(B.T, mode="r").R
        s = torch.linalg.svdvals(ra @ rb.T)
    else:
        s = torch.linalg.svdvals(A.T @ B)
    return float(s[:r].sum())


# ---- the short-training score --------------------------------------------------------------------


def _train_scores(
    model: Any,
    data: Any,
    examples: list,
    candidates: list[Candidate],
    spec_of: dict[str, PositionSpec],
    family: str,
    rank: int,
    dtype: torch.dtype,
    steps: int,
    batch_size: int,
    lr: float,
    task: str,
    label_names: Sequence[str] | None,
    chat_template: bool,
    max_length: int,
    bank_size: int,
    seed: int,
    progress: bool,
) -> tuple[Tensor, dict[str, Any]]:
    from reftlens.training import train

    d = model.cfg.d_model
    rows = [dict(r) for r in data] if hasattr(data, "column_names") else [dict(r) for r in data]
    g = torch.Generator().manual_seed(seed + 1)
    n_eval = min(len(examples), 2 * batch_size)
    eval_ids = torch.randperm(len(examples), generator=g)[:n_eval].tolist()
    eval_batch = to_batch(model, [examples[i] for i in eval_ids])
    values = torch.empty(len(candidates))
    base_loss = None
    train_seconds = 0.0
    for first in range(0, len(candidates), bank_size):
        chunk = list(range(first, min(first + bank_size, len(candidates))))
        with torch.random.fork_rng(devices=[]):
            sets = {}
            for i in chunk:
                torch.manual_seed(seed)  # every candidate starts from the same Φ
                c = candidates[i]
                sets[c.label] = Intervention(
                    _new_phi(family, d, rank, dtype), layers=c.layer, positions=spec_of[c.positions], hook=c.hook
                )
        bank = ReftModel(model, sets)
        bank_rows = [{**r, "adapter": candidates[i].label} for i in chunk for r in rows]
        t0 = time.perf_counter()
        train(
            bank,
            bank_rows,
            batch_size=batch_size,
            max_steps=steps,
            lr=lr,
            seed=seed,
            task=task,
            label_names=label_names,
            chat_template=chat_template,
            max_length=max_length,
            progress=progress,
        )
        train_seconds += time.perf_counter() - t0
        with torch.no_grad():
            if base_loss is None:
                base_loss = _eval_loss(bank, eval_batch, None)
            for i in chunk:
                values[i] = base_loss - _eval_loss(bank, eval_batch, candidates[i].label)
        del bank
    return values, {"base_loss": base_loss, "eval_examples": n_eval, "train_seconds": train_seconds}


def _eval_loss(bank: ReftModel, batch: Any, name: str | None) -> float:
    logits, labels = logits_and_labels(bank, batch, adapters=[name] * batch.tokens.shape[0])
    losses, n = row_losses(logits, labels)
    return float(losses.sum() / n.sum().clamp(min=1))


def _bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, dynamic_ncols=True)
