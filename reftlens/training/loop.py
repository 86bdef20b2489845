"""The training recipe: setup, one step at a time, evaluation and checkpoints on the way.

Read it top to bottom; copy it into a notebook and change what you need. :func:`train` checks the
options (:class:`~reftlens.training.config.TrainConfig`), sets up the data, each set's schedule of
batches, the optimizer and learning-rate schedule, the checkpoint to resume from, the model
(wrapped for data parallelism) and the precision, then runs
:func:`~reftlens.training.step.train_step` until the last step, with
:func:`~reftlens.training.evaluate.evaluate` and
:func:`~reftlens.training.checkpoint.save_checkpoint` on the way.

A plain set is a bank of one: every run trains sets (a plain set is the one set named None). Each
set takes its own batches (its own order, epochs, schedule and clipping, a parameter group of its
own); a step runs the sets' batches side by side, and each set's loss is the mean over its own
completion tokens. So every set of a bank gets exactly the updates it would get trained alone.

The parts point one way (``.importlinter``): ``loop`` → ``checkpoint`` / ``evaluate`` → ``config``
→ ``step`` → ``objectives`` → ``forward`` → ``data`` / ``precision``; none imports the loop.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from reftlens.errors import TrainingError
from reftlens.saving import check_save_target, recover
from reftlens.training.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from reftlens.training.config import History, TrainConfig
from reftlens.training.data import Example, batch_order, encode
from reftlens.training.evaluate import evaluate
from reftlens.training.objectives import objective_for
from reftlens.training.precision import autocast_for
from reftlens.training.step import schedule_fn, set_phis, train_step, world_rank

if TYPE_CHECKING:
    from reftlens.model import ReftModel

# a set's examples → (their indices, optimizer steps per epoch, steps in the whole run)
Schedule = dict[Any, tuple[list[int], int, int]]


def train(
    reft: "ReftModel",
    data: Any,
    config: TrainConfig | None = None,
    *,
    eval_data: Any = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    **options: Any,
) -> History:
    """Train the Φs of ``reft`` on ``data`` and return the :class:`~reftlens.training.History`.

    The options are the fields of :class:`~reftlens.training.TrainConfig` (epochs, batch_size,
    lr, schedule, objective, intervene_on, precision, checkpoint_dir, resume, ...): pass a
    ``config``, or the options as keywords (``train(reft, data, max_steps=10, lr=1e-3)``), or
    both (the keywords override the config's fields). Each is checked before any work.

    ``data``: dicts (or a ``datasets.Dataset``) with ``prompt`` and ``completion``; for
    ``task="classification"``, ``prompt`` and ``label``; for ``objective="preference"`` also
    ``rejected``; or examples already encoded (:func:`~reftlens.training.encode`). Empty ``data``
    or ``eval_data`` is an error. ``eval_data`` is evaluated every ``eval_every`` steps and at the
    end. A bank (``ReftModel(model, {name: set})``) trains every set at once on examples that carry
    ``"adapter": name``, each exactly as if alone, with any objective; ``history.adapter(name)`` is
    one set's history. ``callback(record)`` sees every step and evaluation record.

    >>> history = reftlens.train(reft, [{"prompt": "2+2=", "completion": "4"}], max_steps=10)  # doctest: +SKIP
    """
    cfg = make_config(config, options)
    if cfg.checkpoint_dir is not None and cfg.checkpoint_every:  # refuse a foreign folder before any work
        check_save_target(cfg.checkpoint_dir, markers=[STATE_FILE])
    world, rank = world_rank()
    examples, eval_examples, label_names = _setup_data(reft, data, eval_data, cfg)
    sets = _setup_sets(reft, examples, cfg, world)
    total = max(n for _, _, n in sets.values())
    torch.manual_seed(cfg.seed)
    objective = objective_for(cfg.objective)  # a name builds a new one (its state is this run's)
    objective.setup(reft, examples, world)
    optimizer, scheduler = _setup_optimizer(reft, cfg, total, sets)
    step, history = _setup_resume(reft, cfg, optimizer, scheduler)
    module = _setup_model(reft, world)
    autocast = autocast_for(cfg.precision, reft.device)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None

    bar = _progress(total, step, enabled=cfg.progress and rank == 0)
    reft.train()
    try:
        while step < total:
            set_epochs, group = _sets_step_batches(examples, sets, cfg, world, step)
            record = train_step(
                module,
                optimizer,
                scheduler,
                examples,
                group,
                step=step,
                epoch=max(set_epochs.values()),
                autocast=autocast,
                max_grad_norm=cfg.max_grad_norm,
                set_epochs=set_epochs,
                objective=objective,
                intervene_on=cfg.intervene_on,
            )
            step += 1
            history.steps.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if callback is not None:
                callback(record)
            if eval_examples is not None and step < total and (_due(step, cfg) or _set_ends(step, sets)):
                _record_eval(reft, eval_examples, cfg, label_names, step, history, callback, sets)
                reft.train()
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and rank == 0:
                save_checkpoint(ckpt, reft, optimizer, scheduler, step, history, cfg)
        if eval_examples is not None:
            _record_eval(reft, eval_examples, cfg, label_names, step, history, callback, sets)
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


def make_config(config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    """The run's :class:`TrainConfig`: ``config`` (default: every option at its default) with
    ``options`` overriding its fields; an unknown option is an error that names it."""
    names = TrainConfig.options()
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainingError(
                f"train() has no option {key!r}{hint}; the options are the fields of TrainConfig: {', '.join(names)}."
            )
    if config is None:
        return TrainConfig(**options)
    if not isinstance(config, TrainConfig):
        raise TrainingError(f"config must be a TrainConfig (or None); got {type(config).__name__}.")
    return dataclasses.replace(config, **options) if options else config


def _signature() -> inspect.Signature:
    """train's signature as ``help`` and ``inspect`` show it: the options spelled out from TrainConfig."""
    base = inspect.signature(train)
    fixed = [p for p in base.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in dataclasses.fields(TrainConfig)
    ]
    return base.replace(parameters=fixed + options)


train.__signature__ = _signature()  # type: ignore[attr-defined]


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
    if cfg.task == "classification" and label_names is None and not _encoded(train_rows):
        if reft.bank is None:
            label_names = sorted({str(r["label"]) for r in train_rows})
        else:  # each set's own labels: a set's accuracy picks among them alone, as a run of it alone would
            label_names = {
                name: sorted({str(r["label"]) for r in train_rows if r.get("adapter") == name})
                for name in dict.fromkeys(r.get("adapter") for r in train_rows)
                if isinstance(name, str)
            }
    if isinstance(label_names, Mapping) and reft.bank is None:
        raise TrainingError(
            "label_names is a mapping of set names, but this ReftModel holds one set; give one list of labels."
        )
    if isinstance(label_names, Mapping) and not set(label_names) <= set(reft.adapters):
        unknown = sorted(set(label_names) - set(reft.adapters))
        raise TrainingError(f"label_names names sets {unknown} that this bank does not hold ({reft.adapters}).")
    names = label_names if cfg.task == "classification" else None

    def encoded(rows: list[Any]) -> list[Example]:
        if _encoded(rows):
            return list(rows)
        kw = dict(max_length=cfg.max_length, chat_template=cfg.chat_template, prepend_bos=cfg.prepend_bos)
        return encode(model, rows, label_names=names, **kw)

    examples = encoded(train_rows)
    eval_examples = None
    if eval_data is not None:
        eval_rows = _rows(eval_data)
        if not eval_rows:
            raise TrainingError(
                "eval_data is empty: there is nothing to evaluate on. Pass examples of the "
                "same form as data, or leave eval_data=None to skip evaluation."
            )
        eval_examples = encoded(eval_rows)
    for what, exs in (("data", examples), ("eval_data", eval_examples or [])):
        _check_adapters(reft, exs, what)
    return examples, eval_examples, label_names


def _encoded(rows: Sequence[Any]) -> bool:
    return bool(rows) and all(isinstance(r, Example) for r in rows)


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


def _setup_sets(reft: "ReftModel", examples: Sequence[Example], cfg: TrainConfig, world: int) -> Schedule:
    """The sets with examples (a plain set: the one set None) → (their example indices, steps per
    epoch, total steps), each counted as a run of that set alone would count them."""
    names: list[str | None] = [None] if reft.bank is None else list(reft.adapters)
    out: Schedule = {}
    for name in names:
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
    reft: "ReftModel", cfg: TrainConfig, total: int, sets: Schedule | None = None
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable Φ parameters, and the learning-rate schedule over ``total`` steps.
    A bank gets one parameter group per set with examples, each with its own schedule."""
    if sets is None or list(sets) == [None]:  # a plain set: one group
        params = [p for p in reft.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("no trainable Φ parameters: every intervention in this set is fixed.")
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(cfg.schedule, cfg.warmup_steps, total))
        return optimizer, scheduler
    groups, owner = [], {}
    for name, phis in set_phis(reft, list(sets)).items():
        mine = list({id(p): p for phi in phis for p in phi.parameters() if p.requires_grad}.values())
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
    lambdas = [schedule_fn(cfg.schedule, cfg.warmup_steps, sets[g["set"]][2]) for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _setup_resume(
    reft: "ReftModel", cfg: TrainConfig, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, History]:
    """The step to start from and the history so far: from the checkpoint with ``resume=True``."""
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    if cfg.resume and ckpt is not None:
        ckpt = recover(ckpt)  # a checkpoint caught mid-swap by a kill is restored first
    if cfg.resume and ckpt is not None and (ckpt / STATE_FILE).is_file():
        return load_checkpoint(ckpt, reft, optimizer, scheduler, cfg)
    return 0, History()


def _setup_model(reft: "ReftModel", world: int) -> Any:
    """The module to run: ``reft``, or its ``DistributedDataParallel`` wrapper on several processes.
    A bank's step may leave a set's Φs unused on a process (its share of the global batch holds no
    example of that set) or on all (the set's run has ended), so DDP looks for unused parameters:
    those used elsewhere get a zero local gradient in the average, those used nowhere keep none (the
    optimizer skips them, as it does in one process)."""
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(reft, find_unused_parameters=reft.bank is not None)
    return reft


# ---- each step's batches -------------------------------------------------------------------------


def _step_batches(
    examples: Sequence[Example], cfg: TrainConfig, world: int, step: int, steps_per_epoch: int
) -> tuple[int, list[list[int]]]:
    """The epoch of optimizer step ``step`` and its ``grad_accum`` global batches (example indices).
    The order depends only on (seed, epoch), so a resumed run sees the batches it would have seen;
    it is the order of batches of the whole step (``batch_size × world × grad_accum``), each then
    cut into micro-batches, so accumulation changes nothing, also with ``group_by_length``."""
    epoch, k = divmod(step, steps_per_epoch)
    micro = cfg.batch_size * world
    order = batch_order(
        examples, micro * cfg.grad_accum, seed=cfg.seed, epoch=epoch, group_by_length=cfg.group_by_length
    )
    return epoch, [order[k][s : s + micro] for s in range(0, len(order[k]), micro)]


def _sets_step_batches(
    examples: Sequence[Example], sets: Schedule, cfg: TrainConfig, world: int, step: int
) -> tuple[dict[Any, int], list[list[int]]]:
    """Each set's epoch at step ``step`` and the step's micro-batches: micro-batch j holds every
    set's own micro-batch j, side by side (sets whose run has ended take none)."""
    epochs, group = {}, []
    for name, (idx, per_epoch, total) in sets.items():
        if step >= total:
            continue
        epochs[name], mine = _step_batches([examples[i] for i in idx], cfg, world, step, per_epoch)
        for j, ids in enumerate(mine):
            if j == len(group):
                group.append([])
            group[j] += [idx[i] for i in ids]
    return epochs, group


# ---- evaluation on the way -----------------------------------------------------------------------


def _record_eval(
    reft: "ReftModel",
    examples: list[Example],
    cfg: TrainConfig,
    label_names: Sequence[str] | None,
    step: int,
    history: History,
    callback: Callable | None,
    sets: Schedule,
) -> None:
    metrics = evaluate(
        reft, examples, batch_size=cfg.batch_size, task=cfg.task, label_names=label_names, intervene_on=cfg.intervene_on
    )
    if "sets" in metrics:  # a bank: each set's metrics where a run of it alone would evaluate
        metrics["sets"] = {
            name: m
            for name, m in metrics["sets"].items()
            if name not in sets or step == sets[name][2] or (step < sets[name][2] and _due(step, cfg))
        }
    record = {"step": step, **metrics}
    history.evals.append(record)
    if callback is not None:
        callback({"eval": True, **record})


def _due(step: int, cfg: TrainConfig) -> bool:
    """An evaluation every ``eval_every`` steps."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0


def _set_ends(step: int, sets: Schedule) -> bool:
    """A set of a bank ends its run at ``step`` (a run of it alone evaluates at its end)."""
    return any(step == n for _, _, n in sets.values())


def _rows(data: Any) -> list[Any]:
    from reftlens.training.data import rows

    if isinstance(data, (list, tuple)) and _encoded(data):
        return list(data)
    return rows(data)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from reftlens.progress import progress_bar

    return progress_bar(total, desc="train", enabled=enabled, initial=initial)
