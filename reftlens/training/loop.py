"""The training loop: a plain loop over a frozen model where only the Φs learn.

Read it top to bottom; copy it into a notebook and change what you need. :func:`train` is the
recipe: it checks the options, sets up the data, the optimizer and scheduler, the checkpoint to
resume from, the model (wrapped for data parallelism) and the precision, then runs
:func:`train_step` until the last step, with :func:`evaluate` and :func:`save_checkpoint` on the
way. The pieces follow in the order the recipe calls them.

One optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples on each of
``world`` processes; the loss is the mean over every completion token of that global batch, so
one process, gradient accumulation and data-parallel processes give the same updates.

A bank trains all its sets in one run: each example names its set (``"adapter"``), each set takes
its own batches (its own order, epochs, schedule and clipping, a parameter group of its own), the
step runs the sets' batches side by side in one forward, and each set's loss is the mean over its
own completion tokens. So every set gets exactly the updates it would get trained alone.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import platform
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reftlens.errors import TrainingError
from reftlens.runtime.hf_backend import INTERVENE_ON
from reftlens.saving import check_save_target
from reftlens.training.data import Batch, Example, batch_order, collate, encode
from reftlens.training.objectives import LanguageModeling, Objective, objective_for, penalties

if TYPE_CHECKING:
    from reftlens.model import ReftModel


class EmulatedBF16Warning(UserWarning):
    """``precision="bf16"`` on a CPU without native bfloat16: the run trains in fp32 instead."""


@dataclass
class History:
    """What happened: one record per optimizer step, one per evaluation."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]

    def adapter(self, name: str) -> "History":
        """One bank set's history: its own records, as a run of that set alone would write them."""
        return History(
            [r["sets"][name] for r in self.steps if name in r.get("sets", {})],
            [{"step": r["step"], **r["sets"][name]} for r in self.evals if name in r.get("sets", {})],
        )


PRECISIONS = ("fp32", "bf16", "bf16-force")
STATE_FILE = "trainer_state.json"  # marks a checkpoint folder: the one kind a checkpoint may replace


