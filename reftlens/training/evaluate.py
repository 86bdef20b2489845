"""Evaluation: mean completion-token loss and accuracy, per set for a bank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor

from reftlens.errors import TrainingError
from reftlens.training.data import Example, collate
from reftlens.training.forward import forward, row_losses

if TYPE_CHECKING:
    from reftlens.model import ReftModel


@torch.no_grad()
def evaluate(
    reft: "ReftModel",
    examples: list[Example],
    *,
    batch_size: int = 8,
    task: str = "lm",
    label_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    intervene_on: str = "prompt",
) -> dict[str, Any]:
    """Mean completion-token loss, and accuracy: per completion token (``lm``) or per example
    (``classification``: the label whose tokens score highest given the prompt, among
    ``label_names``; a mapping gives each set of a bank its own labels, and an example's label is
    its index in its set's list). ``intervene_on`` as in :func:`~reftlens.training.train`, for the
    loss and the label scores alike. A bank's examples run with their own sets, and each set's
    metrics are under ``"sets"``."""
    if not examples:
        raise TrainingError("evaluate got no examples: pass at least one encoded example.")
    was_training = reft.training
    reft.eval()
    pad = reft.pad_token_id
    # per set (None: a plain set): [loss sum, target tokens, correct tokens, correct examples, examples]
    sums: dict[str | None, list[float]] = {}
    cands = _label_tokens(reft, label_names)
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
            # each row among its own set's labels (one shared list: the whole chunk at once)
            parts: dict[str | None, list[int]] = {}
            for k, e in enumerate(chunk):
                parts.setdefault(None if None in cands else e.adapter, []).append(k)
            for name, rows in parts.items():
                if name not in cands:
                    raise TrainingError(f"label_names names no labels for the set {name!r}; give each set its labels.")
                sub = [chunk[k] for k in rows]
                scores = _label_scores(reft, sub, cands[name], pad, intervene_on)
                right = (scores.argmax(1).cpu() == torch.tensor([e.label for e in sub])).int().tolist()
                for k, ok in zip(rows, right):
                    correct_ex[k] = ok
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


def _label_tokens(
    reft: "ReftModel", label_names: Sequence[str] | Mapping[str, Sequence[str]] | None
) -> dict[str | None, list[tuple[int, ...]]]:
    """Each label's tokens: under None for one list shared by every example, per set for a mapping."""

    def tokens(names: Sequence[str]) -> list[tuple[int, ...]]:
        return [tuple(reft.model.tokenizer(n, add_special_tokens=False)["input_ids"]) for n in names]

    if isinstance(label_names, Mapping):
        return {name: tokens(v) for name, v in label_names.items()}
    return {None: tokens(label_names or [])}


def _label_scores(
    reft: "ReftModel", chunk: Sequence[Example], cands: Sequence[tuple[int, ...]], pad: int, intervene_on: str
) -> Tensor:
    """``[rows, labels]``: each label's log-probability after each example's prompt."""
    if all(len(c) == 1 for c in cands):
        return _score_first_tokens(reft, chunk, cands, pad, intervene_on)
    return torch.stack([_score(reft, chunk, c, pad, intervene_on) for c in cands], 1)


def _with_completion(e: Example, completion: tuple[int, ...]) -> Example:
    return Example(e.prompt, completion, adapter=e.adapter, source=e.source)


def _score_first_tokens(
    reft: "ReftModel", chunk: Sequence[Example], cands: Sequence[tuple[int, ...]], pad: int, intervene_on: str
) -> Tensor:
    """``_score`` for every one-token label at once: the logits after the prompt score them all
    (causal attention: they do not depend on which label follows, nor on an edit of the label's
    own position), so one forward, not one per label."""
    batch = collate([_with_completion(e, cands[0]) for e in chunk], pad).to(reft.device)
    logits, labels = forward(reft, batch, intervene_on)
    at = (labels != -100).float().argmax(1)  # each row's one target position
    logp = logits[torch.arange(len(chunk), device=logits.device), at].float().log_softmax(-1)
    return logp[:, [c[0] for c in cands]]


def _score(
    reft: "ReftModel", chunk: Sequence[Example], completion: tuple[int, ...], pad: int, intervene_on: str
) -> Tensor:
    """Sum of log-probabilities of ``completion`` after each example's prompt."""
    batch = collate([_with_completion(e, completion) for e in chunk], pad).to(reft.device)
    logits, labels = forward(reft, batch, intervene_on)
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * (labels != -100)).sum(1)
