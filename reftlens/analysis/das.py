"""Distributed alignment search (DAS, Geiger et al. 2023): learn the subspace that holds a variable.

A ``DII`` (Φ(b, s) = b + Rᵀ(Rs − Rb), R with orthonormal rows) at chosen ⟨layers, positions⟩ is
trained on counterfactual pairs — a base input, a source input, and the output the model should
give if the variable took the source's value — to maximise interchange intervention accuracy
(IIA): how often the intervened base run outputs the counterfactual answer. :func:`train_das`
trains through :func:`reftlens.train` (the recipe every set trains with): the label is a one-token
completion of the base input, and the source travels with each example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from reftlens.errors import AnalysisError
from reftlens.inputs import text_tokens
from reftlens.interventions.subspace import DII
from reftlens.sets import Intervention


@dataclass
class DASResult:
    """What :func:`train_das` returns: the ``ReftModel`` holding the trained DII, the DII itself
    (its subspace is ``dii.R.weight``), the loss of every step, and the IIA on the training pairs."""

    reft: Any  # the ReftModel holding the trained DII
    dii: DII
    losses: list[float] = field(default_factory=list)
    train_iia: float = float("nan")


def _pairs(model: Any, data: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack ``{"base", "source", "label"}`` examples (token ids of equal length; label a token id or string)."""

    def ids(x: Any) -> Tensor:
        if isinstance(x, str):
            return text_tokens(model, x)
        return torch.as_tensor(x, dtype=torch.long)

    try:
        base = torch.stack([ids(d["base"]) for d in data])
        source = torch.stack([ids(d["source"]) for d in data])
    except KeyError as e:
        raise AnalysisError(f"each DAS example needs 'base', 'source' and 'label'; one lacks {e}.") from None
    except RuntimeError:
        raise AnalysisError("DAS examples must all have the same length (in tokens); pad or regroup them.") from None
    labels = []
    for d in data:
        lab = d["label"]
        if isinstance(lab, str):
            lab = model.tokenizer(lab, add_special_tokens=False)["input_ids"][0]
        labels.append(int(lab))
    return base.to(model.cfg.device), source.to(model.cfg.device), torch.tensor(labels, device=model.cfg.device)


@torch.no_grad()
def iia(reft: Any, data: Sequence[dict], batch_size: int = 64) -> float:
    """Interchange intervention accuracy of ``reft`` (any set with a source-taking Φ) on ``data``:
    the share of pairs where the intervened base run's last-position argmax is the label."""
    base, source, labels = _pairs(reft.model, data)
    hits = 0
    for s in range(0, len(labels), batch_size):
        logits = reft(base[s : s + batch_size], sources=source[s : s + batch_size])
        hits += int((logits[:, -1].argmax(-1) == labels[s : s + batch_size]).sum())
    return hits / len(labels)


def train_das(
    model: Any,
    data: Sequence[dict],
    *,
    layers: int | Sequence[int],
    rank: int = 1,
    positions: Any = "l1",
    hook: str = "resid_post",
    max_steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-2,
    seed: int = 0,
) -> DASResult:
    """Train a rank-``rank`` DII at ``layers``/``positions`` so the intervened base outputs ``label``.

    ``data``: dicts with ``base`` and ``source`` (strings or token ids, all the same length) and
    ``label`` (the counterfactual next token, an id or a string). Returns the trained set; read
    its accuracy on held-out pairs with :func:`iia`.

    Trains through :func:`reftlens.train`: each pair is an encoded example (the base as the prompt,
    the label as a one-token completion, the source as its ``source``); AdamW without weight decay
    at a constant ``lr``, ``batch_size`` pairs a step drawn epoch by epoch, ``max_steps`` steps.
    """
    from reftlens.model import ReftModel
    from reftlens.training import Example, train

    torch.manual_seed(seed)
    dii = DII(model.cfg.d_model, rank)
    reft = ReftModel(model, Intervention(dii, layers=layers, positions=positions, hook=hook, name=f"DAS rank {rank}"))
    base, source, labels = _pairs(model, data)
    # the counterfactual label is a one-token completion of the base: the LM loss on it is the
    # cross-entropy of the last base position, and the positions resolve against the base
    examples = [
        Example(tuple(b), (int(y),), source=tuple(s))
        for b, s, y in zip(base.tolist(), source.tolist(), labels.tolist())
    ]
    history = train(
        reft,
        examples,
        max_steps=max_steps,
        batch_size=min(batch_size, len(examples)),
        lr=lr,
        schedule="constant",
        group_by_length=False,
        seed=seed,
        progress=False,
    )
    return DASResult(reft, dii, history.losses, iia(reft, data))


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the row spaces of ``a [r1, d]`` and ``b [r2, d]``."""
    qa, _ = torch.linalg.qr(a.detach().double().T)
    qb, _ = torch.linalg.qr(b.detach().double().T)
    s = torch.linalg.svdvals(qa.T @ qb).clamp(-1, 1)
    return torch.arccos(s).float()
