"""Training: the recipe (:func:`train`), its options (:class:`TrainConfig`), one step for a set or a
bank (:func:`train_step`), evaluation, checkpoints, precision, and the data handling.

The parts point one way: ``loop`` (the recipe) → ``checkpoint`` / ``evaluate`` → ``config`` →
``step`` → ``objectives`` → ``forward`` → ``data`` / ``precision``.
"""

from reftlens.errors import TrainingError
from reftlens.training.config import History, TrainConfig
from reftlens.training.data import Batch, Example, batch_order, chat_prompt, collate, encode
from reftlens.training.evaluate import evaluate
from reftlens.training.fsdp import shard_base
from reftlens.training.loop import train
from reftlens.training.objectives import LanguageModeling, Objective, Preference
from reftlens.training.precision import EmulatedBF16Warning
from reftlens.training.step import train_step

__all__ = [
    "shard_base",
    "train",
    "train_step",
    "evaluate",
    "History",
    "TrainConfig",
    "TrainingError",
    "EmulatedBF16Warning",
    "encode",
    "collate",
    "batch_order",
    "chat_prompt",
    "Batch",
    "Example",
    "Objective",
    "LanguageModeling",
    "Preference",
]
