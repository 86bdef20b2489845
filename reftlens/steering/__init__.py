"""Steering, end to end: find a concept's direction, detect it, steer with it, sweep α.

- directions from activations at any ⟨hook, layers, positions⟩: :func:`collect`, then
  :func:`diff_mean` (CAA / DiffMean), :func:`pca` (RepE's LAT: first component of paired
  differences) or :func:`probe` (logistic regression), each a :class:`Direction` with its statistics;
- detection: :meth:`Activations.scores` (projection, max or mean over tokens) and :func:`auroc`;
- steering: ``Steer(direction.vector, alpha)`` over the positions an Intervention names and the
  tokens ``generate(intervene_on=...)`` names (``"prompt"``, ``"generated"``, ``"all"``);
  :func:`alpha_sweep` runs many α in one batched generation; ``ProjectOut`` suppresses;
- trained steering: ``ReFTr1`` (AxBench's rank-1 detector-and-steerer) and
  ``train(..., objective="preference")`` (RePS-style, bidirectional).
"""

from reftlens.steering.alpha import alpha_sweep
from reftlens.steering.directions import Activations, Direction, auroc, collect, diff_mean, pca, probe

__all__ = ["collect", "Activations", "Direction", "diff_mean", "pca", "probe", "auroc", "alpha_sweep"]
