"""Every workaround for upstream behaviour, in one place.

Each entry names the behaviour, the versions it was measured on and what reftlens does about it,
so that it can be dropped when upstream changes. Measured with transformer-lens 4.3.0,
transformers 5.24 and torch 2.13 (2026-11).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn


@contextmanager
def kv_cache_fix(model: Any) -> Iterator[None]:
    """Make TransformerLens 4.3 attention read the KV cache under transformers 5.

    transformers 5 hands each attention layer its cache as ``cache=``; TL 4.3's attention
    bridges read only ``past_key_values`` (or ``layer_past``), so without this each decoded
    token attends to itself alone and generation silently ignores the prompt. For the span
    of the ``with`` block a forward pre-hook passes the cache under the name TL reads. The
    bridge hands HF its cache as ``past_key_values``, which transformers 5 deprecates with a
    FutureWarning on every call: silenced here, the only place reftlens does so.
    """

    def pass_cache(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = [
        b.attn.register_forward_pre_hook(pass_cache, with_kwargs=True)
        for b in getattr(model, "blocks", [])
        if hasattr(b, "attn")
    ]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for h in handles:
            h.remove()


def _zero_nan_rows(pattern: Tensor, hook: Any = None) -> Tensor:
    return torch.nan_to_num(pattern, nan=0.0)


def pad_row_guard(model: Any, mask: Tensor | None) -> list[tuple[Any, Any]]:
    """Hooks that keep left padding finite under reduced-precision autocast.

    TransformerLens 4.3's attention casts transformers' fp32 mask sentinel to the autocast dtype,
    where it overflows to -inf; a pad query with every key masked then softmaxes to NaN, and
    0 × NaN carries it into real tokens. A pad row's attention is never read, so setting its
    NaN pattern to 0 changes nothing else. Attached only when autocast is on and some row is padded.
    """
    from reftlens.runtime.kernel import autocast_on

    if mask is None or bool(mask.all()) or not autocast_on(mask.device.type):
        return []
    hook_dict = model.hook_dict
    points = [hook_dict.get(f"blocks.{i}.attn.hook_pattern") for i in range(model.cfg.n_layers)]
    return [(p, _zero_nan_rows) for p in points if p is not None]


def fast_attention(model: nn.Module) -> None:
    """TransformerLens 4.3 switches the model it wraps to eager attention (it hooks the pattern);
    a model rebuilt from the bridge's weights goes back to transformers' default fused kernel, as
    a freshly loaded model would."""
    if getattr(model.config, "_attn_implementation", None) == "eager":
        try:
            model.set_attn_implementation("sdpa")
        except (AttributeError, ValueError, ImportError):
            pass


def unwrapped_state(original: nn.Module, keep_vars: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The weights and buffers of a model TransformerLens 4.3 wrapped in place, under the original
    transformers names: the bridge inserts ``._original_component`` into every wrapped module's
    path (and ``save_pretrained`` on the wrapped model fails)."""
    state: dict[str, Tensor] = {}
    for k, v in original.state_dict(keep_vars=keep_vars).items():
        state.setdefault(k.replace("._original_component", ""), v)
    buffers: dict[str, Tensor] = {}
    for k, v in original.named_buffers():
        buffers.setdefault(k.replace("._original_component", ""), v)
    return state, buffers
