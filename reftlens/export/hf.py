"""Back to Hugging Face: the interventions attached natively to a plain ``transformers`` model.

ReFT edits depend on positions, so they cannot be merged into weights (pyreft #99). The export
is the base model's own class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) rebuilt with
bit-identical weights outside TransformerLens, plus the Φs as a submodule
(``model.reft_interventions``) and forward hooks on the decoder layers that correspond to the
TransformerLens hook points. Each call resolves positions from its ``attention_mask``, so left
and right padding work; in KV-cached generation the prompt is edited in the first (prefill)
call and, with ``intervene_on="all"``, every generated token after it.

Nothing here imports TransformerLens: :func:`load_hf` rebuilds a working model from a folder
with transformers alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ReftError
from reftlens.positions import RealTokens
from reftlens.runtime import Site, SitePlan, check_disjoint, flat_index, make_hook, site_masks

REFT_DIR = "reft"
EXPORT_FILE = "reftlens_export.json"


class ExportError(ReftError):
    """The interventions cannot be exported to this model."""


# TL hook (within a block) → (which module of decoder layer L, how to hook it)
_SITES = {
    "hook_resid_post": ("layer", "output"), "hook_out": ("layer", "output"),
    "hook_resid_pre": ("layer", "input"), "hook_in": ("layer", "input"),
    "hook_attn_out": ("attn", "output"), "attn.hook_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"), "mlp.hook_out": ("mlp", "output"),
}


def decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The decoder layers of a transformers causal LM (Llama/Qwen2/Mistral/Gemma, GPT-2, GPT-NeoX)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    arch = type(model).__name__
    raise ExportError(f"{arch} is not supported for export: reftlens cannot find its decoder layers "
                      "(supported: Llama-style model.layers, GPT-2 transformer.h, GPT-NeoX gpt_neox.layers).")


def _submodule(layer: nn.Module, kind: str, arch: str) -> nn.Module:
    if kind == "layer":
        return layer
    names = ("self_attn", "attn", "attention") if kind == "attn" else ("mlp",)
    for n in names:
        if hasattr(layer, n):
            return getattr(layer, n)
    raise ExportError(f"{arch}: decoder layer has no {kind} module ({', '.join(names)}); this hook cannot be exported.")


def hf_fingerprint(config: Any) -> dict[str, Any]:
    """The same fingerprint as :func:`reftlens.saving.fingerprint`, read from an HF config."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return {"architecture": arch, "d_model": int(d), "n_layers": int(n), "d_vocab": int(config.vocab_size)}


