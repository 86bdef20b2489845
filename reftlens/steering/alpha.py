"""α sweeps in one batched generation: every (α, prompt) pair is a row of one batch, each row's
edit scaled by its own α (:meth:`reftlens.ReftModel.scaled`), not a loop of calls."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from reftlens.errors import ConfigError


def alpha_sweep(
    reft: Any,
    prompts: str | Sequence[str],
    alphas: Sequence[float],
    max_new_tokens: int = 32,
    *,
    batch_size: int | None = None,
    **generate_kwargs: Any,
) -> list[list[str]]:
    """Generate from every prompt at every α in batched generations: ``out[i][j]`` is prompt ``j``
    steered at ``alphas[i]``, each edit of ``reft`` scaled as Φ_α(h) = h + α·(Φ(h) − h) (for
    ``Steer(v)``: h + α·v). α = 0 is the base model.

    Rows are ``len(alphas) × len(prompts)``, ``batch_size`` rows a generation (default: all in
    one). Other arguments go to :meth:`reftlens.ReftModel.generate` (``intervene_on``,
    ``do_sample``, ``seed``, ...); with ``do_sample`` one seed serves the whole batch. A bank takes
    ``adapters=`` as for ``generate``, one set name (or None) per prompt: each prompt runs its set
    at every α.

    >>> steer = ReftModel(model, Intervention(Steer(direction.vector), layers=6, positions="all"))  # doctest: +SKIP
    >>> alpha_sweep(steer, ["Tell me a story."], [0, 4, 8], 24, intervene_on="all")                # doctest: +SKIP
    """
    from reftlens.generation import check_sampling_args
    from reftlens.interventions.base import finite_number

    check_sampling_args(
        max_new_tokens,
        generate_kwargs.get("do_sample", False),
        generate_kwargs.get("temperature", 1.0),
        generate_kwargs.get("top_k"),
        generate_kwargs.get("top_p"),
        generate_kwargs.get("seed"),
    )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be None or a positive integer (rows per generation); got {batch_size!r}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if isinstance(alphas, (int, float)) or not hasattr(alphas, "__iter__"):
        raise ConfigError(f"alphas must be a list of numbers (one generation per α); got {alphas!r}.")
    alphas = [finite_number(a, f"alphas[{i}]") for i, a in enumerate(alphas)]
    if not prompts or not alphas:
        raise ConfigError("alpha_sweep needs at least one prompt and one alpha.")
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError("alpha_sweep takes prompts as strings.")
    if any(u.takes_source for u in reft.units):
        raise ConfigError(f"alpha_sweep scales sourceless edits; intervention {reft.units[0].name!r} takes a source.")
    adapters = generate_kwargs.pop("adapters", None)
    if adapters is not None and (not isinstance(adapters, (list, tuple)) or len(adapters) != len(prompts)):
        raise ConfigError(
            f"alpha_sweep: adapters= takes one set name (or None) per prompt, {len(prompts)} here; got {adapters!r}."
        )
    rows = [(a, p, None if adapters is None else adapters[j]) for a in alphas for j, p in enumerate(prompts)]
    step = batch_size or len(rows)
    texts: list[str] = []
    for s in range(0, len(rows), step):
        chunk = rows[s : s + step]
        view = reft.scaled(torch.tensor([a for a, _, _ in chunk]))  # one α per row
        if adapters is not None:
            generate_kwargs["adapters"] = [name for _, _, name in chunk]
        texts += view.generate([p for _, p, _ in chunk], max_new_tokens, **generate_kwargs)
    return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(alphas))]
