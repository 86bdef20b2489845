"""Export: interventions on plain transformers models (no TransformerLens needed to run them): hooked
(`to_hf`), folded into the weights (`merge`), as a peft LoRA adapter (`save_peft`), or as a pyreft folder (`save_pyreft`, `load_pyreft`)."""

from reftlens.deprecation import deprecated_alias
from reftlens.errors import ExportError
from reftlens.export.hf import load_hf, save_hf, to_hf
from reftlens.export.lora import save_peft
from reftlens.export.merge import merge
from reftlens.export.pyreft import load_pyreft, read_pyreft, save_pyreft
from reftlens.runtime.hf_backend import HFInterventions, pristine_hf

# the names before 0.2: `save_*` writes a folder, `to_*` returns an object (docs/changelog.md)
to_peft = deprecated_alias(save_peft, "to_peft")
to_pyreft = deprecated_alias(save_pyreft, "to_pyreft")
from_pyreft = deprecated_alias(load_pyreft, "from_pyreft")

__all__ = [
    "to_hf",
    "save_hf",
    "load_hf",
    "merge",
    "save_peft",
    "pristine_hf",
    "HFInterventions",
    "ExportError",
    "load_pyreft",
    "save_pyreft",
    "read_pyreft",
    "to_peft",
    "to_pyreft",
    "from_pyreft",
]
