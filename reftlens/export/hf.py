"""Back to Hugging Face: the interventions attached natively to a plain ``transformers`` model.

ReFT edits that depend on positions cannot be merged into weights (pyreft #99); those that act
at every position on ``attn_out`` / ``mlp_out`` can (:func:`reftlens.merge`,
:func:`reftlens.save_peft`). This export keeps any sourceless set: it is the base model's own
class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) rebuilt with bit-identical weights
outside TransformerLens, plus the Φs as a submodule
(``model.reft_interventions``) and forward hooks on the decoder layers that correspond to the
TransformerLens hook points. Each call resolves positions from its ``attention_mask``, so left
and right padding work; in KV-cached generation the prompt is edited in the first (prefill)
call and, with ``intervene_on="all"``, every generated token after it (``"generated"``: only those).
The export of a bank takes each example's set as ``reft_adapters=[...]`` in its forward and its ``generate``.

Nothing here imports TransformerLens: :func:`load_hf` rebuilds a working model from a folder
with transformers alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reftlens.errors import ExportError, LoadError
from reftlens.runtime.compat import fast_attention
from reftlens.runtime.hf_backend import HFInterventions, pristine_hf

REFT_DIR = "reft"
EXPORT_FILE = "reftlens_export.json"


def hf_fingerprint(config: Any) -> dict[str, Any]:
    """The same fingerprint as :func:`reftlens.saving.fingerprint`, read from an HF config."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    d = getattr(config, "hidden_size", None) or config.n_embd
    n = getattr(config, "num_hidden_layers", None) or config.n_layer
    return {"architecture": arch, "d_model": int(d), "n_layers": int(n), "d_vocab": int(config.vocab_size)}


def to_hf(reft: Any, *, intervene_on: str = "prompt") -> nn.Module:
    """The ReftModel's base as a plain transformers model with its interventions attached.

    >>> hf = reftlens.to_hf(reft)                                   # doctest: +SKIP
    >>> hf.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)  # doctest: +SKIP

    A bank's export takes one set name per example (None: the base model):

    >>> hf.generate(**batch, reft_adapters=["emoji", "sport", None], max_new_tokens=32)  # doctest: +SKIP
    """
    hf = pristine_hf(reft.model)
    fast_attention(hf)
    phis = {id(p): copy.deepcopy(p) for p in reft.phis}  # the export owns its Φs
    units = [dataclasses.replace(u, phi=phis[id(u.phi)]) for u in reft.units]
    module = HFInterventions(units, intervene_on=intervene_on, cast=reft.cast).to(next(hf.parameters()).device)
    hf.reft_interventions = module
    module.attach(hf)
    return hf


def save_hf(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    include_base: bool = True,
    base_reference: str | None = None,
) -> Path:
    """Save an exported model: the base (``save_pretrained``, without the Φs) and the
    interventions (safetensors + JSON) in ``path/reft``. With ``include_base=False`` only a
    reference to the base (``base_reference``: a hub id or a folder) is written.

    ``path`` must be new, an empty folder or an earlier ``save_hf`` output (it holds
    ``reftlens_export.json``), which is replaced whole; anything else raises
    :class:`~reftlens.errors.SaveError` and is left untouched."""
    from reftlens.saving import atomic_dir, write, write_bank

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
        writer = write_bank if module.bank else write
        writer(
            module, folder / REFT_DIR, base=hf_fingerprint(model.config), extra={"intervene_on": module.intervene_on}
        )
        meta = {"base": "." if include_base else base_reference, "architecture": type(model).__name__}
        (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    return atomic_dir(path, write_all, markers=[EXPORT_FILE])


_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_safetensors(folder: Path) -> None:
    """Refuse a base folder without safetensors weights (pickled ones above all: reftlens loads
    safetensors only)."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix in _PICKLED)
    if pickled:
        raise LoadError(
            f"{folder / pickled[0]}: the base model's weights are a pickled checkpoint ({', '.join(pickled)}) and "
            f"{folder} has no .safetensors file. reftlens loads safetensors only, so loading a folder never runs "
            "code from it. Re-save the base model as safetensors: model.save_pretrained(folder) writes "
            "model.safetensors by default (transformers 4: safe_serialization=True)."
        )
    raise LoadError(
        f"{folder} holds no base-model weights (model.safetensors); save the base with "
        "model.save_pretrained(folder), or export with reftlens.save_hf(model, path)."
    )


def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> nn.Module:
    """Load a model saved by :func:`save_hf`: transformers only, no TransformerLens.

    The base model's weights are read from safetensors only: a base folder holding a pickled
    ``pytorch_model.bin`` (and no ``.safetensors``) raises :class:`~reftlens.errors.LoadError`
    naming the file; re-save it with ``save_pretrained`` (safetensors is its default).
    ``dtype``: the base's precision (default: the one it was saved in, so a bf16 export loads in
    bf16); the Φs keep their saved dtype unless ``dtype`` is given."""
    from transformers import AutoModelForCausalLM

    from reftlens.saving import bank_folders, interventions, is_bank, read
    from reftlens.sets import set_units

    folder = Path(path)
    meta_path = folder / EXPORT_FILE
    if not meta_path.is_file():
        raise LoadError(
            f"{folder} is not a reftlens export: {EXPORT_FILE} is missing. Save with reftlens.save_hf(model, path)."
        )
    meta = json.loads(meta_path.read_text())
    base = folder if meta["base"] == "." else meta["base"]
    if Path(base).is_dir():
        _check_safetensors(Path(base))
    # safetensors only: transformers must never fall back to unpickling a .bin
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto", use_safetensors=True)
    if device is not None:
        model.to(device)
    here = hf_fingerprint(model.config)
    saved = bank_folders(folder / REFT_DIR) if is_bank(folder / REFT_DIR) else {None: folder / REFT_DIR}
    units = []
    for name, sub in saved.items():
        config, phis = read(sub, here, dtype=dtype)
        units += set_units(interventions(config, phis), here["n_layers"], name)
    module = HFInterventions(units, intervene_on=config.get("intervene_on", "prompt"), cast=config.get("cast", False))
    module.to(next(model.parameters()).device)
    model.reft_interventions = module
    module.attach(model.eval())
    return model
