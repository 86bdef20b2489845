"""What a run is told (:class:`TrainConfig`, the one place the options live) and what it reports
(:class:`History`)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from reftlens.errors import TrainingError
from reftlens.runtime.hf_backend import INTERVENE_ON
from reftlens.training.objectives import LanguageModeling, Objective, objective_for
from reftlens.training.precision import PRECISIONS


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


@dataclass
class TrainConfig:
    """The options of :func:`~reftlens.training.train`, each checked when the config is built
    (type, range, finite: a :class:`~reftlens.errors.TrainingError` names the option).

    ``train(reft, data, TrainConfig(...))`` and ``train(reft, data, lr=1e-3, ...)`` are the same
    run; keywords given next to a config override its fields.

    One optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples on each of the
    data-parallel processes; the loss is the mean over every completion token of that global batch
    (for each set of a bank: over its own), so one process, gradient accumulation and several
    processes give the same updates.
    """

    epochs: int = 1
    """Passes over the data (each set of a bank counts its own epochs)."""
    max_steps: int | None = None
    """Optimizer steps in all; overrides ``epochs`` when given."""
    batch_size: int = 8
    """Examples per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 4e-3
    """AdamW's learning rate (the peak of the schedule)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    schedule: str = "linear"
    """Learning-rate decay after the warmup: ``"constant"``, ``"linear"`` or ``"cosine"``."""
    warmup_steps: int = 0
    """Steps of linear warmup."""
    max_grad_norm: float | None = None
    """Clip each set's gradient norm to this (None: no clipping)."""
    max_length: int = 512
    """Tokens per example; a longer prompt keeps its end, a longer completion its start."""
    seed: int = 0
    """Seeds the batch order and torch's RNG."""
    precision: str = "fp32"
    """``"fp32"``; ``"bf16"`` runs the forward under bfloat16 autocast (on a CPU without native
    bfloat16 it trains in fp32 and warns once, :class:`~reftlens.training.EmulatedBF16Warning`);
    ``"bf16-force"`` uses autocast anyway."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding)."""
    chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template."""
    prepend_bos: bool | None = None
    """Start token on each prompt: None follows the model (never a second one on a prompt that has
    one, as a chat-formatted prompt does), True / False override; the rule of
    :meth:`reftlens.ReftModel.tokenize`, so training sees the tokens ``reft(...)`` sees."""
    task: str = "lm"
    """``"lm"`` (prompt → completion) or ``"classification"`` (prompt → ``label``: the loss is on
    the label's tokens, accuracy picks the best-scoring label among ``label_names``)."""
    label_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None
    """The classes of a classification task, in order (default: the sorted labels of the data; for
    a bank, of each set's own data). A bank's sets may each have their own: ``{set: [labels]}``;
    one list is shared by every set. Accuracy picks among an example's own set's labels."""
    objective: str | Objective = "lm"
    """``"lm"`` (the completion tokens' cross-entropy), ``"preference"`` (steering toward
    ``completion`` and away from ``rejected`` with +α and −α, RePS-style; see
    :class:`~reftlens.training.Preference`) or an :class:`~reftlens.training.Objective`. Φs with a
    ``penalty()`` (ReFT-r1's L1) add it to the loss."""
    intervene_on: str = "prompt"
    """Which tokens the positions resolve against, as in generation: ``"prompt"`` (the ReFT
    paper's setting), ``"all"`` (prompt and completion) or ``"generated"`` (the completion)."""
    eval_every: int | None = None
    """Evaluate on ``eval_data`` every so many steps (and always at the end)."""
    progress: bool = True
    """Show a progress bar."""
    checkpoint_dir: str | os.PathLike | None = None
    """Where checkpoints go: a new or empty folder, or an earlier checkpoint (it holds
    ``trainer_state.json``), else a :class:`~reftlens.errors.SaveError` before training starts."""
    checkpoint_every: int | None = None
    """Save the whole training state every so many steps."""
    resume: bool = False
    """Continue from the checkpoint in ``checkpoint_dir`` (it must hold the same set); the run ends
    where an uninterrupted one would."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check = _CHECKS.get(f.name)
            if check is not None:
                problem = check(getattr(self, f.name))
                if problem:
                    raise TrainingError(f"{f.name} must be {problem}; got {getattr(self, f.name)!r}.")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None:
            raise TrainingError("checkpoint_every and resume need checkpoint_dir=.")
        if isinstance(self.label_names, Mapping):
            self.label_names = {k: list(v) for k, v in self.label_names.items()}
        elif self.label_names is not None:
            self.label_names = list(self.label_names)
        objective = objective_for(self.objective)  # checks the name; each run builds its own from it
        if self.task == "classification" and not isinstance(objective, LanguageModeling):
            raise TrainingError(
                f"task='classification' trains with the LM loss on the label; objective="
                f"{objective.name!r} needs task='lm'."
            )

    @classmethod
    def options(cls) -> list[str]:
        """The option names, in order."""
        return [f.name for f in fields(cls)]


def _int(low: int, none: bool = False) -> Any:
    def check(v: Any) -> str | None:
        if none and v is None:
            return None
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low
        return None if ok else f"an int >= {low}" + (" or None" if none else "")

    return check


def _real(low: float, strict: bool = False, none: bool = False) -> Any:
    def check(v: Any) -> str | None:
        if none and v is None:
            return None
        ok = (
            isinstance(v, numbers.Real)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (v > low if strict else v >= low)
        )
        return None if ok else f"a finite number {'>' if strict else '>='} {low}" + (" or None" if none else "")

    return check


def _one_of(*choices: str) -> Any:
    words = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
    return lambda v: None if isinstance(v, str) and v in choices else words


def _bool(none: bool = False) -> Any:
    return lambda v: None if isinstance(v, bool) or (none and v is None) else "True or False" + (" or None" * none)


def _labels(v: Any) -> str | None:
    if v is None:
        return None

    def one(names: Any) -> bool:
        ok = not isinstance(names, (str, bytes)) and isinstance(names, Sequence) and len(names) > 0
        return ok and all(isinstance(x, str) for x in names) and len(set(names)) == len(names)

    ok = one(v) or (isinstance(v, Mapping) and len(v) > 0 and all(isinstance(k, str) and one(x) for k, x in v.items()))
    return (
        None if ok else "None, a non-empty sequence of distinct label strings, or a bank's {set name: such a sequence}"
    )


def _path(v: Any) -> str | None:
    return None if v is None or isinstance(v, (str, os.PathLike)) else "None, a str or an os.PathLike folder"


_CHECKS = {
    "epochs": _int(1),
    "max_steps": _int(1, none=True),
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "lr": _real(0.0),
    "weight_decay": _real(0.0),
    "schedule": _one_of("constant", "linear", "cosine"),
    "warmup_steps": _int(0),
    "max_grad_norm": _real(0.0, strict=True, none=True),
    "max_length": _int(2),
    "seed": _int(0),
    "precision": _one_of(*PRECISIONS),
    "group_by_length": _bool(),
    "chat_template": _bool(),
    "prepend_bos": _bool(none=True),
    "task": _one_of("lm", "classification"),
    "label_names": _labels,
    "intervene_on": _one_of(*INTERVENE_ON),
    "eval_every": _int(1, none=True),
    "progress": _bool(),
    "checkpoint_dir": _path,
    "checkpoint_every": _int(1, none=True),
    "resume": _bool(),
}
assert set(_CHECKS) | {"objective"} == {f.name for f in fields(TrainConfig)}, "every option is checked"
