"""ReftModel: a set of interventions held against a TransformerLens model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from reftlens import inputs as inputs_mod
from reftlens.positions import RealTokens
from reftlens.runtime.bank import (
    DEFAULT,
    Bank,
    Sets,
    SetSettings,
    check_materialised,
    check_placed,
    scaled_interventions,
    unique_phis,
)
from reftlens.runtime.plan import Plan, Site
from reftlens.runtime.tl_backend import execute, hooked, plan_hooks
from reftlens.sets import Intervention, Unit

# the tokenization rule lives in reftlens.inputs; the name stays importable from here
text_tokens = inputs_mod.text_tokens


class ReftModel(nn.Module):
    """A frozen TransformerLens model plus a set of interventions ⟨Φ, P, L⟩.

    Only the Φs are submodules: ``reft.parameters()`` is what trains, ``reft.to(...)``
    moves the Φs. The base model is frozen (``requires_grad`` off) and otherwise untouched: its
    hooks are added per call and removed afterwards.

    A dict of named sets makes a *bank*: ``ReftModel(model, {"emoji": [...], "sport": Intervention(...)})``
    runs a different set on each example, ``reft(inputs, adapters=["emoji", "sport", None])`` (None:
    the base model), in forward, generation, training and export (see the bank page of the docs).

    Args:
        model: a TransformerLens ``TransformerBridge`` (see :func:`reftlens.load_model`).
        interventions: one :class:`Intervention`, a list of them, or a dict of named sets (a bank).
        cast: run each Φ in its own dtype (rows are cast in and out), e.g. fp32 Φs on a bf16
            model. By default a dtype mismatch is an error.
        move: move the Φs to the model's device (default True). A Φ on the ``meta`` device (built
            under ``torch.device("meta")``) is refused either way with a ConfigError: materialise
            it first (``phi.to_empty(device=...)``, then load or initialise its values).
        check_finite: refuse source activations that hold NaN or inf (default True): a Φ that takes
            a source (interchange, DII) would copy them into the base run, so a
            :class:`~reftlens.errors.NonFiniteError` names the intervention, the source example and
            the position instead. ``False`` lets them through. The check is one ``isfinite`` over
            the gathered source rows per batch; ``reft.check_finite`` can be changed at any time.

    >>> import reftlens
    >>> model = reftlens.load_model("tiny-llama")
    >>> reft = reftlens.ReftModel(model, reftlens.Intervention(reftlens.LoReFT(64, 4), layers=[1, 2], positions="f2+l2"))
    >>> reft(["the quick brown fox", "a dog"]).shape[:2]
    torch.Size([2, 13])
    """

    def __init__(
        self, model: Any, interventions: Sets, *, cast: bool = False, move: bool = True, check_finite: bool = True
    ):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: its weights are not ours
        self.cast = cast
        self.check_finite = check_finite
        self.sets = Bank(model, interventions)  # a plain set is a bank of one
        self.phis = nn.ModuleList(self.sets.phis())
        self.check_materialised()
        for p in model.parameters():
            p.requires_grad_(False)
        if move:
            self.phis.to(self.device)

    @property
    def interventions(self) -> list[Intervention]:
        """Every set's interventions, in order."""
        return self.sets.interventions

    @property
    def units(self) -> list[Unit]:
        """The expanded units (named ``set/name`` in a bank)."""
        return self.sets.units

    @property
    def sites(self) -> list[Site]:
        """Each unit bound to each of its layers' hook points, in the order the hooks run."""
        return self.sets.sites

    @property
    def settings(self) -> dict[str, SetSettings]:
        """Each set's recorded settings (a plain set's under ``"default"``): applied when it runs."""
        return self.sets.settings

    # ---- the bank -----------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The names of a bank's sets, in order (empty for a plain set)."""
        return self.sets.names if self.sets.named else []

    @property
    def bank(self) -> dict[str, list[Intervention]] | None:
        """A bank's sets by name (None for a plain set, whose one set is ``reft.interventions``)."""
        return self.sets.sets if self.sets.named else None

    def add_adapter(self, name: str, interventions: Intervention | Sequence[Intervention]) -> None:
        """Add a named set to a live bank. Nothing that exists is rebuilt or re-registered: hooks are
        per call, and the new Φs join ``reft.phis`` (an optimizer built before does not see them).

        >>> reft.add_adapter("formal", Intervention(LoReFT(d, 4), layers=[3], positions="l2"))  # doctest: +SKIP
        """
        units = self.sets.add(name, interventions)
        phis = [p for p in unique_phis(units) if all(p is not q for q in self.phis)]
        if phis:
            try:
                self.check_devices()
            except BaseException:
                self.sets.remove(name)
                raise
            for phi in phis:
                phi.to(self.device)
        self.phis.extend(phis)

    def remove_adapter(self, name: str) -> list[Intervention]:
        """Remove a set from a live bank and return its interventions."""
        ivs = self.sets.remove(name)
        self.phis = nn.ModuleList(self.sets.phis())
        return ivs

    def load_adapter(self, name: str, path: str, *, dtype: torch.dtype | None = None) -> None:
        """Add the set saved at ``path`` (``reft.save(path)`` of a plain set, or the set ``name`` of
        a saved bank) to this bank under ``name``, with its recorded settings."""
        from reftlens.saving import is_bank, load_sets

        loaded = load_sets(path, self.model, dtype=dtype, cast=self.cast, adapter=name if is_bank(path) else None)
        (ivs,), (settings,) = loaded.sets.values(), loaded.settings.values()
        self.add_adapter(name, ivs)
        self.sets.settings[name] = settings

    # ---- inputs -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The base model's device (``model.cfg.device``); the Φs must be there too."""
        return torch.device(self.model.cfg.device)

    def tokenize(
        self, texts: str | Sequence[str], padding_side: str = "left", prepend_bos: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        """Tokenize strings and pad them to one tensor (:func:`reftlens.inputs.tokenize` on this model).
        Returns ``(tokens, attention_mask)``."""
        return inputs_mod.tokenize(self.model, texts, padding_side=padding_side, prepend_bos=prepend_bos)

    @property
    def pad_token_id(self) -> int:
        """The id strings are padded with (:func:`reftlens.inputs.pad_token_id`)."""
        return inputs_mod.pad_token_id(self.model.tokenizer)

    def encode(
        self, inputs: Any, attention_mask: Tensor | None = None, what: str = "inputs", prepend_bos: bool | None = None
    ) -> tuple[Tensor, RealTokens]:
        """Token ids ``[batch, seq]`` on the model's device and where their real tokens lie, from any
        input ``reft(...)`` takes (:func:`reftlens.inputs.encode` on this model)."""
        return inputs_mod.encode(self.model, inputs, attention_mask, what=what, prepend_bos=prepend_bos)

    # ---- planning -----------------------------------------------------------------------

    def plan(
        self,
        inputs: Any = None,
        sources: Any = None,
        *,
        attention_mask: Tensor | None = None,
        source_attention_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        adapters: str | Sequence[str | None] | None = None,
    ) -> Plan:
        """Resolve the set for one batch: per site the hook, layer, row indices and source rows.

        Positions are resolved against each example's real tokens (against the prompt part only
        when ``prompt_mask`` is given, 1 on the prompt of prompt+completion sequences) and checked
        for collisions; sources are run in one batched forward. Without inputs the plan is lazy:
        every token counts as real and rows are resolved from the shape each hook sees. Both
        backends execute the result (see :mod:`reftlens.runtime`). String inputs and sources get
        start tokens as :meth:`tokenize` gives them (``prepend_bos``).
        A bank takes ``adapters``, one set name per example (None: the base model) or one name for all.

        >>> plan = reft.plan(["the quick brown fox", "a dog"])  # doctest: +SKIP
        >>> plan.sites[0].index                                   # flat rows of [batch * seq, d]  # doctest: +SKIP
        """
        self.check_devices()
        return self.sets.plan(
            inputs,
            sources,
            attention_mask=attention_mask,
            source_attention_mask=source_attention_mask,
            prompt_mask=prompt_mask,
            prepend_bos=prepend_bos,
            call=self.sets.call(adapters),
            check_finite=self.check_finite,
        )

    def check_materialised(self) -> None:
        """Raise if a Φ has tensors on the ``meta`` device: they hold no values, so the Φ can
        neither run nor be moved (``.to()`` cannot copy out of a meta tensor)."""
        check_materialised(self.phis, self.units, self.device)

    def check_devices(self) -> None:
        """Raise unless every Φ sits on the model's device."""
        check_placed(self.phis, self.units, self.device)

    # ---- running ------------------------------------------------------------------------

    def fwd_hooks(self, inputs: Any = None, **plan_args: Any) -> list[tuple[str, Any]]:
        """``(hook_name, fn)`` pairs for ``model.run_with_hooks(..., fwd_hooks=...)`` or
        ``model.hooks(fwd_hooks=...)``; keyword arguments as :meth:`plan` takes them (``sources=``,
        ``attention_mask=``, ``adapters=``, ...). Without inputs, every token counts as real
        (unpadded batches); pass the inputs (and their mask) when they are padded.

        >>> logits = model.run_with_hooks(tokens, fwd_hooks=reft.fwd_hooks(tokens) + my_hooks)  # doctest: +SKIP
        """
        plan = self.plan(inputs, **plan_args)
        return [(p.site.hook_name, fn) for p, (_, fn) in zip(plan.sites, plan_hooks(plan, self.cast))]

    @contextmanager
    def hooks(self, inputs: Any = None, **plan_args: Any) -> Iterator[Any]:
        """Attach this set's hooks to the model for the duration of a ``with`` block, for use
        with ``run_with_cache``, ``run_with_hooks`` or a plain call (keyword arguments as :meth:`plan`
        takes them). Exactly these hooks are removed on exit, also on an exception; other hooks are
        never touched.

        >>> with reft.hooks():                                      # doctest: +SKIP
        ...     logits, cache = model.run_with_cache(tokens)
        """
        with hooked(self.model, plan_hooks(self.plan(inputs, **plan_args), self.cast)) as model:
            yield model

    def forward(
        self,
        inputs: Any,
        sources: Any = None,
        *,
        attention_mask: Tensor | None = None,
        source_attention_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        adapters: str | Sequence[str | None] | None = None,
        return_type: str | None = "logits",
        **kwargs: Any,
    ) -> Any:
        """Run the model with the interventions applied.

        ``inputs``: a string, a list of strings (left padded), token ids ``[batch, seq]``
        (with ``attention_mask`` when padded) or a tokenizer output. ``sources``: the same
        kinds, one per input, for Φs that take a source (interchange, DII); their
        activations are collected in one batched forward. Extra keyword arguments go to the
        model (``return_type``, ``stop_at_layer``, ...). ``prompt_mask`` (1 on the prompt part of
        prompt+completion sequences) makes positions resolve against the prompt only.
        ``prepend_bos`` (strings only): start token or not, as in :meth:`tokenize` (default: the
        model's setting; never a second one on a text that already starts with one).
        A bank takes ``adapters=``: one set name per example (None: the base model), or one name for all.
        """
        plan = self.plan(
            inputs,
            sources,
            attention_mask=attention_mask,
            source_attention_mask=source_attention_mask,
            prompt_mask=prompt_mask,
            prepend_bos=prepend_bos,
            adapters=adapters,
        )
        return execute(self.model, plan, self.cast, return_type=return_type, **kwargs)

    def generate(
        self,
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
        """Generate with the interventions applied: batched, left padded, KV cached.

        ``intervene_on``: ``"prompt"`` edits the prompt positions (resolved against each prompt's
        real tokens), ``"all"`` also every generated token, ``"generated"`` the generated tokens
        only (steering that leaves the prompt as is). By default each set uses the one it was
        trained with (``reft.settings``, saved with it; ``"prompt"`` if none), per set in a bank.
        Greedy by default; ``do_sample=True`` with ``temperature``, ``top_k``, ``top_p`` and ``seed``.
        ``use_cache=False`` recomputes the sequence each step and gives the same tokens.
        ``eos_token_id``: -1 the tokenizer's, None never stop early. ``backend``: ``"hf"`` (a plain
        transformers twin sharing the weights), ``"bridge"`` or ``"auto"``.
        Strings in → the completions as strings; token ids in → ``[batch, prompt + new]``
        ids (left padded, pad after EOS). ``prepend_bos`` (strings only) as in :meth:`tokenize`:
        a chat-formatted prompt never gets a second start token; by default each row's set's own
        (recorded by training), else the model's setting. ``chat_template`` (strings only): wrap each
        prompt in the model's chat template (:func:`reftlens.inputs.chat_prompt`); by default each
        row's set's own (True when it was trained with ``chat_template=True``); a prompt that is
        already chat-formatted is never wrapped twice.
        A bank takes ``adapters=``, one set name per prompt.

        >>> reft.generate(["The capital of France is"], max_new_tokens=8)  # doctest: +SKIP
        [' Paris. It is the largest city']
        """
        from reftlens.generation import generate

        return generate(
            self,
            prompts,
            max_new_tokens,
            attention_mask=attention_mask,
            sources=sources,
            source_attention_mask=source_attention_mask,
            intervene_on=intervene_on,
            use_cache=use_cache,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            backend=backend,
            prepend_bos=prepend_bos,
            chat_template=chat_template,
            adapters=adapters,
        )

    def scaled(self, alpha: float | Tensor) -> "ReftModel":
        """This set with every edit scaled by α: each Φ becomes Φ_α(h) = h + α·(Φ(h) − h)
        (:class:`~reftlens.interventions.Scaled`), at the same sites, sharing these Φs' parameters.

        ``alpha`` is a number or one value per row of the batch, so one forward (or one batched
        generation) runs several strengths; another α is another view (building one is cheap: no copy).
        α = 0 is the base model, α = 1 this set, α = −1 its edits reversed. A bank's view is a bank
        of the same sets (each row still runs only its own set's Φs, chosen with ``adapters=``).

        >>> view = reft.scaled(torch.tensor([0.0, 1.0, 2.0]))     # doctest: +SKIP
        >>> view.generate(["Tell me a story."] * 3, 16)            # doctest: +SKIP
        """
        sets = scaled_interventions(self.units, alpha)
        interventions = sets if self.sets.named else sets[DEFAULT]  # a bank's view keeps its sets
        view = ReftModel(self.model, interventions, cast=self.cast, move=False)
        view.sets.settings.update(self.sets.settings)  # each set's view runs as the set does
        return view

    # ---- summaries ----------------------------------------------------------------------

    def num_trainable_parameters(self) -> int:
        """The number of trainable parameters (those of the Φs)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> str:
        """Trainable parameters, and their share of the base model (the paper's "Params (%)")."""
        ours = self.num_trainable_parameters()
        base = sum(p.numel() for p in self.model.parameters())
        return f"trainable params: {ours:,} || base model params: {base:,} || {100 * ours / base:.4f}%"

    def save(self, path: str, *, adapter: str | None = None) -> Any:
        """Save the interventions (safetensors + JSON, atomic, no pickle). See :mod:`reftlens.saving`.
        A bank saves all its sets, or with ``adapter=`` that one set as a plain save."""
        from reftlens.saving import save

        return save(self, path, adapter=adapter)

    @classmethod
    def load(
        cls,
        path: str,
        model: Any,
        *,
        dtype: torch.dtype | None = None,
        cast: bool | None = None,
        check_finite: bool = True,
        adapter: str | None = None,
    ) -> "ReftModel":
        """Load a saved set (or bank) onto ``model`` (which must match the one it was saved from),
        with each set's recorded settings; ``adapter=`` loads one set of a saved bank as a plain set."""
        from reftlens.saving import load_sets

        loaded = load_sets(path, model, dtype=dtype, cast=cast, adapter=adapter)
        sets = loaded.sets if loaded.named else next(iter(loaded.sets.values()))
        reft = cls(model, sets, cast=loaded.cast, check_finite=check_finite)
        reft.sets.settings.update(zip(reft.sets.names, loaded.settings.values()))
        return reft

    def extra_repr(self) -> str:
        if self.sets.named:
            return "\n".join(f"{name}: {ivs}" for name, ivs in self.sets.sets.items())
        return "\n".join(repr(iv) for iv in self.interventions)