class HFInterventions(nn.Module):
    """The Φs of an exported set, and the hooks that apply them inside a transformers model."""

    def __init__(self, units: Sequence[Any], intervene_on: str = "prompt", cast: bool = False):
        super().__init__()
        if intervene_on not in ("prompt", "all"):
            raise ExportError(f"intervene_on must be 'prompt' or 'all'; got {intervene_on!r}.")
        with_source = [u.name for u in units if u.takes_source]
        if with_source:
            raise ExportError(f"intervention {with_source[0]!r} takes a source (patching/DII); only sourceless Φs "
                              "(LoReFT, DiReFT, steering, ...) can be exported for inference.")
        self.units = list(units)
        unique: dict[int, nn.Module] = {}
        for u in self.units:
            unique.setdefault(id(u.phi), u.phi)
        self.phis = nn.ModuleList(unique.values())
        self.intervene_on = intervene_on
        self.cast = cast
        self._handles: list[Any] = []
        self._plans: dict[int, SitePlan] = {}
        self._shape: tuple[int, int] | None = None
        self._decode = False

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (idempotent)."""
        self.detach()
        arch = type(model).__name__
        layers = decoder_layers(model)
        self.sites: list[Site] = []
        for u in sorted(self.units, key=lambda u: u.stack or 0):  # hooks run in registration order
            tail = u.hook if u.hook.startswith("hook_") or "." in u.hook else f"hook_{u.hook}"
            if tail not in _SITES:
                raise ExportError(f"intervention {u.name!r}: hook {u.hook!r} has no native equivalent in {arch}; "
                                  f"exportable hooks: resid_pre, resid_post, attn_out, mlp_out.")
            kind, where = _SITES[tail]
            for layer in u.layers:
                if not 0 <= layer < len(layers):
                    raise ExportError(f"intervention {u.name!r}: layer {layer} does not exist in {arch} ({len(layers)} layers).")
                module = _submodule(layers[layer], kind, arch)
                site = Site(u, layer, f"layers.{layer}.{kind}.{where}", module)
                self.sites.append(site)
                fn = self._output_hook(site) if where == "output" else self._input_hook(site)
                if where == "output":
                    self._handles.append(module.register_forward_hook(fn))
                else:
                    self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        self._handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Before each model call: resolve this call's positions from its attention mask."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        batch, seq = ids.shape[0], ids.shape[1]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if mask is not None:
            cached = mask.shape[1] - seq
            mask = mask[:, cached:]
        else:
            cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = torch.ones(batch, seq, dtype=torch.long, device=ids.device)
        self._decode = cached > 0
        self._shape = (batch, seq)
        if self._decode:
            self._plans = {id(s): SitePlan(s, None) for s in self.sites}  # the new token(s): every row
            return
        real = RealTokens.from_mask(mask.bool(), ids if not ids.is_floating_point() else None)
        masks = site_masks(self.units, real)
        check_disjoint(self.sites, masks, real)  # relative positions can collide on a short prompt
        self._plans = {id(s): SitePlan(s, flat_index(masks[id(s.unit)])) for s in self.sites}

    def _edit(self, site: Site, h: Tensor) -> Tensor | None:
        if self._decode and self.intervene_on == "prompt":
            return None
        return make_hook(self._plans[id(site)], self._shape, self.cast)(h)

    def _output_hook(self, site: Site) -> Any:
        def fn(module: nn.Module, args: tuple, output: Any) -> Any:
            if isinstance(output, tuple):
                new = self._edit(site, output[0])
                return None if new is None else (new, *output[1:])
            return self._edit(site, output)

        return fn

    def _input_hook(self, site: Site) -> Any:
        def fn(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = self._edit(site, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = self._edit(site, kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return fn


def pristine_hf(bridge: Any, *, share: bool = False) -> nn.Module:
    """A fresh transformers model with the bridge's weights, outside TransformerLens.

    TransformerLens 4 wraps the HF model in place (its modules become bridge components, and
    ``save_pretrained`` on it fails); this rebuilds the original class from its config and copies
    every weight, bit for bit. With ``share=True`` the new model uses the bridge's own weight
    tensors (no copy; for a frozen base, e.g. fast generation next to the bridge).
    """
    from transformers import AutoModelForCausalLM

    if getattr(bridge, "compatibility_mode", False):
        raise ExportError(
            "this model runs in TransformerLens compatibility mode (folded and centred weights), so its hidden "
            "states — and interventions trained on them — live in a different basis from the Hugging Face model. "
            "reftlens refuses to export them rather than give wrong numbers; train on a bridge without "
            "enable_compatibility_mode() to export."
        )
    original = bridge.original_model
    first = next(original.parameters())
    state: dict[str, Tensor] = {}
    for k, v in original.state_dict(keep_vars=share).items():
        state.setdefault(k.replace("._original_component", ""), v)
    buffers: dict[str, Tensor] = {}
    for k, v in original.named_buffers():
        buffers.setdefault(k.replace("._original_component", ""), v)
    config = copy.deepcopy(original.config)  # the new model's settings never leak back into the bridge's
    with torch.device("meta") if share else contextlib.nullcontext():
        fresh = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    wanted = fresh.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ExportError(f"cannot rebuild {type(original).__name__}: weights {missing[:3]} not found in the bridge.")
    if share:
        fresh.load_state_dict({k: state[k] for k in wanted}, strict=True, assign=True)
        for name, buf in list(fresh.named_buffers()):
            if buf.is_meta:  # non-persistent buffers (e.g. RoPE frequencies) are not in the state dict
                if name not in buffers:
                    raise ExportError(f"cannot rebuild {type(original).__name__}: buffer {name} not found in the bridge.")
                owner, _, leaf = name.rpartition(".")
                fresh.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    else:
        fresh.load_state_dict({k: state[k] for k in wanted}, strict=True)
    if not getattr(fresh.config, "architectures", None):
        fresh.config.architectures = [type(fresh).__name__]
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return (fresh if share else fresh.to(first.device)).eval()


def _fast_attention(model: nn.Module) -> None:
    """TransformerLens switched the wrapped model to eager attention; a rebuilt model (with its own
    config) goes back to transformers' default fused kernel, as a freshly loaded model would."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        try:
            model.set_attn_implementation("sdpa")
        except (AttributeError, ValueError, ImportError):
            pass


def hf_twin(reft: Any) -> nn.Module:
    """A plain transformers model sharing ``reft``'s base weights and Φs, with native hooks.

    Cached on the ReftModel (rebuilt when the base moves); used by ``reft.generate`` because a
    decode step through plain transformers costs less Python than through the bridge.
    """
    first = next(reft.model.parameters())
    key = (first.data_ptr(), first.device, first.dtype, tuple(id(p) for p in reft.phis))
    twin = reft.__dict__.get("_hf_twin")
    if twin is not None and reft.__dict__.get("_hf_twin_key") == key:
        return twin
    twin = pristine_hf(reft.model, share=True)
    _fast_attention(twin)
    module = HFInterventions(reft.units, cast=reft.cast)  # the same Φ objects: training shows at once
    object.__setattr__(twin, "_reftlens_module", module)  # not a submodule: the Φs stay owned by reft
    module.attach(twin)
    reft.__dict__["_hf_twin"], reft.__dict__["_hf_twin_key"] = twin, key  # not a submodule of reft either
    return twin


def to_hf(reft: Any, *, intervene_on: str = "prompt") -> nn.Module:
    """The ReftModel's base as a plain transformers model with its interventions attached.

    >>> hf = reftlens.to_hf(reft)                                   # doctest: +SKIP
    >>> hf.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32)  # doctest: +SKIP
    """
    import copy

    hf = pristine_hf(reft.model)
    _fast_attention(hf)
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
