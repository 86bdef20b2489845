"""What a training step minimises: the language-modelling loss, or a steering preference.

An objective gives, for a micro-batch of examples, its loss *summed* over what it averages over
(completion tokens for the LM loss, examples for the preference loss) and how many of those each
example holds; :func:`~reftlens.training.loop.train_step` divides by the step's total, so gradient
accumulation and data-parallel processes give the same updates. Φs with a ``penalty()`` (ReFT-r1's
L1 on its latents) add it to whichever objective runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reftlens.errors import TrainingError
from reftlens.training.data import Example, collate

if TYPE_CHECKING:
    from reftlens.model import ReftModel


class Objective:
    """The interface :func:`~reftlens.training.train` calls (``objective=`` takes an instance)."""

    name = "objective"

    def setup(self, reft: "ReftModel", examples: Sequence[Example], world: int) -> None:
        """Called once before training (check the data, build what the loss needs)."""

    def count(self, example: Example) -> int:
        """How many terms ``example`` adds to the loss's average."""
        raise NotImplementedError

    def loss(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        """The loss of ``examples`` summed over their terms (the step divides by the total count);
        ``intervene_on`` says which part of each sequence the positions resolve against."""
        raise NotImplementedError


class LanguageModeling(Objective):
    """Cross-entropy of the completion tokens given the prompt, with the interventions applied
    (the ReFT paper's objective). The average is over every completion token of the step."""

    name = "lm"

    def count(self, example: Example) -> int:
        return len(example.completion)

    def loss(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        from reftlens.training.loop import forward, token_losses

        logits, labels = forward(module, collate(examples, pad).to(device), intervene_on)
        return token_losses(logits, labels)


class Preference(Objective):
    """A reference-free, bidirectional preference objective for steering (after RePS, Wu et al.
    2025, arXiv 2505.20809).

    Data: ``{"prompt", "completion", "rejected"}`` — ``completion`` shows the concept (the steered
    response), ``rejected`` does not (e.g. the base model's own reply). With ℓ̄ the mean
    log-probability per completion token and Φ_α the set's edits scaled by α
    (:meth:`~reftlens.ReftModel.scaled`; for ``Steer(v)``: h + αv):

    - toward the concept, at α ~ ``alphas``: Δ₊ = β₊·ℓ̄(completion | Φ_α) − ℓ̄(rejected | Φ_α);
    - away from it, at −α: Δ₋ = β₋·ℓ̄(rejected | Φ₋α) − ℓ̄(completion | Φ₋α);
    - loss per example: −log σ(Δ₊) − log σ(Δ₋), averaged over the examples.

    β₊ = max(ℓ̄₀(rejected) − ℓ̄₀(completion), ``beta_floor``) with ℓ̄₀ under the unedited model (and
    β₋ the other way round) up-weights the side the base model finds unlikely. No reference model
    enters the margins themselves (unlike DPO); the base model's likelihoods are computed once per
    example and kept. The paper nulls the concept for the "away" side of rank-1 methods; here every
    Φ is reversed by −α, the one operation every Φ (Steer, LoReFT, ReFT-r1, yours) supports.
    """

    name = "preference"

    def __init__(self, alphas: Sequence[float] = (1.0,), beta_floor: float = 1.0):
        alphas = [float(a) for a in alphas]
        if not alphas or not all(a > 0 and math.isfinite(a) for a in alphas):
            raise TrainingError(f"Preference: alphas must be positive steering factors; got {alphas}.")
        self.alphas = alphas
        self.beta_floor = float(beta_floor)
        self._reference: dict[Example, tuple[float, float]] = {}

    def setup(self, reft: "ReftModel", examples: Sequence[Example], world: int) -> None:
        if world > 1:
            raise TrainingError("objective='preference' runs on one process; launch without torchrun/DDP.")
        missing = [i for i, e in enumerate(examples) if e.rejected is None]
        if missing:
            raise TrainingError(
                f"objective='preference' needs a 'rejected' completion in every example; example {missing[0]} has none. "
                "Give each example {'prompt', 'completion' (with the concept), 'rejected' (without it)}."
            )
        if any(u.takes_source for u in reft.units):
            raise TrainingError(
                "objective='preference' scales each intervention's edit; Φs that take a source cannot be scaled."
            )
        self.view = reft.scaled(0.0)

    def count(self, example: Example) -> int:
        return 1

    def loss(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        n = len(examples)
        ref = self._references(examples, pad, device)
        pick = torch.randint(len(self.alphas), (n,))
        alpha = torch.tensor(self.alphas)[pick]
        rows = (
            [Example(e.prompt, e.completion) for e in examples] + [Example(e.prompt, e.rejected) for e in examples]
        ) * 2
        signs = torch.cat([alpha, alpha, -alpha, -alpha])
        lp = self._mean_logprob(rows, signs, pad, device, intervene_on)
        toward_c, toward_r, away_c, away_r = lp[:n], lp[n : 2 * n], lp[2 * n : 3 * n], lp[3 * n :]
        beta_up = (ref[:, 1] - ref[:, 0]).clamp(min=self.beta_floor)
        beta_down = (ref[:, 0] - ref[:, 1]).clamp(min=self.beta_floor)
        up = beta_up * toward_c - toward_r
        down = beta_down * away_r - away_c
        return (F.softplus(-up) + F.softplus(-down)).sum()

    def _mean_logprob(
        self, rows: Sequence[Example], alpha: Tensor, pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        """Mean log-probability per completion token of each row, each row's edits scaled by its α."""
        from reftlens.training.loop import forward

        for phi in self.view.phis:
            phi.alpha = alpha.to(device)
        logits, labels = forward(self.view, collate(rows, pad).to(device), intervene_on)
        target = labels != -100
        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * target).sum(1) / target.sum(1).clamp(min=1)

    @torch.no_grad()
    def _references(self, examples: Sequence[Example], pad: int, device: torch.device) -> Tensor:
        """ℓ̄₀(completion), ℓ̄₀(rejected) under the unedited model, ``[n, 2]``, computed once per example."""
        todo = [e for e in dict.fromkeys(examples) if e not in self._reference]
        if todo:
            rows = [Example(e.prompt, e.completion) for e in todo] + [Example(e.prompt, e.rejected) for e in todo]
            lp = self._mean_logprob(rows, torch.zeros(len(rows)), pad, device).cpu()
            for i, e in enumerate(todo):
                self._reference[e] = (float(lp[i]), float(lp[len(todo) + i]))
        return torch.tensor([self._reference[e] for e in examples], device=device)


OBJECTIVES = {"lm": LanguageModeling, "preference": Preference}


def objective_for(objective: str | Objective) -> Objective:
    """An :class:`Objective` from its name (``"lm"``, ``"preference"``) or an instance."""
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, str) and objective in OBJECTIVES:
        return OBJECTIVES[objective]()
    raise TrainingError(
        f"objective must be one of {sorted(OBJECTIVES)} or an Objective instance (e.g. "
        f"reftlens.training.Preference(alphas=(1, 2))); got {objective!r}."
    )


def penalties(reft: "ReftModel") -> Tensor | None:
    """The sum of the Φs' ``penalty()`` terms since their last call (None when no Φ has one)."""
    terms = [
        t for phi in reft.phis if callable(getattr(phi, "penalty", None)) for t in [phi.penalty()] if t is not None
    ]
    return torch.stack(terms).sum() if terms else None
