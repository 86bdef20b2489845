"""Generation with interventions: batched, left padded, with a KV cache that stays correct.

By default the interventions edit the prompt positions only (the ReFT paper's setting): the
prompt's edited keys and values sit in the cache and every generated token reads them.
``intervene_on="all"`` also applies each sourceless Φ to every generated token at its layers;
``intervene_on="generated"`` edits the generated tokens only (steering that leaves the prompt as is).
With ``use_cache=False`` every step recomputes the whole sequence with the same edits; greedy
decoding gives the same tokens either way (tested), unlike pyreft's no-cache path.

Each set edits what its own ``intervene_on`` says (recorded by :func:`reftlens.train`, saved with
the set; ``"prompt"`` when none was recorded) unless the call gives one for all; in a bank each
row's set keeps its own, so one batch serves a set trained on the prompt and one trained on every
token. The choices travel as one :class:`~reftlens.runtime.bank.Call` to either backend.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import Tensor

from reftlens import inputs as inputs_mod
from reftlens.errors import ConfigError, ExportError
from reftlens.positions import RealTokens
from reftlens.runtime.bank import INTERVENE_ON, Call
from reftlens.runtime.compat import kv_cache_fix
from reftlens.runtime.plan import every_row, span
from reftlens.runtime.tl_backend import hooked, plan_hooks


def check_generate_args(
    reft: Any,
    prompts: Any,
    attention_mask: Tensor | None,
    prepend_bos: bool | None,
    max_new_tokens: Any,
    do_sample: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    seed: Any = None,
) -> None:
    """Refuse a bad generation argument with a :class:`~reftlens.errors.ConfigError` naming it,
    before anything runs: ``max_new_tokens`` a positive int (not a bool, float or string);
    ``do_sample`` a bool; ``temperature`` a finite number, > 0 when sampling; ``top_k`` None or an
    int ≥ 1; ``top_p`` None or a number in (0, 1]; ``seed`` None or an int; and the longest prompt
    plus ``max_new_tokens`` within the model's context (``model.cfg.n_ctx``)."""
    check_sampling_args(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
    n_ctx = getattr(reft.model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and prompts is not None:
        from reftlens.inputs import encode

        tokens, real = encode(reft.model, prompts, attention_mask, what="prompts", prepend_bos=prepend_bos)
        longest = int(real.mask.sum(1).max()) if tokens.numel() else 0
        if longest + max_new_tokens > n_ctx:
            raise ConfigError(
                f"the longest prompt is {longest} tokens and max_new_tokens={max_new_tokens}: {longest + max_new_tokens} "
                f"tokens, beyond the model's context of {n_ctx} (model.cfg.n_ctx). Shorten the prompt or lower "
                "max_new_tokens."
            )


def check_sampling_args(
    max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any, seed: Any = None
) -> None:
    """The argument checks of :func:`check_generate_args` that need no model (``alpha_sweep`` runs them too)."""
    import math

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer (a number of tokens); got {max_new_tokens!r}.")
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False; got {do_sample!r}.")
    if not is_real(temperature):
        raise ConfigError(f"temperature must be a finite number; got {temperature!r}.")
    if do_sample and temperature <= 0:
        raise ConfigError(
            f"temperature must be above 0 when sampling (do_sample=True); got {temperature!r}. For greedy decoding "
            "pass do_sample=False."
        )
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be None or an integer of at least 1 (the tokens kept); got {top_k!r}.")
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be None or a number in (0, 1] (the probability mass kept); got {top_p!r}.")
    if seed is not None and not is_int(seed):
        raise ConfigError(f"seed must be None or an integer; got {seed!r}.")


def to_left_padding(tokens: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to the right end (what batched decoding needs)."""
    mask = mask.bool()
    if not bool(mask[:, -1].all()):
        order = torch.argsort(mask.int(), dim=1, stable=True)  # pads first, real tokens keep their order
        tokens = torch.where(torch.gather(mask, 1, order), torch.gather(tokens, 1, order), pad_id)
        mask = torch.gather(mask, 1, order)
    return tokens, mask.long()


def next_token(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def generate(
    reft: Any,
    prompts: Any,
    max_new_tokens: int = 32,
    *,
    attention_mask: Tensor | None = None,
    sources: Any = None,
    source_attention_mask: Tensor | None = None,
    intervene_on: str | None = None,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = -1,
    backend: str = "auto",
    prepend_bos: bool | None = None,
    chat_template: bool | None = None,
    adapters: str | Sequence[str | None] | None = None,
) -> list[str] | Tensor:
    """See :meth:`reftlens.ReftModel.generate`. ``reft`` holds its sets as a
    :class:`~reftlens.runtime.bank.Bank` (``reft.sets``); one :class:`~reftlens.runtime.bank.Call`
    carries this generation's choices to either backend."""
    check_generate_args(
        reft, prompts, attention_mask, prepend_bos, max_new_tokens, do_sample, temperature, top_k, top_p, seed
    )
    if backend not in ("auto", "hf", "bridge"):
        raise ValueError(f"backend must be 'auto', 'hf' or 'bridge'; got {backend!r}.")
    if intervene_on is not None and intervene_on not in INTERVENE_ON:
        raise ValueError(f"intervene_on must be one of {INTERVENE_ON}; got {intervene_on!r}.")
    if chat_template not in (None, True, False):
        raise ConfigError(f"chat_template must be None (each set's own), True or False; got {chat_template!r}.")
    model, bank = reft.model, reft.sets
    call = bank.call(adapters, intervene_on)
    modes = call.modes(bank.settings)
    call = replace(call, intervene_on=modes)  # each set's mode, resolved here: the call says it all
    text_in = isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and bool(prompts) and isinstance(prompts[0], str)
    )
    pad = reft.pad_token_id
    if text_in and attention_mask is None:  # each row's template and start token as its set's training had
        tokens, real = _encode_per_set(reft, prompts, call, pad, prepend_bos, chat_template)
    else:
        tokens, real = reft.encode(prompts, attention_mask, prepend_bos=prepend_bos)
    tokens, mask = to_left_padding(tokens, real.mask, pad)
    batch = tokens.shape[0]
    with_source = [s.unit for s in bank.sites if s.unit.takes_source and modes[s.unit.adapter] != "prompt"]
    if with_source:
        mode = modes[with_source[0].adapter]
        raise ConfigError(
            f"intervene_on={mode!r} edits generated tokens, which have no source; intervention "
            f"{with_source[0].name!r} takes one. Use intervene_on='prompt'."
        )
    eos = _eos_ids(model, eos_token_id, tokens.device)
    generator = torch.Generator(tokens.device).manual_seed(seed) if seed is not None else None
    reft.check_devices()
    prompt_plan = bank.plan(
        tokens,
        sources,
        attention_mask=mask,
        source_attention_mask=source_attention_mask,
        prepend_bos=prepend_bos,  # for string sources
        call=call,
        check_finite=reft.check_finite,
    )
    edits_prompt = {n: m != "generated" for n, m in modes.items()}
    edits_generated = {n: m != "prompt" for n, m in modes.items()}
    generated_rows = {n: r for n, r in prompt_plan.rows.items() if edits_generated[n]}

    generated: list[Tensor] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    seq, seq_mask, cache = tokens, mask, None

    def advance(last_logits: Tensor) -> bool:
        """Pick the next tokens, append them; True when every row has finished."""
        nonlocal seq, seq_mask, finished
        new = next_token(last_logits, do_sample, temperature, top_k, top_p, generator)
        new = torch.where(finished, torch.full_like(new, pad), new)
        generated.append(new)
        if eos is not None:
            finished = finished | torch.isin(new, eos)
        if bool(finished.all()):
            return True
        seq = torch.cat([seq, new[:, None]], 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
        return False

    pair = _hf_backend(reft, backend) if use_cache and sources is None else None
    if backend == "hf" and pair is None:
        raise ConfigError("backend='hf' needs use_cache=True, no sources and interventions that can be exported.")
    if pair is not None:
        # the same interventions on a plain transformers twin sharing the weights: less Python per step
        hf = pair.hf
        with torch.no_grad():
            for step in range(max_new_tokens):
                pos = (seq_mask.cumsum(-1) - 1).clamp(min=0)
                # logits_to_keep=1: only the last position's logits are read (HF generate does the same)
                if step == 0:
                    out = hf(
                        input_ids=seq,
                        attention_mask=seq_mask,
                        position_ids=pos,
                        use_cache=True,
                        logits_to_keep=1,
                        reft_call=call,
                    )
                else:
                    out = hf(
                        input_ids=seq[:, -1:],
                        attention_mask=seq_mask,
                        position_ids=pos[:, -1:],
                        cache=cache,
                        use_cache=True,
                        logits_to_keep=1,
                        reft_call=call,
                    )
                cache = out.cache
                if advance(out.logits[:, -1]):
                    break
        return _finish(model, tokens, generated, eos, text_in)
    with kv_cache_fix(model), torch.no_grad():
        for step in range(max_new_tokens):
            if step == 0 or not use_cache:  # the whole sequence: prompt edits, and generated columns if edited
                hooks = plan_hooks(
                    span(prompt_plan, bank.sites, seq.shape[1], edits_prompt, edits_generated), reft.cast
                )
                inputs = seq
            else:  # one new token a row: every row of each set that edits generated tokens
                hooks = []
                if generated_rows:
                    hooks = plan_hooks(
                        every_row(bank.sites, bank.units, batch, 1, seq.device, generated_rows), reft.cast
                    )
                inputs = seq[:, -1:]
            with hooked(model, hooks):
                if use_cache:
                    logits, cache = model(
                        inputs, attention_mask=seq_mask, past_key_values=cache, return_type="logits_and_cache"
                    )
                else:
                    logits = model(inputs, attention_mask=seq_mask)
            if advance(logits[:, -1]):
                break
    return _finish(model, tokens, generated, eos, text_in)


def _encode_per_set(
    reft: Any, prompts: str | Sequence[str], call: Call, pad: int, prepend_bos: bool | None, chat_template: bool | None
) -> tuple[Tensor, RealTokens]:
    """String prompts as each row's set was trained on them, left padded: wrapped in the chat
    template where the set recorded ``chat_template=True`` (never a prompt already chat-formatted),
    with its recorded ``prepend_bos``; an explicit argument applies to every row (None and a base
    model row: the model's setting)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    names = [call.sets] * len(texts) if call.sets is None or isinstance(call.sets, str) else list(call.sets)
    if len(names) != len(texts):  # a bad choice of sets is named by the plan
        names = [None] * len(texts)
    settings = reft.sets.settings
    tok = reft.model.tokenizer
    rows = []
    for text, name in zip(texts, names):
        own = settings.get(name)
        wrap = chat_template if chat_template is not None else bool(own is not None and own.chat_template)
        if wrap and not inputs_mod.is_chat_formatted(tok, text):
            text = inputs_mod.chat_prompt(tok, text)
        start = prepend_bos if prepend_bos is not None else (own.prepend_bos if own is not None else None)
        rows.append(inputs_mod.text_tokens(reft.model, text, start))
    tokens, mask = inputs_mod.pad(rows, pad, "left", reft.device)
    return tokens, RealTokens.from_mask(mask.bool(), tokens)


def _hf_backend(reft: Any, backend: str) -> Any:
    """The plain-transformers twin of the bridge with these sets attached (None: use the bridge)."""
    if backend == "bridge":
        return None
    from reftlens.runtime.hf_backend import twin

    try:
        return twin(reft.model, reft.units, reft.cast)
    except ExportError:
        if backend == "hf":
            raise
        return None


def _finish(
    model: Any, tokens: Tensor, generated: list[Tensor], eos: Tensor | None, text_in: bool
) -> list[str] | Tensor:
    new_tokens = torch.stack(generated, 1)
    if not text_in:
        return torch.cat([tokens, new_tokens], 1)
    out = []
    for row in new_tokens.tolist():
        if eos is not None:
            stop = [i for i, t in enumerate(row) if t in set(eos.tolist())]
            row = row[: stop[0]] if stop else row
        out.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return out


def _eos_ids(model: Any, eos_token_id: Any, device: torch.device) -> Tensor | None:
    if eos_token_id == -1:  # the model's own
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, device=device)
