"""Export: interventions on plain transformers models (no TransformerLens needed to run them)."""

from reftlens.export.hf import ExportError, HFInterventions, load_hf, pristine_hf, save_hf, to_hf
from reftlens.export.pyreft import from_pyreft, read_pyreft, to_pyreft

__all__ = ["to_hf", "save_hf", "load_hf", "pristine_hf", "HFInterventions", "ExportError", "from_pyreft", "to_pyreft",
           "read_pyreft"]
