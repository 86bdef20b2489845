"""Export: interventions on plain transformers models (no TransformerLens needed to run them): hooked
(`to_hf`), folded into the weights (`merge`), as a peft LoRA adapter (`to_peft`), or as a pyreft folder."""

from reftlens.errors import ExportError
from reftlens.export.hf import load_hf, save_hf, to_hf
from reftlens.export.lora import to_peft
from reftlens.export.merge import merge
from reftlens.export.pyreft import from_pyreft, read_pyreft, to_pyreft
from reftlens.runtime.hf import HFInterventions, pristine_hf

__all__ = [
    "to_hf",
    "save_hf",
    "load_hf",
    "merge",
    "to_peft",
    "pristine_hf",
    "HFInterventions",
    "ExportError",
    "from_pyreft",
    "to_pyreft",
    "read_pyreft",
]