@dataclass
class TrainConfig:
    """The options of :func:`train` (see there), checked when built."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-3
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    max_length: int = 512
    seed: int = 0
    precision: str = "fp32"
    group_by_length: bool = True
    chat_template: bool = False
    prepend_bos: bool | None = None
    task: str = "lm"
    label_names: Sequence[str] | None = None
    objective: str | Objective = "lm"
    intervene_on: str = "prompt"
    eval_every: int | None = None
    progress: bool = True
    checkpoint_dir: str | os.PathLike | None = None
    checkpoint_every: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.task not in ("lm", "classification"):
            raise TrainingError(f"task must be 'lm' or 'classification'; got {self.task!r}.")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be 'fp32', 'bf16' or 'bf16-force'; got {self.precision!r}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError(
                f"batch_size and grad_accum must be positive; got {self.batch_size} and {self.grad_accum}."
            )
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise TrainingError("checkpoint_every and resume need checkpoint_dir=.")
        schedule_fn(self.schedule, self.warmup_steps, 1)  # names a bad schedule before any work
        if self.intervene_on not in INTERVENE_ON:
            raise TrainingError(f"intervene_on must be one of {INTERVENE_ON}; got {self.intervene_on!r}.")
        self.objective = objective_for(self.objective)
        if self.task == "classification" and not isinstance(self.objective, LanguageModeling):
            raise TrainingError(
                f"task='classification' trains with the LM loss on the label; objective="
                f"{self.objective.name!r} needs task='lm'."
            )


# ---- the recipe ---------------------------------------------------------------------------------


def train(
    reft: "ReftModel",
    data: Any,
    *,
    eval_data: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 4e-3,
    weight_decay: float = 0.0,
    schedule: str = "linear",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    max_length: int = 512,
    seed: int = 0,
    precision: str = "fp32",
    group_by_length: bool = True,
    chat_template: bool = False,
    prepend_bos: bool | None = None,
    task: str = "lm",
    label_names: Sequence[str] | None = None,
    objective: str | Objective = "lm",
    intervene_on: str = "prompt",
    eval_every: int | None = None,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
) -> History:
    """Train the Φs of ``reft`` on ``data`` and return the :class:`History`.

    ``data``: dicts (or a ``datasets.Dataset``) with ``prompt`` and ``completion``; for
    ``task="classification"``, ``prompt`` and ``label`` (the loss is on the label's tokens and
    accuracy picks the best-scoring label among ``label_names``). Empty ``data`` or ``eval_data``
    is an error. Each prompt gets the model's start token (``prepend_bos=None``; ``True`` /
    ``False`` override) unless it already starts with one, as a prompt formatted by the chat
    template (``chat_template=True``) does: the rule of :meth:`reftlens.ReftModel.tokenize`,
    so training sees the tokens ``reft(...)`` and ``reft.generate`` see.
    ``objective``: ``"lm"`` (the completion tokens' cross-entropy) or ``"preference"``
    (steering toward ``completion`` and away from ``rejected`` with +α and −α, RePS-style; see
    :class:`~reftlens.training.objectives.Preference`), or an ``Objective`` instance. Φs with a
    ``penalty()`` (ReFT-r1's L1) add it to the loss. ``intervene_on`` says which tokens the
    positions are resolved against, as in generation: ``"prompt"`` (the ReFT paper's setting),
    ``"all"`` (prompt and completion: steering that also edits what the model writes) or
    ``"generated"`` (the completion only). ``precision="bf16"`` runs the forward under bfloat16 autocast; on a CPU without
    native bfloat16 it trains in fp32 and warns once (:class:`EmulatedBF16Warning`), and
    ``precision="bf16-force"`` uses autocast anyway. A bank (``ReftModel(model, {name: set})``)
    trains every set at once on examples that carry ``"adapter": name``, each exactly as if alone;
    ``history.adapter(name)`` is one set's history. ``checkpoint_dir`` + ``checkpoint_every``
    save the full training state every so many steps; ``resume=True`` continues from it and ends
    where an uninterrupted run would. ``checkpoint_dir`` must be new, an empty folder or an
    earlier checkpoint (it holds ``trainer_state.json``), else a
    :class:`~reftlens.errors.SaveError` is raised before training starts. ``callback(record)`` sees every step and evaluation record.

    >>> history = reftlens.train(reft, [{"prompt": "2+2=", "completion": "4"}], max_steps=10)  # doctest: +SKIP
    """
    cfg = TrainConfig(
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_steps=warmup_steps,
        max_grad_norm=max_grad_norm,
        max_length=max_length,
        seed=seed,
        precision=precision,
        group_by_length=group_by_length,
        chat_template=chat_template,
        prepend_bos=prepend_bos,
        task=task,
        label_names=label_names,
        objective=objective,
        intervene_on=intervene_on,
        eval_every=eval_every,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    if cfg.checkpoint_dir is not None and cfg.checkpoint_every:  # refuse a foreign folder before any work
        check_save_target(cfg.checkpoint_dir, markers=[STATE_FILE])
    world, rank = _dist()
    examples, eval_examples, label_names = _setup_data(reft, data, eval_data, cfg)
    steps_per_epoch, total = _count_steps(len(examples), cfg, world)
    by_set = _bank_schedule(reft, examples, cfg, world)
    if by_set is not None:
        total = max(n for _, _, n in by_set.values())
    torch.manual_seed(cfg.seed)
    cfg.objective.setup(reft, examples, world)
    optimizer, scheduler = _setup_optimizer(reft, cfg, total, by_set)
    step, history = _setup_resume(reft, cfg, optimizer, scheduler)
    module = _setup_model(reft, world)
    autocast = _setup_precision(cfg.precision, reft.device)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None

    bar = _progress(total, step, enabled=cfg.progress and rank == 0)
    reft.train()
    try:
        while step < total:
            if by_set is None:
                epoch, group = _step_batches(examples, cfg, world, step, steps_per_epoch)
                set_epochs = None
            else:
                set_epochs, group = _bank_step_batches(examples, by_set, cfg, world, step)
                epoch = max(set_epochs.values())
            record = train_step(
                module,
                optimizer,
                scheduler,
                examples,
                group,
                step=step,
                epoch=epoch,
                autocast=autocast,
                max_grad_norm=cfg.max_grad_norm,
                set_epochs=set_epochs,
                objective=cfg.objective,
                intervene_on=cfg.intervene_on,
            )
            step += 1
            history.steps.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if callback is not None:
                callback(record)
            if eval_examples is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                _record_eval(reft, eval_examples, cfg, label_names, step, history, callback)
                reft.train()
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and rank == 0:
                save_checkpoint(ckpt, reft, optimizer, scheduler, step, history)
        if eval_examples is not None:
            _record_eval(reft, eval_examples, cfg, label_names, step, history, callback)
    finally:
        bar.close()
        reft.eval()
    # the settings each trained set was trained with travel with it (saved, applied when it runs)
    reft.sets.record(
        {e.adapter for e in examples},
        intervene_on=cfg.intervene_on,
        chat_template=cfg.chat_template,
        prepend_bos=cfg.prepend_bos,
    )
    return history


# ---- setup ---------------------------------------------------------------------------------------


def _setup_data(
    reft: "ReftModel", data: Any, eval_data: Any, cfg: TrainConfig
) -> tuple[list[Example], list[Example] | None, Sequence[str] | None]:
    """Tokenized training and evaluation examples, and the label names of a classification task."""
    model, label_names = reft.model, cfg.label_names
    train_rows = _rows(data)
    if not train_rows:
        raise TrainingError(
            "data is empty: there is nothing to train on. Pass a list of "
            "{'prompt': ..., 'completion': ...} dicts ({'prompt': ..., 'label': ...} with "
            "task='classification'), or a datasets.Dataset with those columns."
        )
    if cfg.task == "classification" and label_names is None:
        label_names = sorted({str(r["label"]) for r in train_rows})
    names = label_names if cfg.task == "classification" else None
    examples = encode(
        model,
        train_rows,
        max_length=cfg.max_length,
        chat_template=cfg.chat_template,
        label_names=names,
        prepend_bos=cfg.prepend_bos,
    )
    eval_examples = None
    if eval_data is not None:
        eval_rows = _rows(eval_data)
        if not eval_rows:
            raise TrainingError(
                "eval_data is empty: there is nothing to evaluate on. Pass examples of the "
                "same form as data, or leave eval_data=None to skip evaluation."
            )
        eval_examples = encode(
            model,
            eval_rows,
            max_length=cfg.max_length,
            chat_template=cfg.chat_template,
            label_names=names,
            prepend_bos=cfg.prepend_bos,
        )
    for what, exs in (("data", examples), ("eval_data", eval_examples or [])):
        _check_adapters(reft, exs, what)
    return examples, eval_examples, label_names


def _check_adapters(reft: "ReftModel", examples: Sequence[Example], what: str) -> None:
    """A bank's examples each name one of its sets; a plain set's examples name none."""
    for i, e in enumerate(examples):
        if reft.bank is None and e.adapter is not None:
            raise TrainingError(
                f"{what} example {i} names the set {e.adapter!r} ('adapter'), but this ReftModel holds "
                "one set. Build a bank, ReftModel(model, {name: [...], ...}), to train several sets."
            )
        if reft.bank is not None and e.adapter not in reft.bank:
            raise TrainingError(
                f"{what} example {i} has adapter {e.adapter!r}, which is not a set of this bank ({reft.adapters}); each "
                "example of a bank's training data names the set it trains: {'prompt': ..., 'completion': ..., "
                "'adapter': name}."
            )


def _bank_schedule(
    reft: "ReftModel", examples: Sequence[Example], cfg: TrainConfig, world: int
) -> dict[str, tuple[list[int], int, int]] | None:
    """A bank's sets with examples → (their example indices, steps per epoch, total steps), each
    counted as a run of that set alone would count them (None for a plain set)."""
    if reft.bank is None:
        return None
    out = {}
    for name in reft.adapters:
        idx = [i for i, e in enumerate(examples) if e.adapter == name]
        if idx:
            out[name] = (idx, *_count_steps(len(idx), cfg, world))
    return out


def _count_steps(n_examples: int, cfg: TrainConfig, world: int) -> tuple[int, int]:
    """Optimizer steps per epoch, and in the whole run."""
    micro_per_epoch = math.ceil(n_examples / (cfg.batch_size * world))
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    return steps_per_epoch, total


def _setup_optimizer(
    reft: "ReftModel", cfg: TrainConfig, total: int, by_set: dict[str, tuple[list[int], int, int]] | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable Φ parameters, and the learning-rate schedule over ``total`` steps.
    A bank gets one parameter group per set with examples, each with its own schedule."""
    params = [p for p in reft.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("no trainable Φ parameters: every intervention in this set is fixed.")
    if by_set is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(cfg.schedule, cfg.warmup_steps, total))
        return optimizer, scheduler
    groups, owner = [], {}
    for name in by_set:
        mine = list(
            {id(p): p for u in reft.units if u.adapter == name for p in u.phi.parameters() if p.requires_grad}.values()
        )
        for p in mine:
            if owner.setdefault(id(p), name) != name:
                raise TrainingError(
                    f"sets {owner[id(p)]!r} and {name!r} share a Φ parameter; a bank trains each set "
                    "apart, so give each set its own Φs."
                )
        if mine:
            groups.append({"params": mine, "set": name})
    if not groups:
        raise TrainingError("no trainable Φ parameters in the sets the examples name.")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lambdas = [schedule_fn(cfg.schedule, cfg.warmup_steps, by_set[g["set"]][2]) for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _setup_resume(
    reft: "ReftModel", cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, History]:
    """The step to start from and the history so far: from the checkpoint with ``resume=True``."""
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    if cfg.resume and ckpt is not None and (ckpt / STATE_FILE).is_file():
        return load_checkpoint(ckpt, reft, optimizer, scheduler)
    return 0, History()


def _setup_model(reft: "ReftModel", world: int) -> Any:
    """The module to run: ``reft``, or its ``DistributedDataParallel`` wrapper on several processes."""
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(reft)
    return reft


def _setup_precision(precision: str, device: torch.device) -> Any:
    """The context each forward runs in: nothing (fp32) or bfloat16 autocast.

    ``"bf16"`` on a CPU without native bfloat16 would be emulated, up to tens of times slower
    than fp32 (38x reported on an AVX2 AMD EPYC), so it falls back to fp32 and warns once;
    ``"bf16-force"`` does not ask the CPU."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16" and device.type == "cpu":
        native, capability = cpu_bf16_support()
        if not native:
            _warn_emulated_bf16(capability)
            return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


_NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # x86 AVX512-BF16 / AMX-BF16, Arm BF16 / SVE-BF16


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and torch's name for its vector capability
    (``torch.backends.cpu.get_cpu_capability()``: ``"AVX2"``, ``"AVX512"``, ...).

    Native means AVX512-BF16 or AMX-BF16 on x86, BF16 or SVE-BF16 on Arm, as
    ``torch.cpu.get_capabilities()`` reports them. A torch without that function is asked for
    AVX512-BF16 and AMX on x86; elsewhere it cannot tell, and bfloat16 is taken as native."""
    capability = torch.backends.cpu.get_cpu_capability()
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        flags = get_capabilities()
        return any(bool(flags.get(f, False)) for f in _NATIVE_BF16), capability
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("x86_64", "amd64") and all(probes):
        return any(p() for p in probes), capability
    return True, capability


_warned_bf16 = False


def _warn_emulated_bf16(capability: str) -> None:
    global _warned_bf16
    if _warned_bf16:
        return
    _warned_bf16 = True
    warnings.warn(
        f"precision='bf16', but this CPU (torch capability {capability!r}) has no native bfloat16 "
        "(no AVX512-BF16 or AMX-BF16): bf16 would be emulated, up to tens of times slower than fp32, "
        "so training runs in fp32. Pass precision='bf16-force' to use bf16 autocast anyway.",
        EmulatedBF16Warning,
        stacklevel=4,
    )


def _step_batches(
    examples: Sequence[Example], cfg: TrainConfig, world: int, step: int, steps_per_epoch: int
) -> tuple[int, list[list[int]]]:
    """The epoch of optimizer step ``step`` and its ``grad_accum`` global batches (example indices).
    The order depends only on (seed, epoch), so a resumed run sees the batches it would have seen."""
    epoch, k = divmod(step, steps_per_epoch)
    order = batch_order(
        examples, cfg.batch_size * world, seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length
    )
    return epoch, order[k * cfg.grad_accum : (k + 1) * cfg.grad_accum]


def _bank_step_batches(
    examples: Sequence[Example], by_set: dict[str, tuple[list[int], int, int]], cfg: TrainConfig, world: int, step: int
) -> tuple[dict[str, int], list[list[int]]]:
    """Each set's epoch at step ``step`` and the step's micro-batches: micro-batch j holds every
    set's own micro-batch j, side by side (sets whose run has ended take none)."""
    epochs, group = {}, []
    for name, (idx, per_epoch, total) in by_set.items():
        if step >= total:
            continue
        epochs[name], mine = _step_batches([examples[i] for i in idx], cfg, world, step, per_epoch)
        for j, ids in enumerate(mine):
            if j == len(group):
                group.append([])
            group[j] += [idx[i] for i in ids]
    return epochs, group


# ---- one optimizer step --------------------------------------------------------------------------


def train_step(
    module: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    examples: Sequence[Example],
    group: Sequence[Sequence[int]],
    *,
    step: int,
    epoch: int,
    autocast: Any = None,
    max_grad_norm: float | None = None,
    set_epochs: dict[str, int] | None = None,
    objective: Objective | None = None,
    intervene_on: str = "prompt",
) -> dict[str, Any]:
    """One optimizer step over ``group``, the step's micro-batches (indices into ``examples``).

    Each process runs its share of every micro-batch; the loss is the objective's mean over the
    whole group on all processes (for the LM loss: over its target tokens), plus the Φs' penalties
    averaged over the micro-batches. Returns the step's record (``step`` counts from 1). For a bank
    (``set_epochs``: each training set's epoch) see :func:`_bank_step`."""
    world, rank = _dist()
    reft = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    autocast = contextlib.nullcontext() if autocast is None else autocast
    objective = objective if objective is not None else LanguageModeling()
    if set_epochs is not None:
        if not isinstance(objective, LanguageModeling) or intervene_on != "prompt":
            raise TrainingError(
                "a bank trains with the LM loss on prompt positions (objective='lm', "
                "intervene_on='prompt'); train other objectives one set at a time."
            )
        return _bank_step(
            module, reft, optimizer, scheduler, examples, group, step, set_epochs, autocast, max_grad_norm
        )
    pad = reft.pad_token_id
    n_tokens = sum(objective.count(examples[i]) for ids in group for i in ids)  # what the loss averages over
    loss_sum = torch.zeros((), device=reft.device)
    penalty_sum = 0.0
    penalties(reft)  # start from no pending penalty terms
    for j, ids in enumerate(group):
        share = math.ceil(len(ids) / world)  # a short last batch is split evenly across processes
        local = ids[rank * share : (rank + 1) * share]
        # every process must run forward and backward (DDP all-reduces inside backward):
        # one left without examples runs one with weight zero
        weight = 1.0 if local else 0.0
        micro = [examples[i] for i in local or ids[:1]]
        sync = module.no_sync() if world > 1 and j < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                total_loss = weight * objective.loss(module, micro, pad, reft.device, intervene_on)
            backward = total_loss * world / max(n_tokens, 1)
            penalty = penalties(reft)
            if penalty is not None:
                backward = backward + weight * penalty / len(group)
                penalty_sum += float(penalty.detach()) / len(group)
            backward.backward()
        loss_sum += total_loss.detach()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    loss = (loss_sum / max(n_tokens, 1)).item()
    if not math.isfinite(loss):
        raise TrainingError(
            _diagnose(reft, collate([examples[i] for i in group[0]], pad).to(reft.device), step, epoch, loss)
        )
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    record = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": n_tokens}
    if penalty_sum:
        record["penalty"] = penalty_sum
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return record


def _bank_step(
    module: Any,
    reft: "ReftModel",
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    examples: Sequence[Example],
    group: Sequence[Sequence[int]],
    step: int,
    set_epochs: dict[str, int],
    autocast: Any,
    max_grad_norm: float | None,
) -> dict[str, Any]:
    """One optimizer step of a bank: every set's micro-batches side by side in one forward, each
    set's loss the mean over its own target tokens (so its gradient is that of its run alone),
    each set's gradient clipped on its own. The record holds each set's record under ``sets``."""
    world, rank = _dist()
    pad = reft.pad_token_id
    names = list(set_epochs)
    slot = {name: k for k, name in enumerate(names)}
    n_tokens = torch.zeros(len(names))
    for ids in group:
        for i in ids:
            n_tokens[slot[examples[i].adapter]] += len(examples[i].completion)
    loss_sums = torch.zeros(len(names), device=reft.device)
    for j, ids in enumerate(group):
        share = math.ceil(len(ids) / world)
        local = ids[rank * share : (rank + 1) * share]
        weight = 1.0 if local else 0.0
        rows = local or ids[:1]
        batch = collate([examples[i] for i in rows], pad).to(reft.device)
        which = torch.tensor([slot[examples[i].adapter] for i in rows], device=reft.device)
        sync = module.no_sync() if world > 1 and j < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                logits, labels = forward(module, batch)
            per_row = weight * row_losses(logits, labels)
            scale = world / n_tokens.to(reft.device).clamp(min=1)[which]
            (per_row * scale).sum().backward()
        loss_sums.index_add_(0, which, per_row.detach())
    if world > 1:
        torch.distributed.all_reduce(loss_sums)
    losses = (loss_sums.cpu() / n_tokens.clamp(min=1)).tolist()
    if not all(math.isfinite(v) for v in losses):
        bad = names[next(k for k, v in enumerate(losses) if not math.isfinite(v))]
        rows = [i for ids in group for i in ids if examples[i].adapter == bad]
        raise TrainingError(
            f"set {bad!r}: "
            + _diagnose(
                reft,
                collate([examples[i] for i in rows], pad).to(reft.device),
                step,
                set_epochs[bad],
                losses[slot[bad]],
            )
        )
    lrs = scheduler.get_last_lr()
    by_group = {g["set"]: k for k, g in enumerate(optimizer.param_groups)}
    if max_grad_norm is not None:
        for g in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(g["params"], max_grad_norm)
    sets = {
        name: {
            "step": step + 1,
            "epoch": set_epochs[name],
            "loss": losses[k],
            "lr": lrs[by_group[name]],
            "tokens": int(n_tokens[k]),
        }
        for k, name in enumerate(names)
    }
    record = {
        "step": step + 1,
        "epoch": max(set_epochs.values()),
        "loss": sum(losses) / len(losses),
        "lr": lrs[0],
        "tokens": int(n_tokens.sum()),
        "sets": sets,
    }
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return record


# ---- evaluation ----------------------------------------------------------------------------------


def _record_eval(
    reft: "ReftModel",
    examples: list[Example],
    cfg: TrainConfig,
    label_names: Sequence[str] | None,
    step: int,
    history: History,
    callback: Callable | None,
) -> None:
    metrics = evaluate(
        reft, examples, batch_size=cfg.batch_size, task=cfg.task, label_names=label_names, intervene_on=cfg.intervene_on
    )
    record = {"step": step, **metrics}
    history.evals.append(record)
    if callback is not None:
        callback({"eval": True, **record})


@torch.no_grad()
def evaluate(
    reft: "ReftModel",
    examples: list[Example],
    *,
    batch_size: int = 8,
    task: str = "lm",
    label_names: Sequence[str] | None = None,
    intervene_on: str = "prompt",
) -> dict[str, Any]:
    """Mean completion-token loss, and accuracy: per completion token (``lm``) or per example
    (``classification``: the label whose tokens score highest given the prompt). ``intervene_on``
    as in :func:`train`. A bank's examples run with their own sets, and each set's metrics are
    under ``"sets"``."""
    if not examples:
        raise TrainingError("evaluate got no examples: pass at least one encoded example.")
    was_training = reft.training
    reft.eval()
    pad = reft.pad_token_id
    # per set (None: a plain set): [loss sum, target tokens, correct tokens, correct examples, examples]
    sums: dict[str | None, list[float]] = {}
    cands = [tuple(reft.model.tokenizer(n, add_special_tokens=False)["input_ids"]) for n in (label_names or [])]
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        batch = collate(chunk, pad).to(reft.device)
        logits, labels = forward(reft, batch, intervene_on)
        target = labels != -100
        losses = row_losses(logits, labels).tolist()
        n_tok = target.sum(1).tolist()
        correct_tok = ((logits.argmax(-1) == labels) & target).sum(1).tolist()
        correct_ex = [0] * len(chunk)
        if task == "classification":
            scores = (
                _score_first_tokens(reft, chunk, cands, pad)
                if all(len(c) == 1 for c in cands)
                else torch.stack([_score(reft, chunk, c, pad) for c in cands], 1)
            )
            correct_ex = (scores.argmax(1).cpu() == torch.tensor([e.label for e in chunk])).int().tolist()
        for k, e in enumerate(chunk):
            acc = sums.setdefault(e.adapter, [0.0, 0, 0, 0, 0])
            for f, v in enumerate((losses[k], n_tok[k], correct_tok[k], correct_ex[k], 1)):
                acc[f] += v
    reft.train(was_training)

    def metrics(loss: float, n_tok: float, correct_tok: float, correct_ex: float, n_ex: float) -> dict[str, float]:
        acc = correct_ex / n_ex if task == "classification" else correct_tok / max(n_tok, 1)
        return {"loss": loss / max(n_tok, 1), "accuracy": acc}

    out: dict[str, Any] = metrics(*(sum(v[f] for v in sums.values()) for f in range(5)))
    if reft.bank is not None:
        out["sets"] = {name: metrics(*v) for name, v in sums.items() if name is not None}
    return out


def _score_first_tokens(
    reft: "ReftModel", chunk: Sequence[Example], cands: Sequence[tuple[int, ...]], pad: int
) -> Tensor:
    """``_score`` for every one-token label at once: the logits after the prompt score them all
    (causal attention: they do not depend on which label follows), so one forward, not one per label."""
    batch = collate([Example(e.prompt, cands[0], adapter=e.adapter) for e in chunk], pad).to(reft.device)
    logits, labels = forward(reft, batch)
    at = (labels != -100).float().argmax(1)  # each row's one target position
    logp = logits[torch.arange(len(chunk), device=logits.device), at].float().log_softmax(-1)
    return logp[:, [c[0] for c in cands]]


def _score(reft: "ReftModel", chunk: Sequence[Example], completion: tuple[int, ...], pad: int) -> Tensor:
    """Sum of log-probabilities of ``completion`` after each example's prompt."""
    batch = collate([Example(e.prompt, completion, adapter=e.adapter) for e in chunk], pad).to(reft.device)
    logits, labels = forward(reft, batch)
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != -100)).sum(1)


# ---- checkpoints: safetensors + JSON, written atomically -------------------------------------


def save_checkpoint(
    folder: Path, reft: "ReftModel", optimizer: torch.optim.Optimizer, scheduler: Any, step: int, history: History
) -> None:
    """Write the whole training state (Φs, optimizer, scheduler, RNG, history) to ``folder``, atomically.
    ``folder`` must be new, empty or an earlier checkpoint (it holds ``trainer_state.json``)."""
    from safetensors.torch import save_file

    from reftlens.saving import atomic_dir, write, write_bank

    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}

    def write_all(tmp: Path) -> None:
        (tmp / "reft").mkdir()
        (write if reft.bank is None else write_bank)(reft, tmp / "reft")
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"step": step, "param_groups": state["param_groups"], "scheduler": sched, "history": asdict(history)}
        (tmp / STATE_FILE).write_text(json.dumps(meta))

    atomic_dir(folder, write_all, markers=[STATE_FILE])


