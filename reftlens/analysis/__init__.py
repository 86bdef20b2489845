"""Causal analysis with the intervention algebra: patching sweeps and causal tracing (DAS next)."""

from reftlens.analysis.patching import AnalysisError, PatchResult, patch_sweep
from reftlens.analysis.tracing import TraceResult, causal_trace, corruption, restoration, subject_span

__all__ = ["patch_sweep", "PatchResult", "AnalysisError", "causal_trace", "TraceResult", "corruption", "restoration",
           "subject_span"]
