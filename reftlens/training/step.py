"""One optimizer step, the same for a plain set and a bank: a plain set is a bank of one.

Each set of the step (a plain set is one set, named None) takes its own micro-batches; they run
side by side in one forward per micro-batch, each row with its own set. Each set's loss is its
objective's sum over its rows divided by its own count over the whole step (its completion tokens
for the LM loss), its penalty is averaged over its own micro-batches, and its gradient is clipped
on its own: so every set gets exactly the update it would get trained alone. On ``world``
data-parallel processes each runs its share of every micro-batch, and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from reftlens.errors import TrainingError
from reftlens.training.data import Batch, Example, collate
from reftlens.training.objectives import LanguageModeling, Objective

if TYPE_CHECKING:
    from reftlens.model import ReftModel


def train_step(
    module: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    examples: Sequence[Example],
    group: Sequence[Sequence[int]],
    *,
    step: int,
    epoch: int = 0,
    autocast: Any = None,
    max_grad_norm: float | None = None,
    set_epochs: dict[str, int] | None = None,
    objective: Objective | None = None,
    intervene_on: str = "prompt",
) -> dict[str, Any]:
    """One optimizer step over ``group``, the step's micro-batches (indices into ``examples``).

    ``set_epochs``: a bank's sets that train at this step, each with its epoch (None: a plain set
    at ``epoch``). The loss of each set is the objective's mean over that set's part of the whole
    group on all processes (for the LM loss: over its target tokens), plus its Φs' penalties,
    each micro-batch's weighted by its share of the set's examples in the step (so accumulation
    and processes change nothing where every example edits as many positions). Returns the step's
    record (``step`` counts from 1); a bank's record holds each set's own record under ``"sets"``,
    and its ``loss`` is their mean."""
    world, rank = world_rank()
    reft = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    autocast = contextlib.nullcontext() if autocast is None else autocast
    objective = objective if objective is not None else LanguageModeling()
    epochs: dict[str | None, int] = dict(set_epochs) if set_epochs is not None else {None: epoch}
    names = list(epochs)
    slot = {name: k for k, name in enumerate(names)}
    counts = [0] * len(names)  # what each set's loss averages over
    n_rows = [0] * len(names)  # each set's examples in the step, on all processes
    for ids in group:
        for i in ids:
            n_rows[slot[_set_of(examples[i], slot)]] += 1
            counts[slot[examples[i].adapter]] += objective.count(examples[i])
    scale = torch.tensor([world / max(c, 1) for c in counts], device=reft.device)
    phis = set_phis(reft, names)
    pad = reft.pad_token_id
    loss_sums = torch.zeros(len(names), device=reft.device)
    penalty_sums = [0.0] * len(names)
    for ps in phis.values():
        penalties(ps)  # start from no pending penalty terms
    for j, ids in enumerate(group):
        share = math.ceil(len(ids) / world)  # a short last batch is split evenly across processes
        local = ids[rank * share : (rank + 1) * share]
        # every process must run forward and backward (DDP all-reduces inside backward):
        # one left without examples runs one with weight zero
        weight = 1.0 if local else 0.0
        micro = [examples[i] for i in local or ids[:1]]
        which = torch.tensor([slot[e.adapter] for e in micro], device=reft.device)
        sync = module.no_sync() if world > 1 and j < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                per_row = weight * objective.losses(module, micro, pad, reft.device, intervene_on)
            backward = (per_row * scale[which]).sum()
            for k, name in enumerate(names):
                penalty = penalties(phis[name])
                if penalty is not None:  # a micro-batch's term weighs as its share of the set's rows
                    share = weight * int((which == k).sum()) / max(n_rows[k], 1)
                    backward = backward + world * share * penalty  # DDP averages over the processes
                    penalty_sums[k] += share * float(penalty.detach())
            backward.backward()
        loss_sums.index_add_(0, which, per_row.detach().to(loss_sums.dtype))
    if world > 1:
        torch.distributed.all_reduce(loss_sums)
        summed = torch.tensor(penalty_sums, device=reft.device, dtype=torch.float64)
        torch.distributed.all_reduce(summed)
        penalty_sums = summed.tolist()
    losses = [s / max(c, 1) for s, c in zip(loss_sums.tolist(), counts)]
    for k, name in enumerate(names):
        if not math.isfinite(losses[k]):
            rows = next([examples[i] for i in ids if examples[i].adapter == name] for ids in group if ids)
            why = diagnose(reft, collate(rows, pad).to(reft.device), step, epochs[name], losses[k])
            raise TrainingError(why if name is None else f"set {name!r}: {why}")
    lrs = scheduler.get_last_lr()
    first_group: dict[str | None, int] = {}
    for k, g in enumerate(optimizer.param_groups):
        first_group.setdefault(g.get("set"), k)
    if max_grad_norm is not None:  # each set's gradient on its own
        for name in names:
            params = [p for g in optimizer.param_groups if g.get("set") == name for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    records = {}
    for k, name in enumerate(names):
        lr = lrs[first_group.get(name, 0)]
        records[name] = {"step": step + 1, "epoch": epochs[name], "loss": losses[k], "lr": lr, "tokens": counts[k]}
        if penalty_sums[k]:
            records[name]["penalty"] = penalty_sums[k]
    if names == [None]:
        record = records[None]
    else:
        record = {
            "step": step + 1,
            "epoch": max(epochs.values()),
            "loss": sum(losses) / len(losses),
            "lr": lrs[0],
            "tokens": sum(counts),
            "sets": records,
        }
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return record


def _set_of(example: Example, slot: dict[str | None, int]) -> str | None:
    if example.adapter not in slot:
        raise TrainingError(
            f"an example of set {example.adapter!r} is in this step's batches, but that set does not train at "
            f"this step (the sets training are {list(slot)})."
        )
    return example.adapter


def set_phis(reft: "ReftModel", names: Sequence[str | None] | None = None) -> dict[str | None, list[torch.nn.Module]]:
    """Each set's Φs, as bound (an untied set's per-layer copies): a plain set's under None."""
    if reft.bank is None:
        return {None: list(reft.phis)}
    out: dict[str | None, list[torch.nn.Module]] = {}
    for name in reft.adapters if names is None else names:
        out[name] = list({id(u.phi): u.phi for u in reft.units if u.adapter == name}.values())
    return out