def load_checkpoint(
    folder: Path, reft: "ReftModel", optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, History]:
    from safetensors.torch import load_file

    from reftlens.saving import load

    saved_set, _ = load(folder / "reft", reft.model, cast=reft.cast)
    if isinstance(saved_set, dict):  # a bank: its sets in order, as reft.phis holds them
        if list(saved_set) != reft.adapters:
            raise TrainingError(
                f"checkpoint {folder} holds the sets {list(saved_set)} but this bank has {reft.adapters}."
            )
        saved_set = [iv for ivs in saved_set.values() for iv in ivs]
    saved_phis = list({id(iv.phi): iv.phi for iv in saved_set}.values())
    if len(saved_phis) != len(reft.phis):
        raise TrainingError(f"checkpoint {folder} holds {len(saved_phis)} Φs but this set has {len(reft.phis)}.")
    with torch.no_grad():
        for mine, saved in zip(reft.phis, saved_phis):
            mine.load_state_dict(saved.state_dict())
    meta = json.loads((folder / STATE_FILE).read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        )
    h = meta["history"]
    return int(meta["step"]), History(h["steps"], h["evals"])


# ---- the pieces of a step: forward, loss, schedule, diagnosis ---------------------------------


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


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


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every position whose label is not -100 (summed)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def row_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every position whose label is not -100, summed per example ``[batch]``."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return losses.view(labels.shape).sum(1)


