"""Re-run a TransformerLens bridge block by block from a recorded run.

A patch at (layer l, position p) leaves everything below block l, and every position before p,
exactly as in the corrupted run. :class:`BlockReplay` records the corrupted run once — each
block's input, the arguments the model handed it (mask, rotary tables, positions), and each
layer's keys and values — and then runs only what a patch can change: blocks l..L−1, positions
p..S−1, with the first p positions' keys and values taken from the record.

It calls the bridge's own block modules, so every TransformerLens hook inside a block fires as
in a normal forward (that is how patches and interventions reach it). Whether the replay
reproduces this model's forward is checked against the recorded logits before it is used
(:meth:`BlockReplay.verify`); the sweep falls back to whole forwards when it does not.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
from torch import Tensor

from reftlens.generation import kv_cache_fix

_CACHE_ARGS = ("past_key_values", "cache", "layer_past")
# arguments with a position axis, and which axis: sliced to the live positions in a prefix replay
_POSITION_ARGS = {"position_embeddings": -2, "position_ids": -1, "cache_position": -1}


class UnsupportedReplay(Exception):
    """This model's blocks cannot be replayed (the caller falls back to whole forwards)."""


class _PrefixKV:
    """A stand-in for a KV cache: the attention bridge calls ``update(k, v, layer)`` with the live
    positions' keys and values; this prepends the recorded prefix (or, recording, keeps them)."""

    def __init__(self, keys: dict[int, tuple[Tensor, Tensor]] | None, start: int) -> None:
        self.keys = keys
        self.start = start
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.keys is None:  # recording the whole corrupted run
            self.recorded[layer_idx] = (key, value)
            return key, value
        if self.start == 0:
            return key, value
        pk, pv = self.keys[layer_idx]
        n = key.shape[0]
        pk = pk[:, :, : self.start].expand(n, *pk.shape[1:2], self.start, pk.shape[-1])
        pv = pv[:, :, : self.start].expand(n, *pv.shape[1:2], self.start, pv.shape[-1])
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class BlockReplay:
    """The corrupted run of ``tokens`` (batch 1), recorded so that any suffix of blocks and
    positions can be recomputed with hooks active.

    >>> replay = BlockReplay(model, corrupted_tokens)  # doctest: +SKIP
    >>> logits = replay.run({3: rows_entering_block_3}, start=4)  # doctest: +SKIP
    """

    def __init__(self, model: Any, tokens: Tensor) -> None:
        if tokens.shape[0] != 1:
            raise UnsupportedReplay("block replay records one sequence (batch 1)")
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "ln_final") or not hasattr(model, "unembed"):
            raise UnsupportedReplay("the bridge has no blocks / ln_final / unembed stack")
        self.model = model
        self.blocks = list(blocks)
        self.seq = tokens.shape[1]
        calls: dict[int, tuple[tuple, dict]] = {}

        def record(i: int):
            def pre(module: Any, args: tuple, kwargs: dict) -> None:
                calls[i] = (args, kwargs)

            return pre

        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            self.logits = model(tokens)
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(self.blocks):
            raise UnsupportedReplay("not every block was called once by the forward")
        self.inputs: list[Tensor] = []
        self.arguments: list[dict[str, Any]] = []
        for i, block in enumerate(self.blocks):
            hidden, named = _name_arguments(block, *calls[i])
            self.inputs.append(hidden)
            self.arguments.append(named)
        # keys and values of every layer: replay the run once, recording (also a first check)
        kv = _PrefixKV(None, 0)
        self.keys: dict[int, tuple[Tensor, Tensor]] = {}
        out = self._blocks(0, {0: self.inputs[0]}, kv, 0)
        self.keys = kv.recorded
        if len(self.keys) != len(self.blocks):
            raise UnsupportedReplay("the attention layers did not report their keys and values to the cache")
        self._check(out, 0)

    def _arguments(self, layer: int, start: int, cache: _PrefixKV) -> dict[str, Any]:
        named = dict(self.arguments[layer])
        for name in _CACHE_ARGS:
            if name in named or name == "past_key_values":
                named[name] = cache
        if start:
            for name, value in list(named.items()):
                if name in _POSITION_ARGS:
                    dim = _POSITION_ARGS[name]
                    named[name] = _slice(value, dim, start)
                elif name == "attention_mask" and isinstance(value, Tensor):
                    if value.ndim >= 4:
                        named[name] = value[..., start:, :]
                    elif value.ndim != 2:  # [batch, key] masks stay whole: keys still span every position
                        raise UnsupportedReplay(f"attention mask of shape {tuple(value.shape)}")
                elif _has_position_axis(value, self.seq):
                    raise UnsupportedReplay(f"block argument {name!r} has a position axis this replay cannot slice")
        return named

    def _blocks(self, start_layer: int, entering: dict[int, Tensor], cache: _PrefixKV, start: int,
                read: Sequence[int] | None = None) -> Tensor:
        """Run blocks from ``start_layer`` to the end on positions ``start..``; ``entering[k]``
        are rows joining before block ``k`` (appended after the rows already running)."""
        h = None
        with kv_cache_fix(self.model):
            for k in range(start_layer, len(self.blocks)):
                if k in entering:
                    h = entering[k] if h is None else torch.cat([h, entering[k]], 0)
                if h is None:
                    continue
                out = self.blocks[k](h, **self._arguments(k, start, cache))
                h = out[0] if isinstance(out, (tuple, list)) else out
        if read is not None:  # the final norm and unembedding act position by position
            h = h[:, [q - start for q in read]]
        return self.model.unembed(self.model.ln_final(h))

    def run(self, entering: dict[int, Tensor], start: int = 0, read: Sequence[int] | None = None) -> Tensor:
        """Logits ``[rows, S − start, vocab]`` for rows that join before the blocks named in
        ``entering`` (each ``[n_k, S − start, d_model]``, in block order); positions before
        ``start`` keep the recorded run's keys and values. With ``read`` (positions ≥ ``start``),
        only those positions are unembedded: ``[rows, len(read), vocab]``."""
        cache = _PrefixKV(self.keys, start)
        return self._blocks(min(entering), entering, cache, start, read)

    def entering(self, layer: int, start: int, n: int) -> Tensor:
        """``n`` copies of the recorded input to block ``layer``, positions ``start..``."""
        return self.inputs[layer][:, start:].expand(n, -1, -1).clone()

    def verify(self, start: int) -> None:
        """Check that replaying from the middle reproduces the recorded logits."""
        layer = len(self.blocks) // 2
        out = self.run({layer: self.entering(layer, start, 1)}, start)
        self._check(out, start)

    def _check(self, out: Tensor, start: int) -> None:
        ref = self.logits[:, start:]
        scale = ref.abs().max().clamp_min(1.0)
        if out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-4 * float(scale), rtol=1e-4):
            raise UnsupportedReplay("replaying the blocks does not reproduce the model's forward")


def _name_arguments(block: Any, args: tuple, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """The hidden states and every other argument by name, bound to the wrapped layer's signature."""
    target = getattr(block, "original_component", None) or block
    try:
        sig = inspect.signature(target.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UnsupportedReplay(f"cannot bind the block's arguments: {e}") from e
    named = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, {}))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and named.get(p.name):
            raise UnsupportedReplay("the block takes extra positional arguments")
    first = next(iter(sig.parameters))
    hidden = named.pop(first, None)
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        raise UnsupportedReplay("the block's first argument is not the residual stream [batch, pos, d_model]")
    return hidden, named


def _slice(value: Any, dim: int, start: int) -> Any:
    if isinstance(value, Tensor):
        return value.narrow(dim % value.ndim, start, value.shape[dim] - start)
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, dim, start) for v in value)
    return value


def _has_position_axis(value: Any, seq: int) -> bool:
    if isinstance(value, Tensor):
        return value.ndim > 0 and seq in value.shape[1:]
    if isinstance(value, (tuple, list)):
        return any(_has_position_axis(v, seq) for v in value)
    return False

