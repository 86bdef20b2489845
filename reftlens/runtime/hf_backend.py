"""The plain-transformers backend: execute plans with forward hooks on transformers modules.

A transformers causal LM (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...) gets the same
interventions as the TransformerLens bridge, as forward hooks on the decoder-layer modules that
correspond to the TransformerLens hook points. Each model call resolves a plan from its
``attention_mask`` (so left and right padding work); in KV-cached generation the prompt is edited
in the first (prefill) call and, with ``intervene_on="all"``, every generated token after it
(``"generated"``: the generated tokens only). A bank's model takes each row's set as
``reft_adapters=[...]`` in its forward and ``generate``.

Used by ``reft.generate`` (a twin of the bridge's model that shares its weights: a decode step
through plain transformers costs less Python) and by :mod:`reftlens.export`. Nothing here imports
TransformerLens.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ExportError
from reftlens.positions import RealTokens
from reftlens.runtime.bank import DEFAULT, INTERVENE_ON, Call, SetSettings, unique_phis
from reftlens.runtime.compat import fast_attention, unwrapped_state
from reftlens.runtime.kernel import site_hook
from reftlens.runtime.plan import Site, SitePlan, every_row, resolve

__all__ = ["INTERVENE_ON", "HFInterventions", "Twin", "twin", "pristine_hf", "decoder_layers", "native_site"]


# TL hook (within a block) → (which module of decoder layer L, how to hook it)
_SITES = {
    "hook_resid_post": ("layer", "output"),
    "hook_out": ("layer", "output"),
    "hook_resid_pre": ("layer", "input"),
    "hook_in": ("layer", "input"),
    "hook_attn_out": ("attn", "output"),
    "attn.hook_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "mlp.hook_out": ("mlp", "output"),
}


def native_site(hook: str) -> tuple[str, str] | None:
    """Where a TransformerLens block hook (``"mlp_out"``, ``"hook_resid_post"``, ...) sits in a
    transformers decoder layer: (``"layer"``/``"attn"``/``"mlp"``, ``"input"``/``"output"``), or
    None when it has no native equivalent."""
    tail = hook if hook.startswith("hook_") or "." in hook else f"hook_{hook}"
    return _SITES.get(tail)


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
    raise ExportError(
        f"{arch} is not supported for export: reftlens cannot find its decoder layers "
        "(supported: Llama-style model.layers, GPT-2 transformer.h, GPT-NeoX gpt_neox.layers)."
    )


def block_module(layer: nn.Module, kind: str, arch: str) -> nn.Module:
    """The decoder layer itself (``kind="layer"``), its attention or its MLP module."""
    if kind == "layer":
        return layer
    names = ("self_attn", "attn", "attention") if kind == "attn" else ("mlp",)
    for n in names:
        if hasattr(layer, n):
            return getattr(layer, n)
    raise ExportError(f"{arch}: decoder layer has no {kind} module ({', '.join(names)}); this hook cannot be exported.")


# per call, never on a module: the Call of an enclosing HFInterventions.using (transformers' generate), and
# the plans resolved for the model call in progress; each keyed by id(interventions module)
_NONE: Mapping[int, Any] = MappingProxyType({})
_CALLS: ContextVar[Mapping[int, Call]] = ContextVar("reftlens_calls", default=_NONE)
_ACTIVE: ContextVar[Mapping[int, dict[int, SitePlan]]] = ContextVar("reftlens_active_plans", default=_NONE)


class HFInterventions(nn.Module):
    """The Φs of an exported set (or bank), and the hooks that apply them inside a transformers model.

    ``named``: a bank, whose calls choose each row's set (``reft_adapters=``); otherwise a plain set
    (a bank of one under :data:`~reftlens.runtime.bank.DEFAULT`) that runs on every row.
    ``settings``: each set's :class:`~reftlens.runtime.bank.SetSettings`; ``intervene_on`` (if given)
    overrides every set's own. Nothing is written onto this module per call: each model call takes
    its choices as a :class:`~reftlens.runtime.bank.Call` (``reft_call=``, what reftlens's own
    generation passes), as ``reft_adapters=`` names, or from :meth:`using` around transformers'
    ``generate``; the plan resolved for that call lives in a context variable for its span."""

    def __init__(
        self,
        units: Sequence[Any],
        intervene_on: str | None = None,
        cast: bool = False,
        *,
        named: bool = False,
        settings: Mapping[str, SetSettings] | None = None,
    ):
        super().__init__()
        if intervene_on is not None and intervene_on not in INTERVENE_ON:
            raise ExportError(f"intervene_on must be one of {INTERVENE_ON}; got {intervene_on!r}.")
        with_source = [u.name for u in units if u.takes_source]
        if with_source:
            raise ExportError(
                f"intervention {with_source[0]!r} takes a source (patching/DII); only sourceless Φs "
                "(LoReFT, DiReFT, steering, ...) can be exported for inference."
            )
        self.units = list(units)
        self.phis = nn.ModuleList(unique_phis(self.units))
        self.cast = cast
        self.named = named
        self.sets = list(dict.fromkeys(u.adapter for u in self.units))  # in order
        given = dict(settings or {})
        # each set's settings, with the tokens it edits fixed for this model (saved with it by save_hf)
        self.settings = {
            n: replace(
                given.get(n, SetSettings()),
                intervene_on=intervene_on or given.get(n, SetSettings()).intervene_on or "prompt",
            )
            for n in self.sets
        }
        self._handles: list[Any] = []
        self._generate_of: Any = None  # a weak reference to the model whose generate takes reft_adapters=

    @property
    def bank(self) -> list[str]:
        """A bank's set names, in order (empty for a plain set)."""
        return list(self.sets) if self.named else []

    @property
    def intervene_on(self) -> str:
        """The tokens every set edits when they all agree (a plain set's one setting)."""
        modes = {s.intervene_on for s in self.settings.values()}
        return modes.pop() if len(modes) == 1 else "per set"

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (idempotent)."""
        self.detach()
        arch = type(model).__name__
        layers = decoder_layers(model)
        self.sites: list[Site] = []
        for u in sorted(self.units, key=lambda u: u.stack or 0):  # hooks run in registration order
            native = native_site(u.hook)
            if native is None:
                raise ExportError(
                    f"intervention {u.name!r}: hook {u.hook!r} has no native equivalent in {arch}; "
                    f"exportable hooks: resid_pre, resid_post, attn_out, mlp_out."
                )
            kind, where = native
            for layer in u.layers:
                if not 0 <= layer < len(layers):
                    raise ExportError(
                        f"intervention {u.name!r}: layer {layer} does not exist in {arch} ({len(layers)} layers)."
                    )
                module = block_module(layers[layer], kind, arch)
                site = Site(u, layer, f"layers.{layer}.{kind}.{where}", module)
                self.sites.append(site)
                fn = self._output_hook(site) if where == "output" else self._input_hook(site)
                if where == "output":
                    self._handles.append(module.register_forward_hook(fn))
                else:
                    self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        self._handles.append(model.register_forward_pre_hook(self._begin, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._end, always_call=True))
        if self.named:  # generate(..., reft_adapters=) would fail transformers' check of model kwargs
            model.generate = _generate_with_adapters(model, self)
            self._generate_of = weakref.ref(model)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        model = self._generate_of() if self._generate_of is not None else None
        if model is not None:
            model.__dict__.pop("generate", None)
        self._generate_of = None

    @contextlib.contextmanager
    def using(self, call: Call) -> Iterator[None]:
        """Run every model call inside the ``with`` block with ``call`` (the span of one ``generate``)."""
        token = _CALLS.set({**_CALLS.get(), id(self): call})
        try:
            yield
        finally:
            _CALLS.reset(token)

    def call_for(self, names: Any, repeat_rows: bool = False) -> Call:
        """The :class:`Call` for ``reft_adapters=`` names (None: a plain set's every row; a bank needs names)."""
        if not self.named:
            if names is not None:
                raise ExportError(
                    "reft_adapters= chooses a set per example, but this model carries one set, not a bank."
                )
            return Call(DEFAULT, repeat_rows=repeat_rows)
        return Call(names if names is None or isinstance(names, str) else tuple(names), repeat_rows=repeat_rows)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Before each model call: resolve this call's positions from its attention mask, and each
        row's set from ``reft_call=`` / ``reft_adapters=`` or the call of the enclosing :meth:`using`."""
        given = "reft_call" in kwargs or "reft_adapters" in kwargs
        if given:
            kwargs = dict(kwargs)
            call = kwargs.pop("reft_call", None)
            names = kwargs.pop("reft_adapters", None)
            if call is None:
                call = self.call_for(names)
        else:
            call = _CALLS.get().get(id(self)) or self.call_for(None)
        _ACTIVE.set({**_ACTIVE.get(), id(self): self._resolve(args, kwargs, call)})
        return (args, kwargs) if given else None

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        _ACTIVE.set({k: v for k, v in _ACTIVE.get().items() if k != id(self)})

    def _resolve(self, args: tuple, kwargs: dict, call: Call) -> dict[int, SitePlan]:
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
        rows = call.rows(self.sets, batch, ids.device)
        modes = call.modes(self.settings)
        if cached > 0:  # the new token(s): every row of each set that edits generated tokens
            rows = {n: r for n, r in rows.items() if modes[n] != "prompt"}
            plans = every_row(self.sites, self.units, batch, seq, ids.device, rows) if rows else []
        else:  # the prompt: the planned positions of each set that edits them
            rows = {n: r for n, r in rows.items() if modes[n] != "generated"}
            real = RealTokens.from_mask(mask.bool(), ids if not ids.is_floating_point() else None)
            plans, _ = resolve(self.sites, self.units, real, rows)  # relative positions can collide on a short prompt
        return {id(p.site): p for p in plans}  # a bank group runs at its first member's hook

    def _edit(self, site: Site, h: Tensor) -> Tensor | None:
        plan = _ACTIVE.get().get(id(self), {}).get(id(site))
        if plan is None:
            return None
        return site_hook(plan, self.cast)(h)

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


def _generate_with_adapters(model: nn.Module, module: HFInterventions) -> Any:
    """``model.generate`` that takes ``reft_adapters=`` (one set name per prompt): the names become
    the :class:`Call` of every model call of that generation (:meth:`HFInterventions.using`)."""
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args: Any, reft_adapters: Any = None, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (
            reft_adapters is not None
            and not isinstance(reft_adapters, str)
            and ids is not None
            and len(reft_adapters) != ids.shape[0]
        ):
            raise ExportError(
                f"reft_adapters names {len(reft_adapters)} sets but there are {ids.shape[0]} prompts; "
                "give one set name per prompt (None for the base model)."
            )
        with module.using(module.call_for(reft_adapters, repeat_rows=True)):
            return original(model, *args, **kwargs)

    return generate


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
    state, buffers = unwrapped_state(original, keep_vars=share)
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
                    raise ExportError(
                        f"cannot rebuild {type(original).__name__}: buffer {name} not found in the bridge."
                    )
                owner, _, leaf = name.rpartition(".")
                fresh.get_submodule(owner).register_buffer(leaf, buffers[name], persistent=False)
    else:
        fresh.load_state_dict({k: state[k] for k in wanted}, strict=True)
    if not getattr(fresh.config, "architectures", None):
        fresh.config.architectures = [type(fresh).__name__]
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return (fresh if share else fresh.to(first.device)).eval()


@dataclass(frozen=True)
class Twin:
    """A plain transformers model sharing a bridge's weights (``hf``) and the interventions attached to it."""

    hf: nn.Module
    interventions: HFInterventions


_TWINS: "weakref.WeakKeyDictionary[Any, tuple[tuple, Twin, tuple]]" = weakref.WeakKeyDictionary()


def twin(model: Any, units: Sequence[Any], cast: bool = False) -> Twin:
    """A plain transformers model sharing the bridge ``model``'s weights, with ``units``' Φs attached
    natively (the same Φ objects: training shows at once). Each call takes its choices as
    ``reft_call=`` (a :class:`~reftlens.runtime.bank.Call`), which reftlens's generation always passes.

    Cached per bridge (rebuilt when the base moves); when the set changes (another ReftModel, a set
    added to a bank) only the interventions are attached anew. The Φs stay owned by the caller
    (the twin holds them, not as its submodules).
    """
    first = next(model.parameters())
    base_key = (first.data_ptr(), first.device, first.dtype)
    units_key = (cast, tuple(id(u) for u in units), tuple(id(u.phi) for u in units))
    held = _TWINS.get(model)
    if held is not None and held[0] == base_key:
        hf = held[1].hf
        if held[2] == units_key:
            return held[1]
        held[1].interventions.detach()
    else:
        hf = pristine_hf(model, share=True)
        fast_attention(hf)
    module = HFInterventions(units, cast=cast)
    module.attach(hf)
    pair = Twin(hf, module)
    _TWINS[model] = (base_key, pair, units_key)
    return pair
