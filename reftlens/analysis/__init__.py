"""Causal analysis with the intervention algebra: patching sweeps causal tracing and DAS."""

from reftlens.analysis.activation_patching import AnalysisError, PatchResult, patch_heads, patch_sweep
from reftlens.analysis.das import DASResult, iia, principal_angles, train_das
from reftlens.analysis.tracing import TraceResult, causal_trace, corruption, restoration, subject_span

__all__ = [
    "patch_sweep",
    "patch_heads",
    "PatchResult",
    "AnalysisError",
    "causal_trace",
    "TraceResult",
    "corruption",
    "restoration",
    "subject_span",
    "train_das",
    "iia",
    "principal_angles",
    "DASResult",
]
