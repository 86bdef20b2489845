"""Re-run a TransformerLens bridge block by block from a recorded run.

An edit at (layer l, position p) leaves everything below block l, and every position before p,
exactly as in the run it edits. :class:`BlockReplay` records that run once — each block's input
(after the block's ``hook_in``), the arguments the model handed each block (mask, rotary tables,
positions), and each layer's keys and values — and then runs only what an edit can change:
blocks l..L−1, positions p..S−1, with the first p positions' keys and values taken from the
record. Rows of a replay each name the recorded example they continue (``base_rows``).

It calls the bridge's own block modules, so every TransformerLens hook inside a block fires as
in a normal forward (that is how interventions reach it). Whether the replay reproduces this
model's forward is checked against the recorded logits before it is used (:meth:`BlockReplay.verify`);
callers fall back to whole forwards when it does not.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from reftlens.errors import UnsupportedReplay
from reftlens.runtime.compat import kv_cache_fix

_CACHE_ARGS = ("past_key_values", "cache", "layer_past")
# arguments with a position axis, and which axis: sliced to the live positions in a prefix replay
_POSITION_ARGS = {"position_embeddings": -2, "position_ids": -1, "cache_position": -1}


class _PrefixKV:
    """A stand-in for a KV cache: the attention bridge calls ``update(k, v, layer)`` with the live
    positions' keys and values; this prepends the recorded prefix of each row's example (or,
    recording, keeps them)."""

    def __init__(self, keys: dict[int, tuple[Tensor, Tensor]] | None, start: int, base_rows: Tensor | None) -> None:
        self.keys = keys
        self.start = start
        self.base_rows = base_rows
        self.recorded: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.keys is None:  # recording the whole run
            self.recorded[layer_idx] = (key, value)
            return key, value
        if self.start == 0:
            return key, value
        rows = self.base_rows[: key.shape[0]]  # the rows running at this layer
        pk, pv = self.keys[layer_idx]
        pk, pv = pk[rows, :, : self.start], pv[rows, :, : self.start]
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class BlockReplay:
    """The run of ``tokens`` (unpadded, any batch), recorded so that any suffix of blocks and
    positions can be recomputed with hooks active.

    ``hooks(rows_entering)`` gives the ``(hook point, fn)`` pairs active during the recorded run
    (an empty list for a plain run); they are attached while recording.

    >>> replay = BlockReplay(model, corrupted_tokens)  # doctest: +SKIP
    >>> logits = replay.run({3: rows_entering_block_3}, start=4, base_rows=rows)  # doctest: +SKIP
    """

    def __init__(self, model: Any, tokens: Tensor, hooks: Sequence[tuple[Any, Callable]] = ()) -> None:
        from reftlens.runtime.tl_backend import hooked

        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(model, "ln_final") or not hasattr(model, "unembed"):
            raise UnsupportedReplay("the bridge has no blocks / ln_final / unembed stack")
        self.model = model
        self.blocks = list(blocks)
        self.batch, self.seq = tokens.shape
        calls: dict[int, tuple[tuple, dict]] = {}
        entered: dict[int, Tensor] = {}

        def record(i: int):
            def pre(module: Any, args: tuple, kwargs: dict) -> None:
                calls[i] = (args, kwargs)

            return pre

        def keep(i: int):
            def fn(h: Tensor, hook: Any = None) -> None:
                entered[i] = h.detach()

            return fn

        hook_dict = model.hook_dict
        points = [hook_dict.get(f"blocks.{i}.hook_in") for i in range(len(self.blocks))]
        if any(p is None for p in points):
            raise UnsupportedReplay("the blocks have no hook_in")
        handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            # the block inputs are read after every other hook_in hook (e.g. a corruption) ran
            with hooked(model, list(hooks) + [(p, keep(i)) for i, p in enumerate(points)]), torch.no_grad():
                self.logits = model(tokens)
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(self.blocks) or len(entered) != len(self.blocks):
            raise UnsupportedReplay("not every block was called once by the forward")
        self.inputs: list[Tensor] = []
        self.arguments: list[dict[str, Any]] = []
        for i, block in enumerate(self.blocks):
            hidden, named = _name_arguments(block, *calls[i])
            if hidden.shape != entered[i].shape:
                raise UnsupportedReplay("hook_in does not carry the block's input")
            self.inputs.append(entered[i])
            self.arguments.append(named)
        # keys and values of every layer: replay the run once, recording (also a first check)
        kv = _PrefixKV(None, 0, None)
        self.keys: dict[int, tuple[Tensor, Tensor]] = {}
        rows = torch.arange(self.batch, device=tokens.device)
        with hooked(model, [h for h in hooks if not _is_hook_in(h[0], 0)]), torch.no_grad():
            out = self._blocks(0, {0: self.inputs[0]}, kv, 0, rows)
        self.keys = kv.recorded
        if len(self.keys) != len(self.blocks):
            raise UnsupportedReplay("the attention layers did not report their keys and values to the cache")
        self._check(out, 0)

    def _arguments(self, layer: int, start: int, cache: _PrefixKV, rows: Tensor) -> dict[str, Any]:
        named = dict(self.arguments[layer])
        for name in _CACHE_ARGS:
            if name in named or name == "past_key_values":
                named[name] = cache
        for name, value in list(named.items()):
            if name in _POSITION_ARGS:  # unpadded rows share their positions: keep one row of them
                named[name] = _slice(_first_row(value, self.batch), _POSITION_ARGS[name], start)
            elif name == "attention_mask" and isinstance(value, Tensor):
                if value.ndim >= 4:
                    named[name] = value[..., start:, :] if value.shape[0] == 1 else value[rows][..., start:, :]
                elif value.ndim != 2:  # [batch, key] masks stay whole: keys still span every position
                    raise UnsupportedReplay(f"attention mask of shape {tuple(value.shape)}")
                elif value.shape[0] != 1:
                    named[name] = value[rows]
            elif start and _has_position_axis(value, self.seq):
                raise UnsupportedReplay(f"block argument {name!r} has a position axis this replay cannot slice")
        return named

    def _blocks(
        self,
        start_layer: int,
        entering: dict[int, Tensor],
        cache: _PrefixKV,
        start: int,
        base_rows: Tensor,
        read: Sequence[int] | None = None,
    ) -> Tensor:
        """Run blocks from ``start_layer`` to the end on positions ``start..``; ``entering[k]``
        are rows joining before block ``k`` (appended after the rows already running)."""
        h = None
        with kv_cache_fix(self.model):
            for k in range(start_layer, len(self.blocks)):
                if k in entering:
                    h = entering[k] if h is None else torch.cat([h, entering[k]], 0)
                if h is None:
                    continue
                out = self.blocks[k](h, **self._arguments(k, start, cache, base_rows[: h.shape[0]]))
                h = out[0] if isinstance(out, (tuple, list)) else out
        if read is not None:  # the final norm and unembedding act position by position
            h = h[:, [q - start for q in read]]
        return self.model.unembed(self.model.ln_final(h))

    def run(
        self, entering: dict[int, Tensor], start: int, base_rows: Tensor, read: Sequence[int] | None = None
    ) -> Tensor:
        """Logits ``[rows, S − start, vocab]`` for rows that join before the blocks named in
        ``entering`` (each ``[n_k, S − start, d_model]``, in block order); row i continues recorded
        example ``base_rows[i]``, whose keys and values stand in for positions before ``start``.
        With ``read`` (positions ≥ ``start``), only those positions are unembedded."""
        cache = _PrefixKV(self.keys, start, base_rows)
        return self._blocks(min(entering), entering, cache, start, base_rows, read)

    def entering(self, layer: int, start: int, base_rows: Tensor) -> Tensor:
        """The recorded input to block ``layer`` (positions ``start..``) of each example in ``base_rows``."""
        return self.inputs[layer][base_rows, start:].clone()

    def verify(self, start: int, hooks: Sequence[tuple[Any, Callable]] = ()) -> None:
        """Check that replaying from the middle reproduces the recorded logits (with the recorded
        run's ``hooks`` active, as a replay has them)."""
        from reftlens.runtime.tl_backend import hooked

        layer = len(self.blocks) // 2
        rows = torch.arange(self.batch, device=self.inputs[0].device)
        with hooked(self.model, [h for h in hooks if not _is_hook_in(h[0], layer)]), torch.no_grad():
            out = self.run({layer: self.entering(layer, start, rows)}, start, rows)
        self._check(out, start)

    def _check(self, out: Tensor, start: int) -> None:
        ref = self.logits[:, start:]
        scale = ref.abs().max().clamp_min(1.0)
        if out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-4 * float(scale), rtol=1e-4):
            raise UnsupportedReplay("replaying the blocks does not reproduce the model's forward")


def block_of(name: str) -> int | None:
    """The block a hook name lives in (``blocks.3.attn.hook_z`` → 3), or None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def _is_hook_in(point: Any, layer: int) -> bool:
    return getattr(point, "name", None) in (f"blocks.{layer}.hook_in", f"blocks.{layer}.hook_resid_pre")


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


def _first_row(value: Any, batch: int) -> Any:
    if isinstance(value, Tensor):
        return value[:1] if batch > 1 and value.ndim > 1 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_row(v, batch) for v in value)
    return value


def _slice(value: Any, dim: int, start: int) -> Any:
    if not start:
        return value
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
