"""What localize and inspect share: task data as token batches, the completion loss through a
ReftModel, and reading a direction through the model's final norm and unembedding."""

from __future__ import annotations

import inspect as _pyinspect
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reftlens.errors import AnalysisError
from reftlens.training import Batch, Example, collate, encode

TASKS = ("lm", "classification")


def check_int(name: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise AnalysisError(f"{name} must be an integer ≥ {low}; got {value!r}.")
    return value


def check_model(model: Any, what: str) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_layers") or not hasattr(model, "tokenizer"):
        raise AnalysisError(
            f"{what} needs a TransformerLens bridge from reftlens.load_model(...); got {type(model).__name__}."
        )


def encode_data(
    model: Any,
    data: Any,
    *,
    what: str,
    task: str,
    label_names: Sequence[str] | None,
    chat_template: bool,
    max_length: int,
) -> tuple[list[Example], list[str] | None]:
    """Tokenize task data as :func:`reftlens.train` does (prompt/completion, or prompt/label with
    ``task="classification"``); errors name ``what``."""
    if task not in TASKS:
        raise AnalysisError(f"task must be 'lm' or 'classification'; got {task!r}.")
    if not isinstance(chat_template, bool):
        raise AnalysisError(f"chat_template must be True or False; got {chat_template!r}.")
    check_int("max_length", max_length, 2)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise AnalysisError(
            f"{what} must be a list of {{'prompt': ..., 'completion': ...}} dicts (or a datasets.Dataset); "
            f"got {type(data).__name__}."
        )
    rows = [dict(r) for r in data] if hasattr(data, "column_names") else list(data)
    if not rows:
        raise AnalysisError(f"{what} is empty: pass at least one {{'prompt': ..., 'completion': ...}} example.")
    if not all(isinstance(r, dict) for r in rows):
        raise AnalysisError(f"{what} must hold dicts with 'prompt' and 'completion' (or 'label') keys.")
    if task == "classification":
        if label_names is None:
            label_names = sorted({str(r.get("label")) for r in rows})
        label_names = [str(x) for x in label_names]
    elif label_names is not None:
        raise AnalysisError("label_names is for task='classification'; leave it None for task='lm'.")
    try:
        examples = encode(
            model,
            rows,
            max_length=max_length,
            chat_template=chat_template,
            label_names=label_names if task == "classification" else None,
        )
    except (KeyError, ValueError, TypeError) as e:
        raise AnalysisError(f"{what}: {e.args[0] if e.args else e}") from None
    return examples, label_names


def to_batch(model: Any, examples: Sequence[Example]) -> Batch:
    from reftlens.inputs import pad_token_id

    return collate(examples, pad_token_id(model.tokenizer)).to(model.cfg.device)


def _takes_logits_to_keep(model: Any) -> bool:
    hf = getattr(model, "original_model", None)
    if hf is None:
        return False
    try:
        return "logits_to_keep" in _pyinspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_and_labels(
    reft: Any, batch: Batch, adapters: Sequence[str | None] | None = None, prompt_only: bool = True
) -> tuple[Tensor, Tensor]:
    """Logits and next-token labels at the positions where some row has a target (only those are
    unembedded where the model allows it), positions resolved against the prompt as in training."""
    keep = (batch.labels != -100).any(0).nonzero().squeeze(1)
    kwargs: dict[str, Any] = {"attention_mask": batch.attention_mask}
    if prompt_only:
        kwargs["prompt_mask"] = batch.prompt_mask
    if adapters is not None:
        kwargs["adapters"] = list(adapters)
    if 0 < keep.numel() < batch.labels.shape[1] and _takes_logits_to_keep(reft.model):
        logits = reft(batch.tokens, logits_to_keep=keep, **kwargs)
        if logits.shape[1] == keep.numel():
            return logits, batch.labels[:, keep]
        return logits[:, keep], batch.labels[:, keep]
    return reft(batch.tokens, **kwargs), batch.labels


def row_losses(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed completion-token cross-entropy per row, and each row's number of target tokens."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return ce.view(labels.shape).sum(1), (labels != -100).sum(1)


def final_readout(model: Any) -> tuple[Tensor, Tensor | None, bool]:
    """``(W_U [d, vocab], γ [d] or None, centred)``: the unembedding and the final norm's scale, and
    whether the final norm subtracts the mean (LayerNorm) or not (RMSNorm)."""
    W_U = model.W_U.detach().float()
    gamma = None
    for name, p in model.ln_final.named_parameters():
        if name.endswith("weight") and p.ndim == 1 and p.shape[0] == W_U.shape[0]:
            gamma = p.detach().float()
    kind = str(getattr(model.cfg, "normalization_type", "LN") or "")
    return W_U, gamma, kind.upper().startswith("LN")


def read_direction(readout: tuple[Tensor, Tensor | None, bool], u: Tensor) -> Tensor:
    """The change of every logit per unit of direction ``u`` at the final residual stream, through the
    final norm's linear part (centring for LayerNorm, then the scale γ) and the unembedding; the
    norm's division by the stream's size scales every token alike, so the order of tokens is exact
    for an edit at the last layer and the logit lens's reading for an earlier one."""
    W_U, gamma, centred = readout
    u = u.detach().float().to(W_U.device)
    if centred:
        u = u - u.mean()
    if gamma is not None:
        u = u * gamma.to(u.device)
    return u @ W_U


def top_tokens(model: Any, values: Tensor, k: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The ``k`` tokens with the largest and the smallest values, each ``{"token", "id", "logit"}``."""
    tok = model.tokenizer
    k = min(k, values.shape[0])
    hi = torch.topk(values, k)
    lo = torch.topk(-values, k)
    up = [{"token": tok.decode([int(i)]), "id": int(i), "logit": float(v)} for v, i in zip(hi.values, hi.indices)]
    down = [{"token": tok.decode([int(i)]), "id": int(i), "logit": float(-v)} for v, i in zip(lo.values, lo.indices)]
    return up, down
