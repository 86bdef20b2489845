"""Training: data (prompt/completion, classification, length grouping) and the loop."""

from reftlens.training.data import Batch, Example, batch_order, chat_prompt, collate, encode
from reftlens.training.fsdp import shard_base
from reftlens.training.loop import EmulatedBF16Warning, History, TrainConfig, TrainingError, evaluate, train, train_step
from reftlens.training.objectives import LanguageModeling, Objective, Preference

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
