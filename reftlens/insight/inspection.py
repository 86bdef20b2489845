"""What a trained set learned: :func:`inspect` reports, per intervention, where the set's effect
comes from, what it writes, and what else it changes.

Every number comes from runs of the engine: the set, the set without one intervention, one
intervention alone, the base model (and, for a bank, all sets composed) are sets of one probe
:class:`~reftlens.ReftModel` bank built from the trained units (sharing their Φs), run on the
data with ``adapters=``. The activations each Φ edits are read by a
:class:`~reftlens.interventions.Collect` stacked just below it. Nothing here registers a hook.

The module is ``inspection`` so that it never shadows Python's ``inspect`` inside the package; the
function is :func:`reftlens.inspect`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from reftlens.analysis.das import principal_angles
from reftlens.errors import AnalysisError
from reftlens.insight.common import (
    check_int,
    encode_data,
    final_readout,
    logits_and_labels,
    read_direction,
    to_batch,
    top_tokens,
)
from reftlens.interventions.base import phi_label
from reftlens.interventions.patching import Collect
from reftlens.model import ReftModel
from reftlens.sets import Intervention, Unit

METRICS = ("logprob", "accuracy")


@dataclass
class InterventionReport:
    """One intervention of a set (a bank's set is named in ``set``).

    ``metric_removed``: the set's task metric with this intervention removed (the others kept);
    ``metric_alone``: with this one alone. ``share_removed = (full − removed) / (full − base)`` and
    ``share_alone = (alone − base) / (full − base)``: for interventions whose effects add, each list
    of shares sums to 1. ``directions``: per direction the Φ writes (the columns of its affine
    ``up``: Rᵀ for LoReFT, W₂ᵀ for DiReFT, v for Steer), its mean coefficient over the data
    (``down·h + shift``), and the tokens it promotes and suppresses, oriented by that mean's sign.
    ``mean_edit``: per layer, the mean of Φ(h) − h over the edited rows of the data, its norm and
    its promoted / suppressed tokens. ``off_target``: KL from the base model and the fraction of
    top-1 next tokens changed on neutral text, with this intervention alone. ``iia``: with
    ``counterfactuals=``, the interchange intervention accuracy of the subspace it writes (a DII on
    the span of its directions, at its sites), else None.
    """

    set: str | None
    name: str
    hook: str
    layers: list[int]
    positions: str
    phi: str
    params: int
    metric_removed: float
    metric_alone: float
    share_removed: float
    share_alone: float
    directions: list[dict[str, Any]] = field(default_factory=list)
    mean_edit: dict[int, dict[str, Any]] = field(default_factory=dict)
    off_target: dict[str, float] = field(default_factory=dict)
    iia: float | None = None


@dataclass
class SetReport:
    """One set: the task metric of the base model, of the set, and (in a bank of several sets) of all
    sets composed, on this set's examples; its off-target change on neutral text."""

    name: str | None
    examples: int
    metric_base: float
    metric_full: float
    metric_composed: float | None = None
    off_target: dict[str, float] = field(default_factory=dict)


@dataclass
class InspectReport:
    """What :func:`inspect` returns: ``sets``, ``interventions`` and, for a bank, ``angles``
    (principal angles in degrees between two sets' written subspaces at each site they share)."""

    metric: str
    sets: list[SetReport]
    interventions: list[InterventionReport]
    angles: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "sets": [asdict(s) for s in self.sets],
            "interventions": [asdict(iv) for iv in self.interventions],
            "angles": self.angles,
        }

    def to_json(self, path: str | None = None) -> str:
        """The report as JSON (written to ``path`` when given); NaN is written as null."""
        text = json.dumps(_finite(self.to_dict()), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def promoted(self, index: int = 0, direction: int = 0) -> list[int]:
        """The token ids direction ``direction`` of intervention ``index`` promotes, strongest first."""
        return [t["id"] for t in self.interventions[index].directions[direction]["promoted"]]

    def plot(self, path: str | None = None) -> Any:
        """Effect shares (removed / alone) and off-target KL per intervention (matplotlib Figure)."""
        import matplotlib

        if path is not None and matplotlib.get_backend().lower() not in (
            "agg",
            "module://matplotlib_inline.backend_inline",
        ):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        ivs = self.interventions
        labels = [f"{iv.set}/{iv.name}" if iv.set else iv.name for iv in ivs]
        x = list(range(len(ivs)))
        fig, (a, b) = plt.subplots(1, 2, figsize=(max(6.0, 1.2 * len(ivs) + 4), 3.5))
        a.bar([i - 0.2 for i in x], [iv.share_removed for iv in ivs], 0.4, label="removed (others kept)")
        a.bar([i + 0.2 for i in x], [iv.share_alone for iv in ivs], 0.4, label="alone")
        a.axhline(1.0, color="grey", lw=0.5)
        a.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        a.set_ylabel(f"share of the set's effect ({self.metric})")
        a.legend(fontsize=8)
        b.bar(x, [iv.off_target.get("kl", math.nan) for iv in ivs])
        b.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        b.set_ylabel("KL from base, neutral text")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def __repr__(self) -> str:
        lines = [f"InspectReport(metric={self.metric!r})"]
        for s in self.sets:
            comp = f", composed {s.metric_composed:.4g}" if s.metric_composed is not None else ""
            lines.append(
                f"  set {s.name or '(plain)'}: base {s.metric_base:.4g} -> set {s.metric_full:.4g}{comp}; "
                f"neutral KL {s.off_target.get('kl', math.nan):.3g}"
            )
        for iv in self.interventions:
            top = ", ".join(repr(t["token"]) for t in iv.directions[0]["promoted"][:3]) if iv.directions else ""
            lines.append(
                f"  {iv.name} @ {iv.hook} L{iv.layers} [{iv.positions}]: share removed {iv.share_removed:.3g}, "
                f"alone {iv.share_alone:.3g}; KL {iv.off_target.get('kl', math.nan):.3g}; promotes {top}"
            )
        return "\n".join(lines)


def neutral_texts() -> list[str]:
    """The neutral sentences that ship with reftlens (``reftlens/data/neutral_text.json``)."""
    raw = resources.files("reftlens").joinpath("data/neutral_text.json").read_text()
    return list(json.loads(raw)["texts"])


def inspect(
    reft: ReftModel,
    data: Any,
    *,
    neutral: Sequence[str] | None = None,
    metric: str | Callable[[Tensor, Tensor], Tensor] = "logprob",
    task: str = "lm",
    label_names: Sequence[str] | None = None,
    chat_template: bool = False,
    max_length: int = 512,
    batch_size: int = 8,
    top_k: int = 10,
    counterfactuals: Sequence[dict] | None = None,
) -> InspectReport:
    """Report what a trained set (or bank) does, per intervention.

    Args:
        reft: a :class:`~reftlens.ReftModel` (a plain set or a bank).
        data: task examples as :func:`reftlens.train` takes them. In a bank, an example's
            ``"adapter"`` names the set it belongs to; examples without one count for every set.
        neutral: texts for the off-target check (default: the neutral sentences that ship with
            reftlens, :func:`neutral_texts`). Each intervention edits them at its positions,
            resolved against the whole text.
        metric: ``"logprob"`` (mean log-probability of the completion tokens, default),
            ``"accuracy"`` (the share of completion tokens that are the argmax), or a function
            ``(logits [B, S, V], labels [B, S]) -> [B]`` per example (``labels`` holds the next-token
            targets, -100 where there is none). Higher must mean better.
        task, label_names, chat_template, max_length: as in :func:`reftlens.train`.
        batch_size: examples per forward.
        top_k: tokens listed per direction.
        counterfactuals: a causal model's counterfactual pairs, as :func:`reftlens.analysis.train_das`
            takes them (``base``, ``source``, ``label``). When given, each intervention's written
            subspace (the span of its directions) is run as a DII at its sites, and its interchange
            intervention accuracy is reported (``iia``): whether what the set writes is where the
            causal variable lives.

    Returns an :class:`InspectReport` (``.to_json()``, ``.plot()``).

    >>> report = reftlens.inspect(reft, data)                  # doctest: +SKIP
    >>> report.interventions[0].directions[0]["promoted"][:3]  # doctest: +SKIP
    """
    if not isinstance(reft, ReftModel):
        raise AnalysisError(f"inspect needs a trained ReftModel (a set or a bank); got {type(reft).__name__}.")
    with_source = [u.name for u in reft.units if u.takes_source]
    if with_source:
        raise AnalysisError(
            f"intervention {with_source[0]!r} takes a source (an interchange or DII): inspect reports sets "
            "that run on their own; measure a DAS subspace with reftlens.analysis.iia."
        )
    if isinstance(metric, str):
        if metric not in METRICS:
            raise AnalysisError(f"metric must be 'logprob', 'accuracy' or a function; got {metric!r}.")
    elif not callable(metric):
        raise AnalysisError(f"metric must be 'logprob', 'accuracy' or a function; got {type(metric).__name__}.")
    check_int("batch_size", batch_size)
    check_int("top_k", top_k)
    if counterfactuals is not None and (
        isinstance(counterfactuals, (str, dict)) or not hasattr(counterfactuals, "__len__") or not counterfactuals
    ):
        raise AnalysisError(
            "counterfactuals must be a non-empty list of {'base', 'source', 'label'} pairs (as train_das takes)."
        )
    texts = _check_neutral(neutral)
    model = reft.model
    examples, _ = encode_data(
        model, data, what="data", task=task, label_names=label_names, chat_template=chat_template, max_length=max_length
    )
    names: list[str | None] = list(reft.adapters) if reft.bank is not None else [None]
    for i, e in enumerate(examples):
        if e.adapter is not None and e.adapter not in names:
            known = f"the sets are {reft.adapters}" if reft.bank is not None else "this ReftModel holds one set"
            raise AnalysisError(f"data example {i} names the set {e.adapter!r} ('adapter'), but {known}.")
    units = {n: [u for u in reft.units if reft.bank is None or u.adapter == n] for n in names}
    origins = {n: list({id(u.origin): u.origin for u in us}.values()) for n, us in units.items()}
    probe, collects = _probe(reft, units, origins)
    readout = final_readout(model)
    metric_fn = _metric(metric)
    was_training = reft.training
    probe.eval()
    set_reports, iv_reports = [], []
    try:
        with torch.no_grad():
            for n in names:
                mine = [e for e in examples if e.adapter in (None, n)]
                if not mine:
                    raise AnalysisError(f"no data example belongs to set {n!r}; give some 'adapter': {n!r}.")

                def run(config: str | None, mine: list = mine) -> float:
                    return _metric_of(probe, mine, config, metric_fn, batch_size)

                base, full = run(None), run(_key(n, "full"))  # the full run's reads: what each Φ edits
                writes = {
                    id(iv): (
                        _directions(model, [u for u in units[n] if u.origin is iv], collects, readout, top_k),
                        _mean_edit(model, [u for u in units[n] if u.origin is iv], collects, readout, top_k),
                    )
                    for iv in origins[n]
                }
                for c in collects.values():
                    c.clear()
                composed = run("composed") if len(names) > 1 else None
                configs = [_key(n, "full")] + [_key(n, "alone", k) for k in range(len(origins[n]))]
                ot = _off_target(probe, texts, configs, batch_size)
                set_reports.append(SetReport(n, len(mine), base, full, composed, ot[0]))
                effect = full - base
                for k, iv in enumerate(origins[n]):
                    removed = run(_key(n, "without", k)) if len(origins[n]) > 1 else base
                    alone = run(_key(n, "alone", k)) if len(origins[n]) > 1 else full
                    my_units = [u for u in units[n] if u.origin is iv]
                    params = {id(p): p for u in my_units for p in u.phi.parameters()}
                    iv_reports.append(
                        InterventionReport(
                            set=n,
                            name=iv.name,
                            hook=iv.hook,
                            layers=sorted({l for u in my_units for l in u.layers}),
                            positions=str(iv.positions),
                            phi=phi_label(iv.phi),
                            params=sum(p.numel() for p in params.values()),
                            metric_removed=removed,
                            metric_alone=alone,
                            share_removed=(full - removed) / effect if effect else math.nan,
                            share_alone=(alone - base) / effect if effect else math.nan,
                            directions=writes[id(iv)][0],
                            mean_edit=writes[id(iv)][1],
                            off_target=ot[k + 1],
                            iia=None if counterfactuals is None else _iia(model, my_units, counterfactuals),
                        )
                    )
    finally:
        for c in collects.values():
            c.clear()
        reft.train(was_training)
    return InspectReport(
        metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        set_reports,
        iv_reports,
        _angles(units) if len(names) > 1 else [],
    )


# ---- the probe: every configuration as a set of one bank ---------------------------------------------


def _key(name: str | None, kind: str, k: int | None = None) -> str:
    return f"{name or ''}::{kind}" + (f"::{k}" if k is not None else "")


def _wrap(u: Unit, stack: int, name: str | None = None) -> Intervention:
    """A trained unit as an intervention sharing its Φ (one unit, one Φ: never copied again)."""
    return Intervention(
        u.phi, layers=list(u.layers), positions=u.positions, hook=u.hook, stack=stack, name=name or u.name
    )


def _probe(
    reft: ReftModel, units: dict[str | None, list[Unit]], origins: dict[str | None, list[Intervention]]
) -> tuple[ReftModel, dict[tuple[int, int], Collect]]:
    sets: dict[str, list[Intervention]] = {}
    collects: dict[tuple[int, int], Collect] = {}
    for n, us in units.items():
        # Each unit moves to the even order 2·stack and its read to the odd order just below it, so a
        # read sees its own Φ's input: above the Φs stacked lower on the site, below its own.
        full = [_wrap(u, 2 * (u.stack or 0)) for u in us]
        for u in us:
            for layer in u.layers:
                c = collects[(id(u), layer)] = Collect()
                read = Intervention(
                    c, layers=layer, positions=u.positions, hook=u.hook, stack=2 * (u.stack or 0) - 1, name="read"
                )
                full.append(read)
        sets[_key(n, "full")] = full
        if len(origins[n]) > 1:
            for k, iv in enumerate(origins[n]):
                sets[_key(n, "without", k)] = [_wrap(u, u.stack or 0) for u in us if u.origin is not iv]
                sets[_key(n, "alone", k)] = [_wrap(u, u.stack or 0) for u in us if u.origin is iv]
        else:
            sets[_key(n, "alone", 0)] = [_wrap(u, u.stack or 0) for u in us]
    if len(units) > 1:
        sets["composed"] = [
            _wrap(u, 1000 * j + (u.stack or 0), f"{n}/{u.name}") for j, (n, us) in enumerate(units.items()) for u in us
        ]
    return ReftModel(reft.model, sets, cast=reft.cast, move=False, check_finite=reft.check_finite), collects


# ---- the task metric -----------------------------------------------------------------------------------


def _logprob(logits: Tensor, labels: Tensor) -> Tensor:
    target = labels != -100
    lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (lp * target).sum(1) / target.sum(1).clamp(min=1)


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    target = labels != -100
    return ((logits.argmax(-1) == labels) & target).sum(1).float() / target.sum(1).clamp(min=1)


def _metric(metric: Any) -> Callable[[Tensor, Tensor], Tensor]:
    return {"logprob": _logprob, "accuracy": _accuracy}.get(metric, metric) if isinstance(metric, str) else metric


def _metric_of(probe: ReftModel, examples: list, config: str | None, metric: Callable, batch_size: int) -> float:
    """The metric's mean over ``examples`` with the probe's set ``config`` (None: the base model)."""
    total, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = to_batch(probe.model, chunk)
        logits, labels = logits_and_labels(probe, batch, adapters=[config] * len(chunk))
        values = metric(logits, labels)
        if not isinstance(values, Tensor) or tuple(values.shape) != (len(chunk),):
            raise AnalysisError(
                f"metric must return one value per example, a tensor of shape [{len(chunk)}]; got "
                f"{getattr(values, 'shape', type(values).__name__)}."
            )
        total += float(values.float().sum())
        n += len(chunk)
    return total / n


# ---- off-target change ------------------------------------------------------------------------------


def _check_neutral(neutral: Any) -> list[str]:
    if neutral is None:
        return neutral_texts()
    if isinstance(neutral, str) or not isinstance(neutral, (list, tuple)) or not neutral:
        raise AnalysisError(f"neutral must be a non-empty list of strings; got {type(neutral).__name__}.")
    if not all(isinstance(t, str) and t for t in neutral):
        raise AnalysisError("neutral must hold non-empty strings (the texts to measure off-target change on).")
    return list(neutral)


def _off_target(probe: ReftModel, texts: list[str], configs: list[str], batch_size: int) -> list[dict[str, float]]:
    """Per configuration: the mean KL(base ‖ edited) of the next-token distribution over every real
    position of the neutral texts, and the fraction of positions whose top-1 token changed."""
    kl = [0.0] * len(configs)
    changed = [0.0] * len(configs)
    count = 0
    for s in range(0, len(texts), batch_size):
        chunk = texts[s : s + batch_size]
        tokens, mask = probe.tokenize(chunk)
        base = probe(tokens, attention_mask=mask, adapters=[None] * len(chunk)).float().log_softmax(-1)
        real = mask.bool()
        count += int(real.sum())
        for j, config in enumerate(configs):
            edited = probe(tokens, attention_mask=mask, adapters=[config] * len(chunk)).float().log_softmax(-1)
            per = (base.exp() * (base - edited)).sum(-1)
            kl[j] += float(per[real].sum())
            changed[j] += float((base.argmax(-1) != edited.argmax(-1))[real].sum())
    return [{"kl": kl[j] / count, "top1_changed": changed[j] / count} for j in range(len(configs))]


# ---- what it writes ---------------------------------------------------------------------------------


def _rows(u: Unit, collects: dict[tuple[int, int], Collect], layer: int) -> Tensor | None:
    acts = collects[(id(u), layer)].activations
    return torch.cat([a.reshape(-1, a.shape[-1]) for a in acts]) if acts else None


def _directions(model: Any, units: list[Unit], collects: dict, readout: tuple, top_k: int) -> list[dict[str, Any]]:
    out = []
    for u in units:
        affine = getattr(u.phi, "affine", None)
        if affine is None:
            continue
        up, down, shift = (t.detach().float() for t in affine())
        rows = [r for layer in u.layers if (r := _rows(u, collects, layer)) is not None]
        coef = (torch.cat(rows).float() @ down.T + shift).mean(0) if rows else shift
        for k in range(up.shape[1]):
            sign = -1.0 if float(coef[k]) < 0 else 1.0
            promoted, suppressed = top_tokens(model, read_direction(readout, sign * up[:, k]), top_k)
            out.append(
                {
                    "unit": u.name,
                    "index": k,
                    "coefficient": float(coef[k]),
                    "norm": float(up[:, k].norm()),
                    "promoted": promoted,
                    "suppressed": suppressed,
                }
            )
    return out


def _mean_edit(model: Any, units: list[Unit], collects: dict, readout: tuple, top_k: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for u in units:
        if getattr(u.phi, "per_example", False):
            continue  # its edit of a row depends on the row's example, which a collected row no longer knows
        for layer in u.layers:
            h = _rows(u, collects, layer)
            if h is None or not h.shape[0]:
                continue
            delta = (u.phi(h) - h).float().mean(0)
            promoted, suppressed = top_tokens(model, read_direction(readout, delta), top_k)
            out[layer] = {
                "unit": u.name,
                "rows": int(h.shape[0]),
                "norm": float(delta.norm()),
                "relative_norm": float(delta.norm() / h.float().norm(dim=-1).mean().clamp(min=1e-12)),
                "promoted": promoted,
                "suppressed": suppressed,
            }
    return out


def _iia(model: Any, units: list[Unit], pairs: Sequence[dict]) -> float | None:
    """Interchange intervention accuracy of the subspace ``units`` write (a DII on the span of their
    affine ``up`` columns, at their sites); None for a Φ without an affine form."""
    from reftlens.analysis.das import iia
    from reftlens.interventions.subspace import DII

    ivs = []
    for u in units:
        affine = getattr(u.phi, "affine", None)
        if affine is None:
            return None
        up = affine()[0].detach().float()
        q = torch.linalg.qr(up).Q  # an orthonormal basis of the written span, [d, r]
        dii = DII(q.shape[0], q.shape[1]).to(up.device)
        dii.R.set_(q.T.contiguous())
        ivs.append(Intervention(dii, layers=list(u.layers), positions=u.positions, hook=u.hook, name=f"iia {u.name}"))
    try:
        return iia(ReftModel(model, ivs), list(pairs))
    except (KeyError, TypeError, ValueError) as e:
        raise AnalysisError(f"counterfactuals: {e}") from None


def _angles(units: dict[str | None, list[Unit]]) -> list[dict[str, Any]]:
    """Principal angles between two sets' written subspaces at each (hook, layer) both edit."""
    spaces: dict[str | None, dict[tuple[str, int], list[Tensor]]] = {}
    for n, us in units.items():
        for u in us:
            affine = getattr(u.phi, "affine", None)
            if affine is None:
                continue
            up = affine()[0].detach().float()
            for layer in u.layers:
                spaces.setdefault(n, {}).setdefault((u.hook, layer), []).append(up.T)
    out = []
    names = list(units)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for site in sorted(set(spaces.get(a, {})) & set(spaces.get(b, {}))):
                ua, ub = torch.cat(spaces[a][site]), torch.cat(spaces[b][site])
                deg = torch.rad2deg(principal_angles(ua, ub)).tolist()
                out.append({"sets": [a, b], "hook": site[0], "layer": site[1], "degrees": [round(x, 4) for x in deg]})
    return out


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x
