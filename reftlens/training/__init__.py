"""Training: data (prompt/completion, classification, length grouping) and the loop."""

from reftlens.training.data import Batch, Example, batch_order, chat_prompt, collate, encode
from reftlens.training.loop import History, TrainingError, evaluate, train

__all__ = ["train", "evaluate", "History", "TrainingError", "encode", "collate", "batch_order", "chat_prompt", "Batch", "Example"]
