"""ReftModel: a set of interventions held against a TransformerLens model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from reftlens import inputs as inputs_mod
from reftlens.errors import ConfigError, PositionError
from reftlens.interventions.base import phi_d_model, phi_label
from reftlens.interventions.directional import Scaled
from reftlens.positions import RealTokens
from reftlens.runtime.plan import Plan, Site, SitePlan, bank_rows, resolve
from reftlens.runtime.tl_backend import bind, execute, gather_sources, hooked, plan_hooks
from reftlens.sets import Intervention, Unit, check_static_disjoint, set_units

Sets = Intervention | Sequence[Intervention] | Mapping[str, Intervention | Sequence[Intervention]]

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
        self.bank: dict[str, list[Intervention]] | None = None
        if isinstance(interventions, Mapping):
            if not interventions:
                raise ConfigError("a bank needs at least one named set: {'name': [Intervention(...), ...]}.")
            self.bank = {}
            for name, ivs in interventions.items():
                self.bank[_set_name(name)] = _as_set(ivs, f"bank set {name!r}")
            _check_same_model(self.bank, model.cfg.d_model)
            self.interventions = [iv for ivs in self.bank.values() for iv in ivs]
            bound = [self._bind(ivs, name) for name, ivs in self.bank.items()]
        else:
            self.interventions = _as_set(interventions, "ReftModel")
            bound = [self._bind(self.interventions, None)]
        self.units = [u for units, _ in bound for u in units]
        # hooks run in registration order: explicitly stacked interventions go by their stack value
        self.sites = sorted([s for _, sites in bound for s in sites], key=lambda s: s.unit.stack or 0)
        self.phis = nn.ModuleList(_unique_phis(self.units))
        self.check_materialised()
        for p in model.parameters():
            p.requires_grad_(False)
        if move:
            self.phis.to(self.device)

    def _bind(self, interventions: Sequence[Intervention], adapter: str | None) -> tuple[list[Unit], list[Site]]:
        """Expand a set into units (named ``set/name`` in a bank), bind them to hook points, check them."""
        units = set_units(interventions, self.model.cfg.n_layers, adapter)
        sites = bind(self.model, units)
        check_static_disjoint([(s.unit, s.hook_name, s.layer) for s in sites])
        return units, sites

    # ---- the bank -----------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """The names of a bank's sets, in order (empty for a plain set)."""
        return list(self.bank) if self.bank is not None else []

    def add_adapter(self, name: str, interventions: Intervention | Sequence[Intervention]) -> None:
        """Add a named set to a live bank. Nothing that exists is rebuilt or re-registered: hooks are
        per call, and the new Φs join ``reft.phis`` (an optimizer built before does not see them).

        >>> reft.add_adapter("formal", Intervention(LoReFT(d, 4), layers=[3], positions="l2"))  # doctest: +SKIP
        """
        if self.bank is None:
            raise ConfigError("add_adapter needs a bank: build ReftModel(model, {'name': [...], ...}) with named sets.")
        name = _set_name(name)
        if name in self.bank:
            raise ConfigError(
                f"the bank already has a set {name!r}; remove it first with reft.remove_adapter({name!r})."
            )
        ivs = _as_set(interventions, f"bank set {name!r}")
        _check_same_model({**self.bank, name: ivs}, self.model.cfg.d_model)
        units, sites = self._bind(ivs, name)
        phis = [p for p in _unique_phis(units) if all(p is not q for q in self.phis)]
        if phis:
            self.check_devices()
            for phi in phis:
                phi.to(self.device)
        self.bank[name] = ivs
        self.interventions += ivs
        self.units += units
        self.sites = sorted(self.sites + sites, key=lambda s: s.unit.stack or 0)
        self.phis.extend(phis)

    def remove_adapter(self, name: str) -> list[Intervention]:
        """Remove a set from a live bank and return its interventions."""
        if self.bank is None or name not in self.bank:
            raise ConfigError(f"there is no set {name!r} to remove; the sets are {self.adapters}.")
        if len(self.bank) == 1:
            raise ConfigError(f"{name!r} is the bank's only set; a bank keeps at least one.")
        ivs = self.bank.pop(name)
        self.interventions = [iv for iv in self.interventions if all(iv is not x for x in ivs)]
        self.units = [u for u in self.units if u.adapter != name]
        self.sites = [s for s in self.sites if s.unit.adapter != name]
        self.phis = nn.ModuleList(_unique_phis(self.units))
        return ivs

    def load_adapter(self, name: str, path: str, *, dtype: torch.dtype | None = None) -> None:
        """Add the set saved at ``path`` (``reft.save(path)`` of a plain set, or the set ``name`` of
        a saved bank) to this bank under ``name``."""
        from reftlens.saving import is_bank, load

        interventions, _ = load(path, self.model, dtype=dtype, cast=self.cast, adapter=name if is_bank(path) else None)
        self.add_adapter(name, interventions)

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
        if adapters is not None and self.bank is None:
            raise ConfigError(
                "adapters= chooses a set per example, but this ReftModel holds one set. Build a bank "
                "with named sets: ReftModel(model, {'name': [...], ...})."
            )
        if inputs is None and self.bank is not None:
            raise ConfigError("a bank resolves its sets per example: pass the inputs together with adapters=.")
        if inputs is None:
            needs_source = [s for s in self.sites if s.unit.takes_source]
            if needs_source or sources is not None:
                raise ValueError(
                    f"intervention {needs_source[0].label if needs_source else ''} takes a source: pass the "
                    "base inputs and sources= to reft.hooks(inputs, sources=...)."
                )
            return Plan([SitePlan(s, None) for s in self.sites])
        tokens, real = self.encode(inputs, attention_mask, prepend_bos=prepend_bos)
        frame = real
        if prompt_mask is not None:
            frame = RealTokens.from_mask(prompt_mask.to(real.mask.device).bool() & real.mask, tokens)
        rows = None if self.bank is None else bank_rows(adapters, self.adapters, tokens.shape[0], tokens.device)
        sites, masks = resolve(self.sites, self.units, frame, rows)
        plan = Plan(sites, tokens, None if bool(real.mask.all()) else real.mask.long(), real, masks, rows)
        self._add_sources(plan, sources, source_attention_mask, prepend_bos)
        return plan

    def _add_sources(
        self, plan: Plan, sources: Any, source_attention_mask: Tensor | None, prepend_bos: bool | None = None
    ) -> None:
        needs_source = [p.site for p in plan.sites if p.site.unit.takes_source]  # in a bank: the sets present
        if needs_source and sources is None:
            raise ValueError(
                f"intervention {needs_source[0].label} takes a source; pass sources= (one per input example)."
            )
        if sources is None:
            return
        if not any(s.unit.takes_source for s in self.sites):
            raise ValueError("sources= given but no intervention in this set takes a source.")
        if not needs_source:
            return
        src_tokens, src_real = self.encode(sources, source_attention_mask, what="sources", prepend_bos=prepend_bos)
        if src_tokens.shape[0] != plan.tokens.shape[0]:
            raise ValueError(
                f"sources have {src_tokens.shape[0]} examples but the inputs have {plan.tokens.shape[0]}; "
                f"intervention {needs_source[0].label} pairs source example i with input example i."
            )
        src_masks = {}
        for u in {id(s.unit): s.unit for s in needs_source}.values():
            spec = u.source_positions or u.positions
            m = spec.site_mask(src_real)
            if plan.rows is not None:
                m = m & plan.rows[u.adapter][:, None]
            n_base, n_src = plan.masks[id(u)].sum(1), m.sum(1)
            if not torch.equal(n_base, n_src):
                b = int((n_base != n_src).nonzero()[0])
                raise PositionError(
                    f"intervention {u.name!r}: example {b} selects {int(n_base[b])} input positions "
                    f"({u.positions}) but {int(n_src[b])} source positions ({spec}); each base row needs one "
                    "source row. Use equal-length inputs, a spec with fixed counts such as 'l3', or source_positions=."
                )
            src_masks[id(u)] = m
        gather_sources(self.model, plan.sites, src_masks, src_tokens, src_real, self.check_finite)

    def check_materialised(self) -> None:
        """Raise if a Φ has tensors on the ``meta`` device: they hold no values, so the Φ can
        neither run nor be moved (``.to()`` cannot copy out of a meta tensor)."""
        for phi in self.phis:
            meta = [n for n, t in [*phi.named_parameters(), *phi.named_buffers()] if t.is_meta]
            if meta:
                user = next(u.name for u in self.units if u.phi is phi)
                raise ConfigError(
                    f"Φ {phi_label(phi)} of intervention {user!r} is on the meta device: its tensors "
                    f"({', '.join(meta[:4])}{', ...' if len(meta) > 4 else ''}) have shapes but no values, so it can "
                    f"neither run nor be moved. Materialise it first: phi.to_empty(device={str(self.device)!r}), then "
                    "give it values (phi.load_state_dict(...) or your own initialisation); or build it off the meta "
                    "device."
                )

    def check_devices(self) -> None:
        """Raise unless every Φ sits on the model's device."""
        self.check_materialised()
        for phi in self.phis:
            for t in list(phi.parameters()) + list(phi.buffers()):
                if t.device != self.device:
                    raise ConfigError(
                        f"Φ {phi_label(phi)} has tensors on {t.device} but the model is on {self.device}; "
                        f"call reft.to({str(self.device)!r})."
                    )
                break

    # ---- running ------------------------------------------------------------------------

    def fwd_hooks(
        self,
        inputs: Any = None,
        *,
        attention_mask: Tensor | None = None,
        sources: Any = None,
        source_attention_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        adapters: str | Sequence[str | None] | None = None,
    ) -> list[tuple[str, Any]]:
        """``(hook_name, fn)`` pairs for ``model.run_with_hooks(..., fwd_hooks=...)`` or
        ``model.hooks(fwd_hooks=...)``. Without inputs, every token counts as real (unpadded
        batches); pass the inputs (and their mask) when they are padded.

        >>> logits = model.run_with_hooks(tokens, fwd_hooks=reft.fwd_hooks(tokens) + my_hooks)  # doctest: +SKIP
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
        return [(p.site.hook_name, fn) for p, (_, fn) in zip(plan.sites, plan_hooks(plan, self.cast))]

    @contextmanager
    def hooks(
        self,
        inputs: Any = None,
        *,
        attention_mask: Tensor | None = None,
        sources: Any = None,
        source_attention_mask: Tensor | None = None,
        prompt_mask: Tensor | None = None,
        prepend_bos: bool | None = None,
        adapters: str | Sequence[str | None] | None = None,
    ) -> Iterator[Any]:
        """Attach this set's hooks to the model for the duration of a ``with`` block, for use
        with ``run_with_cache``, ``run_with_hooks`` or a plain call. Exactly these hooks are
        removed on exit, also on an exception; other hooks are never touched.

        >>> with reft.hooks():                                      # doctest: +SKIP
        ...     logits, cache = model.run_with_cache(tokens)
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
        with hooked(self.model, plan_hooks(plan, self.cast)) as model:
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

    def generate(self, prompts: Any, max_new_tokens: int = 32, **kwargs: Any) -> list[str] | Tensor:
        """Generate with the interventions applied: batched, left padded, KV cached.

        Interventions edit the prompt positions (resolved against each prompt's real tokens)
        by default; ``intervene_on="all"`` also edits every generated token, ``"generated"`` the
        generated tokens only (steering that leaves the prompt as is). Greedy by
        default; ``do_sample=True`` with ``temperature``, ``top_k``, ``top_p`` and ``seed``.
        ``use_cache=False`` recomputes the sequence each step and gives the same tokens.
        Strings in → the completions as strings; token ids in → ``[batch, prompt + new]``
        ids (left padded, pad after EOS). ``prepend_bos`` (strings only) as in :meth:`tokenize`:
        a chat-formatted prompt never gets a second start token.
        A bank takes ``adapters=``, one set name per prompt.

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
            interventions.append(
                Intervention(
                    phi,
                    layers=list(u.layers),
                    positions=u.positions,
                    hook=u.hook,
                    source_positions=u.source_positions,
                    stack=u.stack,
                    name=u.name,
                )
            )
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
        """Load a saved set (or bank) onto ``model`` (which must match the one it was saved from);
        ``adapter=`` loads one set of a saved bank as a plain set."""
        from reftlens.saving import load

        interventions, use_cast = load(path, model, dtype=dtype, cast=cast, adapter=adapter)
        return cls(model, interventions, cast=use_cast, check_finite=check_finite)

    def extra_repr(self) -> str:
        if self.bank is not None:
            return "\n".join(f"{name}: {ivs}" for name, ivs in self.bank.items())
        return "\n".join(repr(iv) for iv in self.interventions)


def _as_set(interventions: Any, what: str) -> list[Intervention]:
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    interventions = list(interventions) if isinstance(interventions, (list, tuple)) else interventions
    if (
        not isinstance(interventions, list)
        or not interventions
        or not all(isinstance(iv, Intervention) for iv in interventions)
    ):
        raise ConfigError(
            f"{what} needs one Intervention or a non-empty list of them; got {type(interventions).__name__}."
        )
    return interventions


def _set_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a bank's sets are named by non-empty strings; got {name!r}.")
    return name


def _check_same_model(bank: Mapping[str, Sequence[Intervention]], d_model: int) -> None:
    """Every set of a bank runs on the one base model: each Φ that declares a width must have its d_model."""
    widths = {name: sorted({d for iv in ivs if (d := phi_d_model(iv.phi)) is not None}) for name, ivs in bank.items()}
    for name, w in widths.items():
        if w and w != [d_model]:
            fits = [n for n, v in widths.items() if v == [d_model]]
            also = f"sets {fits[:3]} and " if fits else ""
            raise ConfigError(
                f"the bank's sets target different models: set {name!r} has Φs of width {w}, but {also}this model "
                f"have d_model={d_model}. Every set of a bank runs on the one base model: build its Φs with "
                "d_model=model.cfg.d_model, or keep sets for another model in a bank of their own."
            )


def _unique_phis(units: Sequence[Unit]) -> list[nn.Module]:
    unique: dict[int, nn.Module] = {}
    for u in units:
        unique.setdefault(id(u.phi), u.phi)
    return list(unique.values())
