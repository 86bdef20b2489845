"""Hook names: the one place that says what a ``hook=`` string means, for every API that takes one
(:class:`~reftlens.Intervention`, :func:`~reftlens.analysis.causal_trace`,
:func:`~reftlens.analysis.patch_sweep`, :func:`~reftlens.steering.collect`, the engine's sweeps).

A hook is named within a block and resolved at each layer:

- a short name: ``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_in"``,
  ``"attn_out"``, ``"mlp_in"``, ``"mlp_out"`` → ``blocks.{layer}.hook_{name}``;
- ROME's aliases: ``"resid"`` = ``"resid_post"``, ``"attn"`` = ``"attn_out"``, ``"mlp"`` = ``"mlp_out"``;
- any other hook inside a block by its TransformerLens name: ``"attn.hook_z"``, ``"hook_resid_pre"``;
- a template with ``{layer}``: ``"blocks.{layer}.mlp.hook_post"``.

A name the model lacks raises :class:`~reftlens.errors.ConfigError` with the closest matches
(:func:`unknown_hook`), not a dump of every hook point.
"""

from __future__ import annotations

import difflib
from typing import Iterable

from reftlens.errors import ConfigError

#: The short names, in the order a block computes them.
SHORT_HOOKS = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
#: Aliases (ROME's short names) and the short name each stands for.
HOOK_ALIASES = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
#: A line for error messages: the names a user most likely meant.
VALID_SHORT = (
    ", ".join(SHORT_HOOKS)
    + " (aliases: "
    + ", ".join(f"{a} = {c}" for a, c in HOOK_ALIASES.items())
    + "); any hook inside a block by its TransformerLens name, e.g. 'attn.hook_z'"
)


def canonical_hook(hook: str) -> str:
    """The name reftlens records for ``hook``: an alias becomes its short name (``"mlp"`` →
    ``"mlp_out"``); any other name is returned unchanged. Not a non-empty str:
    :class:`~reftlens.errors.ConfigError`."""
    if not isinstance(hook, str) or not hook:
        raise ConfigError(f"hook must be a hook name such as 'resid_post' or 'mlp_out'; got {hook!r}.")
    return HOOK_ALIASES.get(hook, hook)


def hook_name_for(hook: str, layer: int) -> str:
    """``"resid_post"`` → ``blocks.3.hook_resid_post``; ``"mlp"`` → ``blocks.3.hook_mlp_out``;
    ``"attn.hook_z"`` → ``blocks.3.attn.hook_z``; a ``{layer}`` template is formatted."""
    hook = canonical_hook(hook)
    if "{layer}" in hook:
        return hook.format(layer=layer)
    if hook.startswith("blocks."):
        raise ConfigError(
            f"hook {hook!r} names one layer; give the name within a block ('resid_post', "
            "'attn.hook_z') or a template with '{layer}', and choose layers with layers=."
        )
    if hook.startswith("hook_") or "." in hook:
        return f"blocks.{layer}.{hook}"
    return f"blocks.{layer}.hook_{hook}"


def suggest_hook(hook: str, layer: int, names: Iterable[str]) -> list[str]:
    """Up to three names close to ``hook`` that exist at ``layer`` (``names``: the model's hook
    names, e.g. ``model.hook_dict``), short names first."""
    names = set(names)
    prefix = f"blocks.{layer}."
    in_block = sorted(n[len(prefix) :] for n in names if n.startswith(prefix))
    candidates = [*SHORT_HOOKS, *HOOK_ALIASES, *in_block]
    exists = [c for c in candidates if hook_name_for(c, layer) in names]
    out: list[str] = []
    seen: set[str] = set()
    for c in difflib.get_close_matches(hook, exists, n=10, cutoff=0.6):
        full = hook_name_for(c, layer)
        if full not in seen:
            seen.add(full)
            out.append(c)
    return out[:3]


def unknown_hook(hook: str, layer: int, names: Iterable[str], *, who: str = "") -> ConfigError:
    """The error for a hook the model lacks at ``layer``: the closest names and the short list.
    ``who`` starts the message (``"intervention 'x': "``)."""
    names = set(names)
    close = suggest_hook(hook, layer, names)
    hint = ""
    if close:
        also = f" (or {', '.join(repr(c) for c in close[1:])})" if close[1:] else ""
        hint = f" Did you mean {close[0]!r}{also}?"
    n_block = sum(1 for n in names if n.startswith(f"blocks.{layer}."))
    return ConfigError(
        f"{who}hook {hook!r} at layer {layer} ({hook_name_for(hook, layer)}) does not exist on this model.{hint} "
        f"Valid short names: {VALID_SHORT} ({n_block} hooks at layer {layer}: see model.hook_dict)."
    )
