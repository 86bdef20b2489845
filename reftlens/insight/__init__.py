"""Interpretability for training: :func:`localize` (where to train) and :func:`inspect` (what a
trained set learned). A layer above both training and analysis: it trains (the short-training
score) and reads what the analyses read, all through the engine."""

from reftlens.insight.inspection import InspectReport, InterventionReport, SetReport, inspect, neutral_texts
from reftlens.insight.localize import Candidate, LocalizeResult, localize

__all__ = [
    "localize",
    "LocalizeResult",
    "Candidate",
    "inspect",
    "InspectReport",
    "InterventionReport",
    "SetReport",
    "neutral_texts",
]