def penalties(phis: Sequence[torch.nn.Module]) -> Tensor | None:
    """The sum of the Φs' ``penalty()`` terms since their last call (None when no Φ has one)."""
    terms = [t for phi in phis if callable(getattr(phi, "penalty", None)) for t in [phi.penalty()] if t is not None]
    return torch.stack(terms).sum() if terms else None


def schedule_fn(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier at each step: linear warmup, then constant, linear or cosine decay."""
    if kind not in ("constant", "linear", "cosine"):
        raise TrainingError(f"schedule must be 'constant', 'linear' or 'cosine'; got {kind!r}.")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def world_rank() -> tuple[int, int]:
    """The number of data-parallel processes and this one's rank (1, 0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def diagnose(reft: "ReftModel", batch: Batch, step: int, epoch: int, loss: float) -> str:
    """Name the intervention that first produced a non-finite value."""
    where = f"loss is {loss} at step {step + 1} (epoch {epoch})"
    for u in reft.units:
        bad = [n for n, p in u.phi.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            return f"{where}: intervention {u.name!r} has non-finite parameters {bad}. Lower lr or set max_grad_norm."
    first: list[str] = []

    def check(site: Any) -> Callable:
        def fn(h: Tensor, hook: Any = None) -> None:
            if not first and not torch.isfinite(h).all():
                first.append(f"intervention {site.unit.name!r} at {site.hook_name}")

        return fn

    from reftlens.runtime.tl_backend import execute

    plan = reft.plan(
        batch.tokens,
        batch.sources,
        attention_mask=batch.attention_mask,
        source_attention_mask=batch.source_mask,
        prompt_mask=batch.prompt_mask,
        adapters=batch.adapters,
    )
    with torch.no_grad():
        execute(reft.model, plan, reft.cast, extra=[(p.site.hook_point, check(p.site)) for p in plan.sites])
    if first:
        return f"{where}: {first[0]} produced non-finite hidden states. Lower lr or set max_grad_norm."
    return f"{where}: the base model's own outputs are non-finite for this batch (no intervention produced them)."
