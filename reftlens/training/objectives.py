"""What a training step minimises: the language-modelling loss, or a steering preference.

An objective gives, for a micro-batch of examples, each example's loss *summed* over what it
averages over (completion tokens for the LM loss, the example itself for the preference loss) and
how many of those each example holds; :func:`~reftlens.training.step.train_step` divides each set's
sum by that set's total over the step, so gradient accumulation, data-parallel processes and the
sets of a bank give the same updates as one set alone. Φs with a ``penalty()`` (ReFT-r1's L1 on its
latents) add it to whichever objective runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reftlens.errors import TrainingError
from reftlens.training.data import Example, collate
from reftlens.training.forward import forward, row_losses

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

    def losses(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        """Each example's loss summed over its terms, ``[len(examples)]`` (the step divides each
        set's sum by the set's count); ``intervene_on`` says which part of each sequence the
        positions resolve against. The examples of a bank name their sets (``example.adapter``).

        Override this (one forward per micro-batch) or :meth:`loss`; by default each set's
        examples go to :meth:`loss` apart, and its value lands on the set's first example."""
        if type(self).loss is Objective.loss:
            raise NotImplementedError(f"{type(self).__name__}: an Objective overrides losses() or loss().")
        by_set: dict[str | None, list[int]] = {}
        for i, e in enumerate(examples):
            by_set.setdefault(e.adapter, []).append(i)
        out = []
        for idx in by_set.values():
            value = self.loss(module, [examples[i] for i in idx], pad, device, intervene_on)
            out.append(F.pad(value.reshape(1), (idx[0], len(examples) - idx[0] - 1)))
        return torch.stack(out).sum(0)

    def loss(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        """The loss of ``examples`` (one set's) summed over their terms."""
        return self.losses(module, examples, pad, device, intervene_on).sum()


class LanguageModeling(Objective):
    """Cross-entropy of the completion tokens given the prompt, with the interventions applied
    (the ReFT paper's objective). The average is over every completion token of the step."""

    name = "lm"

    def count(self, example: Example) -> int:
        return len(example.completion)

    def losses(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        logits, labels = forward(module, collate(examples, pad).to(device), intervene_on)
        return row_losses(logits, labels)


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
        self._reference = {}  # the base likelihoods are this run's model's: none carried over from another run

    def count(self, example: Example) -> int:
        return 1

    def losses(
        self, module: Any, examples: Sequence[Example], pad: int, device: torch.device, intervene_on: str = "prompt"
    ) -> Tensor:
        n = len(examples)
        reft = getattr(module, "module", module)  # the ReftModel (one process: never DDP-wrapped here)
        ref = self._references(reft, examples, pad, device)
        pick = torch.randint(len(self.alphas), (n,))
        alpha = torch.tensor(self.alphas)[pick]
        rows = (_pairs(examples)) * 2
        signs = torch.cat([alpha, alpha, -alpha, -alpha])
        lp = self._mean_logprob(reft, rows, signs, pad, device, intervene_on)
        toward_c, toward_r, away_c, away_r = lp[:n], lp[n : 2 * n], lp[2 * n : 3 * n], lp[3 * n :]
        beta_up = (ref[:, 1] - ref[:, 0]).clamp(min=self.beta_floor)
        beta_down = (ref[:, 0] - ref[:, 1]).clamp(min=self.beta_floor)
        up = beta_up * toward_c - toward_r
        down = beta_down * away_r - away_c
        return F.softplus(-up) + F.softplus(-down)

    def _mean_logprob(
        self,
        reft: "ReftModel",
        rows: Sequence[Example],
        alpha: Tensor,
        pad: int,
        device: torch.device,
        intervene_on: str = "prompt",
    ) -> Tensor:
        """Mean log-probability per completion token of each row, each row's edits scaled by its α."""
        view = reft.scaled(alpha.to(device))  # each row's edits scaled by its α; a bank's view keeps its sets
        logits, labels = forward(view, collate(rows, pad).to(device), intervene_on)
        target = labels != -100
        logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logp * target).sum(1) / target.sum(1).clamp(min=1)

    @torch.no_grad()
    def _references(self, reft: "ReftModel", examples: Sequence[Example], pad: int, device: torch.device) -> Tensor:
        """ℓ̄₀(completion), ℓ̄₀(rejected) under the unedited model, ``[n, 2]``, computed once per example."""
        todo = [e for e in dict.fromkeys(examples) if e not in self._reference]
        if todo:
            rows = _pairs(todo)
            lp = self._mean_logprob(reft, rows, torch.zeros(len(rows)), pad, device).cpu()
            for i, e in enumerate(todo):
                self._reference[e] = (float(lp[i]), float(lp[len(todo) + i]))
        return torch.tensor([self._reference[e] for e in examples], device=device)


def _pairs(examples: Sequence[Example]) -> list[Example]:
    """Each example with its completion, then each with its rejected completion (set kept)."""
    return [Example(e.prompt, e.completion, adapter=e.adapter) for e in examples] + [
        Example(e.prompt, e.rejected, adapter=e.adapter)  # type: ignore[arg-type]
        for e in examples
    ]


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
