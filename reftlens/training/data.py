"""Training data: prompt/completion (or prompt/label) examples → token batches.

Each example becomes prompt ids (with the model's start token, by the rule of
:func:`reftlens.inputs.text_tokens`: never a second one on a chat-formatted prompt) followed by
completion ids (and EOS); a preference example (``objective="preference"``) also carries the
``rejected`` completion. Positions of the interventions are resolved against the prompt part only, so "f5+l5"
means the first and last five prompt tokens, as in the ReFT paper. Loss is taken on the
completion tokens alone. For a bank, each example names the set it trains (``"adapter"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from reftlens.inputs import chat_prompt, text_tokens


@dataclass(frozen=True)
class Example:
    """One tokenized example: prompt and completion token ids, for classification the index of
    its label among the label names, and for preference training the rejected completion."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    label: int | None = None  # index into the label set, for classification
    adapter: str | None = None  # the bank set this example trains
    rejected: tuple[int, ...] | None = None  # the completion to prefer less (preference objective)
    source: tuple[int, ...] | None = None  # the source input of a Φ that takes one (DAS's counterfactual)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass
class Batch:
    """Right-padded examples: tokens, attention mask, prompt mask (1 on prompt tokens), next-token
    labels (-100 where there is no loss) and, for classification, each example's label index."""

    tokens: Tensor  # [batch, seq], right padded
    attention_mask: Tensor  # [batch, seq]
    prompt_mask: Tensor  # [batch, seq], 1 on prompt tokens
    labels: Tensor  # [batch, seq], next-token targets aligned with tokens; -100 where no loss
    class_labels: Tensor | None = None
    adapters: list[str | None] | None = None  # a bank: each example's set
    sources: Tensor | None = None  # [batch, source seq], right padded: the source inputs (DAS)
    source_mask: Tensor | None = None  # [batch, source seq]

    def to(self, device: torch.device | str) -> "Batch":
        def move(t: Tensor | None) -> Tensor | None:
            return t.to(device) if isinstance(t, Tensor) else t

        return Batch(
            *(move(t) for t in (self.tokens, self.attention_mask, self.prompt_mask, self.labels, self.class_labels)),
            adapters=self.adapters,
            sources=move(self.sources),
            source_mask=move(self.source_mask),
        )

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != -100).sum())


def rows(data: Any) -> list[dict[str, Any]]:
    """A list of dicts, or an HF ``datasets.Dataset`` (or anything iterable of dicts)."""
    if hasattr(data, "column_names") and hasattr(data, "__getitem__"):
        return [dict(r) for r in data]
    out = list(data)
    if not all(isinstance(r, dict) for r in out):
        raise TypeError(
            "training data must be dicts with 'prompt' and 'completion' (or 'label') keys, or a datasets.Dataset with those columns."
        )
    return out


def encode(
    model: Any,
    data: Any,
    *,
    max_length: int = 512,
    chat_template: bool = False,
    append_eos: bool = True,
    label_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    prepend_bos: bool | None = None,
) -> list[Example]:
    """Tokenize examples: ``{"prompt", "completion"}``, or ``{"prompt", "label"}`` for classification
    (the label's text is the completion, and ``label_names`` fixes the class order: one list, or
    one per bank set, keyed by the set an example names); an
    ``"adapter"`` key names the bank set an example trains; a ``"rejected"`` completion is kept for
    the preference objective. Prompts get start tokens by :func:`reftlens.inputs.text_tokens`
    (``prepend_bos``)."""

    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    out = []
    for i, r in enumerate(rows(data)):
        if "prompt" not in r or not ({"completion", "label"} & set(r)):
            raise KeyError(f"example {i} has keys {sorted(r)}; each needs 'prompt' and 'completion' (or 'label').")
        prompt = chat_prompt(tok, r["prompt"]) if chat_template else r["prompt"]
        p = text_tokens(model, prompt, prepend_bos).tolist()
        label = None
        if "completion" in r:
            text = r["completion"]
        else:
            text = str(r["label"])
            names = label_names.get(r.get("adapter"), []) if isinstance(label_names, Mapping) else label_names
            if names is None or text not in names:
                of = f" of set {r.get('adapter')!r}" if isinstance(label_names, Mapping) else ""
                raise KeyError(f"example {i}: label {text!r} is not among the label names{of} {list(names or [])}.")
            label = list(names).index(text)
        c = tok(text, add_special_tokens=False)["input_ids"]
        if append_eos and eos is not None and label is None:
            c = c + [eos]
        if len(p) >= max_length:
            p = p[len(p) - max_length + 1 :]  # keep the end of an overlong prompt, where the question is
        c = c[: max_length - len(p)]
        if not c:
            raise ValueError(f"example {i} has an empty completion after tokenization.")
        rejected = None
        if r.get("rejected") is not None:
            rejected = tok(r["rejected"], add_special_tokens=False)["input_ids"]
            rejected = tuple((rejected + [eos] if append_eos and eos is not None else rejected)[: max_length - len(p)])
            if not rejected:
                raise ValueError(f"example {i} has an empty rejected completion after tokenization.")
        out.append(Example(tuple(p), tuple(c), label, r.get("adapter"), rejected))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right pad a list of examples into one batch."""
    width = max(len(e) for e in examples)
    n = len(examples)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    prompt = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.prompt + e.completion)
        tokens[i, : len(e)] = ids
        attn[i, : len(e)] = 1
        prompt[i, : len(e.prompt)] = 1
        # the logit at position t predicts token t+1: targets are the completion tokens, shifted left
        labels[i, len(e.prompt) - 1 : len(e) - 1] = torch.tensor(e.completion)
    classes = torch.tensor([e.label for e in examples]) if all(e.label is not None for e in examples) else None
    adapters = [e.adapter for e in examples] if any(e.adapter is not None for e in examples) else None
    sources = source_mask = None
    if any(e.source is not None for e in examples):
        if not all(e.source for e in examples):
            raise ValueError("collate: some examples have a source and some do not; give every example one.")
        src_width = max(len(e.source) for e in examples)  # type: ignore[arg-type]
        sources = torch.full((n, src_width), pad_id, dtype=torch.long)
        source_mask = torch.zeros(n, src_width, dtype=torch.long)
        for i, e in enumerate(examples):
            sources[i, : len(e.source)] = torch.tensor(e.source)  # type: ignore[arg-type]
            source_mask[i, : len(e.source)] = 1  # type: ignore[arg-type]
    return Batch(tokens, attn, prompt, labels, classes, adapters, sources, source_mask)


def batch_order(
    examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int, group_by_length: bool, shuffle: bool = True
) -> list[list[int]]:
    """Indices of each batch for one epoch; the same (seed, epoch) always gives the same order.

    With ``group_by_length`` the shuffled examples are sorted by length within chunks of 50
    batches, so a batch holds examples of similar length and little padding is computed;
    the batches are then shuffled again, so lengths do not run in order.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist() if shuffle else list(range(len(examples)))
    if group_by_length:
        chunk = batch_size * 50
        order = [
            i
            for s in range(0, len(order), chunk)
            for i in sorted(order[s : s + chunk], key=lambda j: -len(examples[j]))
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[p] for p in perm]
    return batches