def forward(module: Any, batch: Batch, intervene_on: str = "prompt") -> tuple[Tensor, Tensor]:
    """Logits and labels at the positions where some row has a target.

    The loss reads only the completion tokens, so the unembedding (a fifth of a small model's
    forward, and as much again in backward) runs only there: the positions go to the model as
    transformers' ``logits_to_keep`` where it takes that argument."""
    keep = (batch.labels != -100).any(0).nonzero().squeeze(1)
    kwargs = dict(attention_mask=batch.attention_mask, prompt_mask=edited_part(batch, intervene_on))
    if batch.adapters is not None:
        kwargs["adapters"] = batch.adapters
    if 0 < keep.numel() < batch.labels.shape[1] and _takes_logits_to_keep(module):
        logits = module(batch.tokens, logits_to_keep=keep, **kwargs)
        if logits.shape[1] == keep.numel():
            return logits, batch.labels[:, keep]
        return logits[:, keep], batch.labels[:, keep]
    return module(batch.tokens, **kwargs), batch.labels


def edited_part(batch: Batch, intervene_on: str) -> Tensor | None:
    """The part of each sequence the positions resolve against (None: every real token)."""
    if intervene_on == "prompt":
        return batch.prompt_mask
    if intervene_on == "generated":
        return batch.attention_mask * (1 - batch.prompt_mask)
    return None


def _takes_logits_to_keep(module: Any) -> bool:
    reft = getattr(module, "module", module)  # DistributedDataParallel wraps the ReftModel
    hf = getattr(getattr(reft, "model", None), "original_model", None)
    if hf is None:
        return False
    try:
        return "logits_to_keep" in inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return False


def _diagnose(reft: "ReftModel", batch: Batch, step: int, epoch: int, loss: float) -> str:
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
        batch.tokens, attention_mask=batch.attention_mask, prompt_mask=batch.prompt_mask, adapters=batch.adapters
    )
    with torch.no_grad():
        execute(reft.model, plan, reft.cast, extra=[(p.site.hook_point, check(p.site)) for p in plan.sites])
    if first:
        return f"{where}: {first[0]} produced non-finite hidden states. Lower lr or set max_grad_norm."
    return f"{where}: the base model's own outputs are non-finite for this batch (no intervention produced them)."


def _rows(data: Any) -> list[dict]:
    from reftlens.training.data import rows

    return rows(data)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)
