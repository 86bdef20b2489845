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

A ``save_hf`` folder cannot be mistaken for its base model: its ``config.json`` names a
``model_type`` transformers does not know (:data:`GUARD_MODEL_TYPE`, which says to use
``reftlens.load_hf``), so ``AutoModelForCausalLM.from_pretrained(folder)`` raises instead of
silently returning the base without the edits. The real ``model_type`` and ``architectures``
are kept under the ``"reftlens_export"`` key, from which :func:`load_hf` restores them. The
folder runs no code of its own (no ``auto_map``): loading a folder never executes code from it.
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
CONFIG_FILE = "config.json"
#: The ``model_type`` written into a ``save_hf`` folder's config.json. transformers does not know
#: it, so a plain ``from_pretrained`` fails and its message quotes this text.
GUARD_MODEL_TYPE = "reftlens-export: load this folder with reftlens.load_hf(folder), not transformers alone"
GUARD_ARCHITECTURE = "ReftlensExport_LoadWithReftlensLoadHf"
GUARD_KEY = "reftlens_export"
GUARD_NOTE = (
    "This folder is a reftlens export: the base model's weights (plain safetensors) plus interventions in reft/. "
    "Loaded by transformers alone it would be the base model without its edits, so model_type is replaced; "
    "reftlens.load_hf(folder) restores model_type and architectures from base_model_type and base_architectures and applies the edits."
)


def hf_fingerprint(config: Any, model: nn.Module | None = None) -> dict[str, Any]:
    """The same fingerprint as :func:`reftlens.saving.fingerprint`, read from an HF config (and,
    given the ``model``, its weight check)."""
    from reftlens.saving import weights_fingerprint

    arch = (getattr(config, "architectures", None) or [None])[0]
    d = getattr(config, "hidden_size", None) or config.n_embd
    n = getattr(config, "num_hidden_layers", None) or config.n_layer
    out = {"architecture": arch, "d_model": int(d), "n_layers": int(n), "d_vocab": int(config.vocab_size)}
    weights = weights_fingerprint(model) if model is not None else None
    return {**out, "weights": weights} if weights else out


def to_hf(reft: Any, *, intervene_on: str | None = None) -> nn.Module:
    """The ReftModel's base as a plain transformers model with its interventions attached.

    ``intervene_on``: the tokens every set edits in generation; by default each set's own
    (``reft.settings``, recorded by training; ``"prompt"`` if none), per set in a bank.

    >>> hf = reftlens.to_hf(reft)                                   # doctest: +SKIP
    >>> hf.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)  # doctest: +SKIP

    A bank's export takes one set name per example (None: the base model):

    >>> hf.generate(**batch, reft_adapters=["emoji", "sport", None], max_new_tokens=32)  # doctest: +SKIP
    """
    hf = pristine_hf(reft.model)
    fast_attention(hf)
    phis = {id(p): copy.deepcopy(p) for p in reft.phis}  # the export owns its Φs
    units = [dataclasses.replace(u, phi=phis[id(u.phi)]) for u in reft.units]
    module = HFInterventions(
        units, intervene_on=intervene_on, cast=reft.cast, named=reft.sets.named, settings=reft.settings
    ).to(next(hf.parameters()).device)
    hf.reft_interventions = module
    module.attach(hf)
    return hf


def _guard_config(folder: Path) -> None:
    """Make ``folder/config.json`` unloadable by plain transformers (see the module docstring); the
    original ``model_type`` / ``architectures`` move under :data:`GUARD_KEY`."""
    file = folder / CONFIG_FILE
    config = json.loads(file.read_text()) if file.is_file() else {}
    # not "model_type" inside: transformers' config classes adopt a nested dict whose model_type matches theirs
    config[GUARD_KEY] = {
        "note": GUARD_NOTE,
        "base_model_type": config.get("model_type"),
        "base_architectures": config.get("architectures"),
    }
    config["model_type"] = GUARD_MODEL_TYPE
    config["architectures"] = [GUARD_ARCHITECTURE]
    file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _unguarded_config(folder: Path) -> Any:
    """The base model's transformers config from a ``save_hf`` folder, or None when the folder's
    config.json carries no guard (an export written before the guard existed loads as it is)."""
    from transformers import AutoConfig

    if not (folder / CONFIG_FILE).is_file():
        return None  # transformers' own error names the missing file
    config = json.loads((folder / CONFIG_FILE).read_text())
    saved = config.pop(GUARD_KEY, None)
    if saved is None:
        return None
    if not saved.get("base_model_type"):
        raise LoadError(
            f"{folder / CONFIG_FILE}: the {GUARD_KEY!r} entry records no base_model_type; re-export the model."
        )
    config["model_type"] = saved["base_model_type"]
    if saved.get("base_architectures"):
        config["architectures"] = saved["base_architectures"]
    else:
        config.pop("architectures", None)
    cls = type(AutoConfig.for_model(config["model_type"]))
    return cls.from_dict(config)


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
    :class:`~reftlens.errors.SaveError` and is left untouched.

    The folder needs reftlens to load (:func:`load_hf`): its ``config.json`` names a model type
    transformers does not know, so ``AutoModelForCausalLM.from_pretrained(path)`` raises with a
    message that says to use ``reftlens.load_hf`` instead of silently giving the base model
    without the edits. The weights stay plain safetensors. For a folder transformers or peft load
    alone, fold the edits into the weights: :func:`reftlens.merge` / :func:`reftlens.save_peft`."""
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
        writer = write_bank if module.named else write
        # each set with its settings
        writer(module, folder / REFT_DIR, base=hf_fingerprint(model.config, model))
        meta = {"base": "." if include_base else base_reference, "architecture": type(model).__name__}
        (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _guard_config(folder)  # without include_base: a config.json that only says how to load the folder

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

    from reftlens.runtime.bank import DEFAULT
    from reftlens.saving import bank_folders, inside, interventions, is_bank, read, recover, settings_of
    from reftlens.sets import set_units

    folder = recover(path)  # a save_hf interrupted by a crash: its earlier output is restored
    meta_path = folder / EXPORT_FILE
    if not meta_path.is_file():
        raise LoadError(
            f"{folder} is not a reftlens export: {EXPORT_FILE} is missing. Save with reftlens.save_hf(model, path)."
        )
    meta = json.loads(inside(folder, EXPORT_FILE, str(meta_path)).read_text())
    base = folder if meta["base"] == "." else meta["base"]
    if Path(base).is_dir():
        _check_safetensors(Path(base))
    # a save_hf folder's config.json is guarded against plain transformers (the base may be another export)
    config = _unguarded_config(Path(base)) if Path(base).is_dir() else None
    extra = {} if config is None else {"config": config}
    # safetensors only: transformers must never fall back to unpickling a .bin
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto", use_safetensors=True, **extra)
    if device is not None:
        model.to(device)
    here = hf_fingerprint(model.config, model)
    reft_dir = inside(folder, REFT_DIR, f"{folder}: {REFT_DIR}")  # no link leading out of the export
    named = is_bank(reft_dir)
    saved = bank_folders(reft_dir) if named else {DEFAULT: reft_dir}
    units, settings = [], {}
    for name, sub in saved.items():
        config, phis = read(sub, here, dtype=dtype)
        units += set_units(interventions(config, phis), here["n_layers"], name, named=named)
        settings[name] = settings_of(config)
    module = HFInterventions(units, cast=config.get("cast", False), named=named, settings=settings)
    module.to(next(model.parameters()).device)
    model.reft_interventions = module
    module.attach(model.eval())
    return model
