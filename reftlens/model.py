"""ReftModel: a set of interventions held against a TransformerLens model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ConfigError, PositionError
from reftlens.interventions.base import phi_label
from reftlens.interventions.steering import Scaled
from reftlens.positions import RealTokens
from reftlens.runtime.plan import Plan, SitePlan, resolve
from reftlens.runtime.tl import bind, execute, gather_sources, hooked, plan_hooks
from reftlens.sets import Intervention, check_static_disjoint


class ReftModel(nn.Module):
    """A frozen TransformerLens model plus a set of interventions ⟨Φ, P, L⟩.

    Only the Φs are submodules: ``reft.parameters()`` is what trains, ``reft.to(...)``
    moves the Φs. The base model is frozen (``requires_grad`` off) and otherwise untouched: its
    hooks are added per call and removed afterwards.

    Args:
        model: a TransformerLens ``TransformerBridge`` (see :func:`reftlens.load_model`).
        interventions: one :class:`Intervention` or a list of them.
        cast: run each Φ in its own dtype (rows are cast in and out), e.g. fp32 Φs on a bf16
            model. By default a dtype mismatch is an error.
        move: move the Φs to the model's device (default True).

    >>> import reftlens
    >>> model = reftlens.load_model("tiny-llama")
    >>> reft = reftlens.ReftModel(model, reftlens.Intervention(reftlens.LoReFT(64, 4), layers=[1, 2], positions="f2+l2"))
    >>> reft(["the quick brown fox", "a dog"]).shape[:2]
    torch.Size([2, 13])
    """

    def __init__(self, model: Any, interventions: Intervention | Sequence[Intervention], *, cast: bool = False, move: bool = True):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: its weights are not ours
        if isinstance(interventions, Intervention):
            interventions = [interventions]
        interventions = list(interventions)
        if not interventions or not all(isinstance(iv, Intervention) for iv in interventions):
            raise ConfigError("ReftModel needs one Intervention or a non-empty list of them.")
        self.interventions = interventions
        self.cast = cast
        self.units = [u for iv in interventions for u in iv.expand(model.cfg.n_layers)]
        # hooks run in registration order: explicitly stacked interventions go by their stack value
        self.sites = sorted(bind(model, self.units), key=lambda s: s.unit.stack or 0)
        check_static_disjoint([(s.unit, s.hook_name, s.layer) for s in self.sites])
        unique: dict[int, nn.Module] = {}
        for u in self.units:
            unique.setdefault(id(u.phi), u.phi)
        self.phis = nn.ModuleList(unique.values())
        for p in model.parameters():
            p.requires_grad_(False)
        if move:
            self.phis.to(self.device)

    # ---- inputs -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The base model's device (``model.cfg.device``); the Φs must be there too."""
        return torch.device(self.model.cfg.device)

    def tokenize(self, texts: str | Sequence[str], padding_side: str = "left", prepend_bos: bool | None = None) -> tuple[Tensor, Tensor]:
        """Tokenize strings the way TransformerLens does (BOS per the model's config) and pad
        them to one tensor. Returns ``(tokens, attention_mask)``."""
        if isinstance(texts, str):
            texts = [texts]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
        rows = [self.model.to_tokens(t, prepend_bos=prepend_bos)[0] for t in texts]
        return _pad(rows, self.pad_token_id, padding_side, self.device)

    @property
    def pad_token_id(self) -> int:
        """The id strings are padded with: the tokenizer's pad token, else its EOS, else 0."""
        tok = self.model.tokenizer
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        return 0

    def encode(self, inputs: Any, attention_mask: Tensor | None = None, what: str = "inputs") -> tuple[Tensor, RealTokens]:
        """Token ids ``[batch, seq]`` on the model's device and where their real tokens lie, from any
        input ``reft(...)`` takes (strings are tokenized and left padded)."""
        if hasattr(inputs, "keys") and "input_ids" in inputs:  # a dict or a BatchEncoding
            attention_mask = inputs.get("attention_mask", attention_mask)
            inputs = inputs["input_ids"]
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)):
            if attention_mask is not None:
                raise ValueError(f"attention_mask given with string {what}; strings are padded by reftlens.")
            tokens, mask = self.tokenize(inputs)
        elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(r, (list, tuple)) for r in inputs):
            tokens, mask = _pad([torch.tensor(r, dtype=torch.long) for r in inputs], self.pad_token_id, "left", self.device)
        elif isinstance(inputs, Tensor):
            tokens = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
            if tokens.ndim != 2 or tokens.is_floating_point():
                raise ValueError(f"{what} must be token ids [batch, seq]; got {tokens.dtype} {tuple(inputs.shape)}.")
            tokens = tokens.to(self.device)
            if attention_mask is None:
                self._refuse_unmasked_padding(tokens, what)
                mask = torch.ones_like(tokens, dtype=torch.bool)
            else:
                mask = attention_mask.unsqueeze(0) if attention_mask.ndim == 1 else attention_mask
                if mask.shape != tokens.shape:
                    raise ValueError(
                        f"attention_mask for {what} has shape {tuple(mask.shape)} but the tokens have {tuple(tokens.shape)}."
                    )
                mask = mask.to(self.device).bool()
        else:
            raise TypeError(f"{what} must be a string, a list of strings, token ids or a tokenizer output; got {type(inputs).__name__}.")
        return tokens, RealTokens.from_mask(mask, tokens)

    def _refuse_unmasked_padding(self, tokens: Tensor, what: str) -> None:
        tok = self.model.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None or pad in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)):
            return  # pad is indistinguishable from a real token: nothing to detect
        edges = torch.cat([tokens[:, :1], tokens[:, -1:]], 1)
        if bool((edges == pad).any()):
            row = int((edges == pad).any(1).nonzero()[0])
            raise PositionError(
                f"{what} row {row} starts or ends with the pad token {pad} but no attention_mask was given. "
                "Pass attention_mask= (1 for real tokens) so positions are resolved against the real tokens."
            )

    # ---- planning -----------------------------------------------------------------------

    def plan(self, inputs: Any = None, sources: Any = None, *, attention_mask: Tensor | None = None,
             source_attention_mask: Tensor | None = None, prompt_mask: Tensor | None = None) -> Plan:
        """Resolve the set for one batch: per site the hook, layer, row indices and source rows.

        Positions are resolved against each example's real tokens (against the prompt part only
        when ``prompt_mask`` is given, 1 on the prompt of prompt+completion sequences) and checked
        for collisions; sources are run in one batched forward. Without inputs the plan is lazy:
        every token counts as real and rows are resolved from the shape each hook sees. Both
        backends execute the result (see :mod:`reftlens.runtime`).

        >>> plan = reft.plan(["the quick brown fox", "a dog"])  # doctest: +SKIP
        >>> plan.sites[0].index                                   # flat rows of [batch * seq, d]  # doctest: +SKIP
        """
        self.check_devices()
        if inputs is None:
            needs_source = [s for s in self.sites if s.unit.takes_source]
            if needs_source or sources is not None:
                raise ValueError(
                    f"intervention {needs_source[0].label if needs_source else ''} takes a source: pass the "
                    "base inputs and sources= to reft.hooks(inputs, sources=...)."
                )
            return Plan([SitePlan(s, None) for s in self.sites])
        tokens, real = self.encode(inputs, attention_mask)
        frame = real
        if prompt_mask is not None:
            frame = RealTokens.from_mask(prompt_mask.to(real.mask.device).bool() & real.mask, tokens)
        sites, masks = resolve(self.sites, self.units, frame)
        plan = Plan(sites, tokens, None if bool(real.mask.all()) else real.mask.long(), real, masks)
        self._add_sources(plan, sources, source_attention_mask)
        return plan

    def _add_sources(self, plan: Plan, sources: Any, source_attention_mask: Tensor | None) -> None:
        needs_source = [s for s in self.sites if s.unit.takes_source]
        if needs_source and sources is None:
            raise ValueError(f"intervention {needs_source[0].label} takes a source; pass sources= (one per input example).")
        if sources is None:
            return
        if not needs_source:
            raise ValueError("sources= given but no intervention in this set takes a source.")
        src_tokens, src_real = self.encode(sources, source_attention_mask, what="sources")
        if src_tokens.shape[0] != plan.tokens.shape[0]:
            raise ValueError(
                f"sources have {src_tokens.shape[0]} examples but the inputs have {plan.tokens.shape[0]}; "
                f"intervention {needs_source[0].label} pairs source example i with input example i."
            )
        src_masks = {}
        for u in {id(s.unit): s.unit for s in needs_source}.values():
            spec = u.source_positions or u.positions
            m = spec.site_mask(src_real)
            n_base, n_src = plan.masks[id(u)].sum(1), m.sum(1)
            if not torch.equal(n_base, n_src):
                b = int((n_base != n_src).nonzero()[0])
                raise PositionError(
                    f"intervention {u.name!r}: example {b} selects {int(n_base[b])} input positions "
                    f"({u.positions}) but {int(n_src[b])} source positions ({spec}); each base row needs one "
                    "source row. Use equal-length inputs, a spec with fixed counts such as 'l3', or source_positions=."
                )
            src_masks[id(u)] = m
        gather_sources(self.model, plan.sites, src_masks, src_tokens, src_real)

    def check_devices(self) -> None:
        """Raise unless every Φ sits on the model's device."""
        for phi in self.phis:
            for t in list(phi.parameters()) + list(phi.buffers()):
                if t.device != self.device:
                    raise ConfigError(
                        f"Φ {phi_label(phi)} has tensors on {t.device} but the model is on {self.device}; "
                        f"call reft.to({str(self.device)!r})."
                    )
                break

    # ---- running ------------------------------------------------------------------------

    def fwd_hooks(self, inputs: Any = None, *, attention_mask: Tensor | None = None, sources: Any = None,
                  source_attention_mask: Tensor | None = None, prompt_mask: Tensor | None = None) -> list[tuple[str, Any]]:
        """``(hook_name, fn)`` pairs for ``model.run_with_hooks(..., fwd_hooks=...)`` or
        ``model.hooks(fwd_hooks=...)``. Without inputs, every token counts as real (unpadded
        batches); pass the inputs (and their mask) when they are padded.

        >>> logits = model.run_with_hooks(tokens, fwd_hooks=reft.fwd_hooks(tokens) + my_hooks)  # doctest: +SKIP
        """
        plan = self.plan(inputs, sources, attention_mask=attention_mask, source_attention_mask=source_attention_mask,
                         prompt_mask=prompt_mask)
        return [(p.site.hook_name, fn) for p, (_, fn) in zip(plan.sites, plan_hooks(plan, self.cast))]

    @contextmanager
    def hooks(self, inputs: Any = None, *, attention_mask: Tensor | None = None, sources: Any = None,
              source_attention_mask: Tensor | None = None, prompt_mask: Tensor | None = None) -> Iterator[Any]:
        """Attach this set's hooks to the model for the duration of a ``with`` block, for use
        with ``run_with_cache``, ``run_with_hooks`` or a plain call. Exactly these hooks are
        removed on exit, also on an exception; other hooks are never touched.

        >>> with reft.hooks():                                      # doctest: +SKIP
        ...     logits, cache = model.run_with_cache(tokens)
        """
        plan = self.plan(inputs, sources, attention_mask=attention_mask, source_attention_mask=source_attention_mask,
                         prompt_mask=prompt_mask)
        with hooked(self.model, plan_hooks(plan, self.cast)) as model:
            yield model

    def forward(self, inputs: Any, sources: Any = None, *, attention_mask: Tensor | None = None,
                source_attention_mask: Tensor | None = None, prompt_mask: Tensor | None = None,
                return_type: str | None = "logits", **kwargs: Any) -> Any:
        """Run the model with the interventions applied.

        ``inputs``: a string, a list of strings (left padded), token ids ``[batch, seq]``
        (with ``attention_mask`` when padded) or a tokenizer output. ``sources``: the same
        kinds, one per input, for Φs that take a source (interchange, DII); their
        activations are collected in one batched forward. Extra keyword arguments go to the
        model (``return_type``, ``stop_at_layer``, ...). ``prompt_mask`` (1 on the prompt part of
        prompt+completion sequences) makes positions resolve against the prompt only.
        """
        plan = self.plan(inputs, sources, attention_mask=attention_mask, source_attention_mask=source_attention_mask,
                         prompt_mask=prompt_mask)
        return execute(self.model, plan, self.cast, return_type=return_type, **kwargs)

    def generate(self, prompts: Any, max_new_tokens: int = 32, **kwargs: Any) -> list[str] | Tensor:
        """Generate with the interventions applied: batched, left padded, KV cached.

        Interventions edit the prompt positions (resolved against each prompt's real tokens)
        by default; ``intervene_on="all"`` also edits every generated token, ``"generated"`` the
        generated tokens only (steering that leaves the prompt as is). Greedy by
        default; ``do_sample=True`` with ``temperature``, ``top_k``, ``top_p`` and ``seed``.
        ``use_cache=False`` recomputes the sequence each step and gives the same tokens.
        Strings in → the completions as strings; token ids in → ``[batch, prompt + new]``
        ids (left padded, pad after EOS).

        >>> reft.generate(["The capital of France is"], max_new_tokens=8)  # doctest: +SKIP
        [' Paris. It is the largest city']
        """
        from reftlens.generation import generate

        return generate(self, prompts, max_new_tokens, **kwargs)

    def scaled(self, alpha: float | Tensor) -> "ReftModel":
        """This set with every edit scaled by α: each Φ becomes Φ_α(h) = h + α·(Φ(h) − h)
        (:class:`~reftlens.interventions.Scaled`), at the same sites, sharing these Φs' parameters.

        ``alpha`` is a number or one value per row of the batch, so one forward (or one batched
        generation) runs several strengths; set ``view.phis[i].alpha`` to change it between calls.
        α = 0 is the base model, α = 1 this set, α = −1 its edits reversed.

        >>> view = reft.scaled(torch.tensor([0.0, 1.0, 2.0]))     # doctest: +SKIP
        >>> view.generate(["Tell me a story."] * 3, 16)            # doctest: +SKIP
        """
        wrappers: dict[int, Scaled] = {}
        interventions = []
        for u in self.units:
            phi = wrappers.setdefault(id(u.phi), Scaled(u.phi, alpha))
            interventions.append(Intervention(phi, layers=list(u.layers), positions=u.positions, hook=u.hook,
                                              source_positions=u.source_positions, stack=u.stack, name=u.name))
        return ReftModel(self.model, interventions, cast=self.cast, move=False)

    # ---- summaries ----------------------------------------------------------------------

    def num_trainable_parameters(self) -> int:
        """The number of trainable parameters (those of the Φs)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> str:
        """Trainable parameters, and their share of the base model (the paper's "Params (%)")."""
        ours = self.num_trainable_parameters()
        base = sum(p.numel() for p in self.model.parameters())
        return f"trainable params: {ours:,} || base model params: {base:,} || {100 * ours / base:.4f}%"

    def save(self, path: str) -> Any:
        """Save the interventions (safetensors + JSON, atomic, no pickle). See :mod:`reftlens.saving`."""
        from reftlens.saving import save

        return save(self, path)

    @classmethod
    def load(cls, path: str, model: Any, *, dtype: torch.dtype | None = None, cast: bool | None = None) -> "ReftModel":
        """Load a saved set onto ``model`` (which must match the one it was saved from)."""
        from reftlens.saving import load

        interventions, use_cast = load(path, model, dtype=dtype, cast=cast)
        return cls(model, interventions, cast=use_cast)

    def extra_repr(self) -> str:
        return "\n".join(repr(iv) for iv in self.interventions)


def _pad(rows: Sequence[Tensor], pad_id: int, side: str, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(r.shape[0] for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - r.shape[0], width) if side == "left" else slice(0, r.shape[0])
        tokens[i, sl] = r.to(torch.long).cpu()
        mask[i, sl] = 1
    return tokens.to(device), mask.to(device)
