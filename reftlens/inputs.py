"""Inputs: the one rule by which strings become token ids, and any input becomes a padded batch.

Every reftlens entry point that takes strings (``reft(...)``, ``reft.generate``, ``train``, the
analyses, ``collect``) tokenizes through :func:`text_tokens` and pads through :func:`tokenize`;
:func:`encode` turns any accepted input (strings, token ids, a tokenizer output) into token ids and
the positions of their real tokens. Use these to tokenize exactly as reftlens does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from reftlens.errors import ConfigError, PositionError
from reftlens.positions import RealTokens

#: ChatML's turn marker: chat templates of ChatML models (SmolLM2, Qwen) begin a conversation with it,
#: so a text that starts with it already has its start token (see :func:`text_tokens`)
CHAT_START = ("<|im_start|>",)


TRUNCATION = (None, "left", "right")


def text_tokens(
    model: Any,
    text: str,
    prepend_bos: bool | None = None,
    *,
    max_length: int | None = None,
    truncation: str | None = None,
) -> Tensor:
    """The token ids ``[seq]`` of one string, by the rule every reftlens entry point that takes
    strings follows (``reft(...)``, ``reft.tokenize``, ``reft.generate``, ``train``, the analyses):

    - ``prepend_bos=None`` (default): the model's own setting (``model.cfg.default_prepend_bos``,
      as TransformerLens's ``to_tokens``); ``True`` / ``False`` override it;
    - never a second start token: a text that already begins with the tokenizer's BOS string or
      with ChatML's ``<|im_start|>`` (where the tokenizer has it as one token) gets none added, so
      chat-formatted prompts (``tokenizer.apply_chat_template(..., tokenize=False)``) are tokenized
      as the chat template meant;
    - never silently cut: a text longer than ``max_length`` (default: the model's context,
      ``model.cfg.n_ctx``) raises :class:`~reftlens.errors.ConfigError` with its length and the
      limit, unless ``truncation`` says which side to cut: ``"left"`` keeps the last tokens (the
      start token goes with the first ones), ``"right"`` the first.

    >>> text_tokens(model, "hello")[:1].tolist() == [model.tokenizer.bos_token_id]   # doctest: +SKIP
    True
    """
    if prepend_bos is None:
        prepend_bos = getattr(model.cfg, "default_prepend_bos", True)
    if prepend_bos and text.startswith(_start_strings(model.tokenizer)):
        prepend_bos = False
    limit = context_limit(model, max_length, truncation)
    return fit(model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0], limit, truncation, "the text")


def context_limit(model: Any, max_length: Any = None, truncation: Any = None) -> int | None:
    """The most tokens an input may have: ``max_length`` if given (checked: a positive int, at most
    the model's context), else the context ``model.cfg.n_ctx``; ``truncation`` is checked too."""
    if truncation not in TRUNCATION:
        raise ConfigError(f"truncation must be None, 'left' or 'right'; got {truncation!r}.")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    n_ctx = n_ctx if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0 else None
    if max_length is None:
        return n_ctx
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer (a number of tokens) or None; got {max_length!r}.")
    if n_ctx is not None and max_length > n_ctx:
        raise ConfigError(
            f"max_length={max_length} is beyond the model's context of {n_ctx} tokens (model.cfg.n_ctx); "
            f"give at most {n_ctx}."
        )
    return max_length


def fit(row: Tensor, limit: int | None, truncation: str | None, what: str) -> Tensor:
    """``row`` (token ids ``[seq]``) if it has at most ``limit`` tokens; else cut on the side
    ``truncation`` names, or :class:`~reftlens.errors.ConfigError` with the length and the limit."""
    if limit is None or row.shape[0] <= limit:
        return row
    if truncation == "left":
        return row[-limit:]
    if truncation == "right":
        return row[:limit]
    raise ConfigError(
        f"{what} is {row.shape[0]} tokens long, beyond the limit of {limit} tokens (the model's context, "
        "model.cfg.n_ctx, or max_length=); reftlens never cuts an input silently. Shorten it, or pass "
        "truncation='left' (keep the last tokens) or 'right' (keep the first) with max_length= where strings go in."
    )


def _start_strings(tok: Any) -> tuple[str, ...]:
    """Strings that begin a model input: the BOS string, and ChatML's marker where it is one token."""
    unk = getattr(tok, "unk_token_id", None)
    chat = [s for s in CHAT_START if tok.convert_tokens_to_ids(s) not in (None, unk)]
    return tuple(s for s in (getattr(tok, "bos_token", None), *chat) if s)


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """Wrap a user prompt in the model's chat template, ready for the assistant's reply (what
    ``train(..., chat_template=True)`` does to every prompt, and ``generate`` to the prompts of a
    set trained so)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("chat_template=True, but this model's tokenizer has no chat template.")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def is_chat_formatted(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` already begins as a model input (the BOS string, or ChatML's turn marker):
    a chat-formatted prompt, which is never wrapped or given a start token a second time."""
    return text.startswith(_start_strings(tokenizer))


def pad_token_id(tokenizer: Any) -> int:
    """The id strings are padded with: the tokenizer's pad token, else its EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def device_of(model: Any) -> torch.device:
    return torch.device(model.cfg.device)


def tokenize(
    model: Any,
    texts: str | Sequence[str],
    *,
    padding_side: str = "left",
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    truncation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Tokenize strings by :func:`text_tokens` and pad them to one tensor on the model's device.
    Returns ``(tokens, attention_mask)``. ``max_length`` / ``truncation``: as :func:`text_tokens`
    (a text beyond the model's context is refused unless told which side to cut).

    >>> tokens, mask = tokenize(model, ["a b c", "a"])                       # doctest: +SKIP
    """
    if isinstance(texts, str):
        texts = [texts]
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
    rows = [text_tokens(model, t, prepend_bos, max_length=max_length, truncation=truncation) for t in texts]
    return pad(rows, pad_token_id(model.tokenizer), padding_side, device_of(model))


def encode(
    model: Any,
    inputs: Any,
    attention_mask: Tensor | None = None,
    *,
    what: str = "inputs",
    prepend_bos: bool | None = None,
    max_length: int | None = None,
    truncation: str | None = None,
) -> tuple[Tensor, RealTokens]:
    """Token ids ``[batch, seq]`` on the model's device and where their real tokens lie, from any
    input ``reft(...)`` takes: strings (tokenized by :func:`tokenize` with ``prepend_bos``, left
    padded), lists of token id lists (left padded), a tensor of token ids (with ``attention_mask``
    when padded) or a tokenizer output. Every row must fit ``max_length`` (default: the model's
    context ``model.cfg.n_ctx``), else :class:`~reftlens.errors.ConfigError`, unless
    ``truncation`` ("left" / "right") says which side of each row to cut."""
    limit = context_limit(model, max_length, truncation)
    if hasattr(inputs, "keys") and "input_ids" in inputs:  # a dict or a BatchEncoding
        attention_mask = inputs.get("attention_mask", attention_mask)
        inputs = inputs["input_ids"]
    device = device_of(model)
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise ConfigError(f"{what} is an empty {type(inputs).__name__}: give at least one string or row of token ids.")
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)
    ):
        if attention_mask is not None:
            raise ValueError(f"attention_mask given with string {what}; strings are padded by reftlens.")
        tokens, mask = tokenize(model, inputs, prepend_bos=prepend_bos, max_length=max_length, truncation=truncation)
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, (list, tuple)) for r in inputs):
        rows = [
            fit(torch.tensor(r, dtype=torch.long), limit, truncation, f"{what} row {i}") for i, r in enumerate(inputs)
        ]
        tokens, mask = pad(rows, pad_token_id(model.tokenizer), "left", device)
    elif isinstance(inputs, Tensor):
        tokens = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(f"{what} must be token ids [batch, seq]; got {tokens.dtype} {tuple(inputs.shape)}.")
        tokens = tokens.to(device)
        if attention_mask is None:
            refuse_unmasked_padding(model.tokenizer, tokens, what)
            mask = torch.ones_like(tokens, dtype=torch.bool)
        else:
            mask = attention_mask.unsqueeze(0) if attention_mask.ndim == 1 else attention_mask
            if mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask for {what} has shape {tuple(mask.shape)} but the tokens have {tuple(tokens.shape)}."
                )
            mask = mask.to(device).bool()
        if limit is not None and tokens.shape[1] > limit:  # cut (or refuse) each row's real tokens
            rows = [fit(t[m], limit, truncation, f"{what} row {i}") for i, (t, m) in enumerate(zip(tokens, mask))]
            tokens, mask = pad(rows, pad_token_id(model.tokenizer), "left", device)
            mask = mask.bool()
    else:
        raise TypeError(
            f"{what} must be a string, a list of strings, token ids or a tokenizer output; got {type(inputs).__name__}."
        )
    return tokens, RealTokens.from_mask(mask, tokens)


def refuse_unmasked_padding(tokenizer: Any, tokens: Tensor, what: str) -> None:
    """Raise if a batch of token ids starts or ends with the pad token but came without a mask."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None or pad_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        return  # pad is indistinguishable from a real token: nothing to detect
    edges = torch.cat([tokens[:, :1], tokens[:, -1:]], 1)
    if bool((edges == pad_id).any()):
        row = int((edges == pad_id).any(1).nonzero()[0])
        raise PositionError(
            f"{what} row {row} starts or ends with the pad token {pad_id} but no attention_mask was given. "
            "Pass attention_mask= (1 for real tokens) so positions are resolved against the real tokens."
        )


def pad(rows: Sequence[Tensor], pad_id: int, side: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pad rows of token ids to one tensor (``side``: "left" or "right"); returns ``(tokens, mask)``."""
    width = max(r.shape[0] for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - r.shape[0], width) if side == "left" else slice(0, r.shape[0])
        tokens[i, sl] = r.to(torch.long).cpu()
        mask[i, sl] = 1
    return tokens.to(device), mask.to(device)
