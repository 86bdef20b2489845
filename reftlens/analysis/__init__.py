"""Causal analysis with the intervention algebra: patching sweeps (more to come: causal tracing, DAS)."""

from reftlens.analysis.patching import AnalysisError, PatchResult, patch_sweep

__all__ = ["patch_sweep", "PatchResult", "AnalysisError"]
