"""Back to Hugging Face: the interventions attached natively to a plain ``transformers`` model.

ReFT edits depend on positions, so they cannot be merged into weights (pyreft #99). The export
is the base model's own class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) rebuilt with
bit-identical weights outside TransformerLens, plus the Φs as a submodule
(``model.reft_interventions``) and forward hooks on the decoder layers that correspond to the
TransformerLens hook points. Each call resolves positions from its ``attention_mask``, so left
and right padding work; in KV-cached generation the prompt is edited in the first (prefill)
call and, with ``intervene_on="all"``, every generated token after it (``"generated"``: only those).

Nothing here imports TransformerLens: :func:`load_hf` rebuilds a working model from a folder
with transformers alone.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reftlens.errors import ExportError
from reftlens.runtime.compat import fast_attention
from reftlens.runtime.hf import HFInterventions, pristine_hf

REFT_DIR = "reft"
EXPORT_FILE = "reftlens_export.json"


def hf_fingerprint(config: Any) -> dict[str, Any]:
    """The same fingerprint as :func:`reftlens.saving.fingerprint`, read from an HF config."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return {"architecture": arch, "d_model": int(d), "n_layers": int(n), "d_vocab": int(config.vocab_size)}


def to_hf(reft: Any, *, intervene_on: str = "prompt") -> nn.Module:
    """The ReftModel's base as a plain transformers model with its interventions attached.

    >>> hf = reftlens.to_hf(reft)                                   # doctest: +SKIP
    >>> hf.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)  # doctest: +SKIP
    """
    hf = pristine_hf(reft.model)
    fast_attention(hf)
    units = []
    phis = {id(p): copy.deepcopy(p) for p in reft.phis}  # the export owns its Φs
    for u in reft.units:
        units.append(type(u)(u.name, phis[id(u.phi)], u.takes_source, u.layers, u.positions, u.source_positions,
                             u.hook, u.origin))
    module = HFInterventions(units, intervene_on=intervene_on, cast=reft.cast).to(next(hf.parameters()).device)
    hf.reft_interventions = module
    module.attach(hf)
    return hf


def save_hf(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, include_base: bool = True,
            base_reference: str | None = None) -> Path:
    """Save an exported model: the base (``save_pretrained``, without the Φs) and the
    interventions (safetensors + JSON) in ``path/reft``. With ``include_base=False`` only a
    reference to the base (``base_reference``: a hub id or a folder) is written."""
    from reftlens.saving import atomic_dir, write

    module = getattr(model, "reft_interventions", None)
    if not isinstance(module, HFInterventions):
        raise ExportError("this model carries no reftlens interventions; export one with reftlens.to_hf(reft).")
    if not include_base and not base_reference:
        raise ExportError("include_base=False needs base_reference= (a folder or hub id to load the base from).")

    def write_all(folder: Path) -> None:
        if include_base:
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("reft_interventions.")}
            model.save_pretrained(folder, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        (folder / REFT_DIR).mkdir()
        write(module, folder / REFT_DIR, base=hf_fingerprint(model.config), extra={"intervene_on": module.intervene_on})
        meta = {"base": "." if include_base else base_reference, "architecture": type(model).__name__}
        (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_dir(path, write_all)


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Load a model saved by :func:`save_hf`: transformers only, no TransformerLens."""
    from transformers import AutoModelForCausalLM

    from reftlens.saving import LoadError, interventions, read

    folder = Path(path)
    meta_path = folder / EXPORT_FILE
    if not meta_path.is_file():
        raise LoadError(f"{folder} is not a reftlens export: {EXPORT_FILE} is missing. Save with reftlens.save_hf(model, path).")
    meta = json.loads(meta_path.read_text())
    base = folder if meta["base"] == "." else meta["base"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    config, phis = read(folder / REFT_DIR, hf_fingerprint(model.config), dtype=dtype)
    units = [u for iv in interventions(config, phis) for u in iv.expand(hf_fingerprint(model.config)["n_layers"])]
    module = HFInterventions(units, intervene_on=config.get("intervene_on", "prompt"), cast=config.get("cast", False))
    module.to(next(model.parameters()).device)
    model.reft_interventions = module
    module.attach(model.eval())
    return model
