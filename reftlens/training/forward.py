"""A batch through the model: logits and labels where the loss reads them, and the token losses.

The bottom of the training parts: the objectives, the step and evaluation all run batches
through :func:`forward` and score them with :func:`token_losses` / :func:`row_losses`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from reftlens.training.data import Batch


def forward(module: Any, batch: Batch, intervene_on: str = "prompt") -> tuple[Tensor, Tensor]:
    """Logits and labels at the positions where some row has a target.

    The loss reads only the completion tokens, so the unembedding (a fifth of a small model's
    forward, and as much again in backward) runs only there: the positions go to the model as
    transformers' ``logits_to_keep`` where it takes that argument. A bank's batch runs each row
    with its own set (``batch.adapters``); a batch with sources (DAS) passes them on."""
    keep = (batch.labels != -100).any(0).nonzero().squeeze(1)
    kwargs: dict[str, Any] = dict(attention_mask=batch.attention_mask, prompt_mask=edited_part(batch, intervene_on))
    if batch.adapters is not None:
        kwargs["adapters"] = batch.adapters
    args: tuple[Any, ...] = (batch.tokens,)
    if batch.sources is not None:
        args = (batch.tokens, batch.sources)
        kwargs["source_attention_mask"] = batch.source_mask
    if 0 < keep.numel() < batch.labels.shape[1] and _takes_logits_to_keep(module):
        logits = module(*args, logits_to_keep=keep, **kwargs)
        if logits.shape[1] == keep.numel():
            return logits, batch.labels[:, keep]
        return logits[:, keep], batch.labels[:, keep]
    return module(*args, **kwargs), batch.labels


def edited_part(batch: Batch, intervene_on: str) -> Tensor | None:
    """The part of each sequence the positions resolve against (None: every real token)."""
    if intervene_on == "prompt":
        return batch.prompt_mask
    if intervene_on == "generated":
        return batch.attention_mask * (1 - batch.prompt_mask)
    return None


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every position whose label is not -100 (summed)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def row_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of every position whose label is not -100, summed per example ``[batch]``."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return losses.view(labels.shape).sum(1)


def _takes_logits_to_keep(module: Any) -> bool:
    reft = getattr(module, "module", module)  # DistributedDataParallel wraps the ReftModel
    hf = getattr(getattr(reft, "model", None), "original_model", None)
    if hf is None:
        return False
    try:
        return "logits_to_keep" in inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return False
