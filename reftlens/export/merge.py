"""Fold ReFT into the weights: an exact merge (:func:`merge`) and a LoRA adapter (:func:`save_peft`).

An intervention applied at every position to the output of a linear map, o = Wx + b, folds into
that map when its Φ is affine. Write Φ(h) = h + U(Dh + c) (LoReFT: U = Rᵀ, D = W_ϕ − R, c = b_ϕ;
DiReFT: U = W₂ᵀ, D = W₁, c = b; see :class:`~reftlens.interventions.base.Affine`); then

    Φ(Wx + b) = (W + U·DW) x + (b + U(Db + c)),

a rank-r update of W plus a bias: a LoRA with B = U, A = DW and a bias U(Db + c). Several Φs on
one map (``stack=``) compose in hook order, their ranks adding up. The maps that fold are the two
projections whose output TransformerLens hooks at every block: ``attn_out`` (the attention output
projection: ``o_proj``, GPT-2's ``c_proj``, GPT-NeoX's ``dense``) and ``mlp_out`` (the MLP down
projection: ``down_proj``, ``c_proj``, ``dense_4h_to_h``). A bank folds one of its sets at a time
(``adapter=``): its sets are alternatives chosen per row, not edits that add up.

Everything else is refused, naming the intervention and the algebra that fails: residual-stream
hooks (the residual stream is a sum, not one map's output), positions other than ``"all"`` (a
weight acts on every position), Φs with a source, Φs without an affine form, dropout in train mode.

The fold runs in float64 and is cast to the weight's dtype once. Nothing here imports
TransformerLens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ExportError
from reftlens.interventions.base import Affine, phi_label
from reftlens.positions import All
from reftlens.runtime.compat import fast_attention
from reftlens.runtime.hf_backend import block_module, decoder_layers, native_site, pristine_hf

# model_type → the attention and MLP output projections, inside the attention / MLP module. Listed
# only where that projection's output *is* the module's output (in eval mode: GPT-2's dropout after
# c_proj is the identity), i.e. where the hook the intervention was trained on sits; checked by
# tests/test_merge.py on every architecture named here.
PROJECTIONS: dict[str, dict[str, str]] = {
    "llama": {"attn": "o_proj", "mlp": "down_proj"},
    "qwen2": {"attn": "o_proj", "mlp": "down_proj"},
    "mistral": {"attn": "o_proj", "mlp": "down_proj"},
    "gemma": {"attn": "o_proj", "mlp": "down_proj"},
    "gpt2": {"attn": "c_proj", "mlp": "c_proj"},
    "gpt_neox": {"attn": "dense", "mlp": "dense_4h_to_h"},
}

# config switches that give a projection a bias where it has none by default (the other
# projections they touch get zero biases: the function is unchanged)
_BIAS_SWITCHES = {"attn": "attention_bias", "mlp": "mlp_bias"}


@dataclass
class Fold:
    """The folded edits on one linear map: W' = W + B·A and b' = b + ``bias``.

    ``A`` is ``[rank, in]``, ``B`` ``[out, rank]``, ``bias`` ``[out]``, all float64; ``name`` is the
    map's module path in the transformers model, ``sources`` the interventions folded into it.
    """

    name: str
    kind: str
    layer: int
    A: Tensor
    B: Tensor
    bias: Tensor
    sources: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def weight_of(module: nn.Module) -> Tensor:
    """The [out, in] matrix of a linear map (``nn.Linear``, or GPT-2's ``Conv1D`` stored as [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and module.weight.ndim == 2:  # transformers.pytorch_utils.Conv1D
        return module.weight.T
    raise ExportError(
        f"cannot fold into {type(module).__name__}: reftlens folds into nn.Linear and GPT-2's Conv1D only."
    )


def compose(weight: Tensor, bias: Tensor | None, edits: Sequence[Affine]) -> tuple[Tensor, Tensor, Tensor]:
    """Compose edits Φ_k(h) = h + U_k(D_k h + c_k), applied in order, onto o = Wx + b.

    Returns (A, B, shift) with Φ_K(…Φ_1(Wx + b)) = (W + BA)x + b + shift, in float64:
    A stacks P_k = D_k W_{k−1} and B stacks U_k, where W_k = W_{k−1} + U_k P_k (likewise for b).

    >>> f64 = dict(dtype=torch.float64)
    >>> W, b, x = torch.randn(6, 5, **f64), torch.randn(6, **f64), torch.randn(3, 5, **f64)
    >>> e = Affine(torch.randn(6, 2, **f64), torch.randn(2, 6, **f64), torch.randn(2, **f64))
    >>> A, B, shift = compose(W, b, [e, e])
    >>> torch.allclose(x @ (W + B @ A).T + b + shift, e(e(x @ W.T + b)))
    True
    """
    W = weight.detach().double()
    b0 = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device) if bias is None else bias.detach().double()
    b = b0
    As, Bs = [], []
    for e in edits:
        U, D, c = (t.detach().double().to(W.device) for t in e)
        P = D @ W
        q = D @ b + c
        As.append(P)
        Bs.append(U)
        W = W + U @ P
        b = b + U @ q
    return torch.cat(As), torch.cat(Bs, dim=1), b - b0


def _refuse_if_not_foldable(unit: Any) -> None:
    name = unit.name
    if unit.takes_source:
        raise ExportError(
            f"intervention {name!r} cannot fold into weights: Φ(b, s) reads s from another (source) run, and a weight "
            "of this model sees only this run's input. Keep it with reftlens.to_hf(reft) or apply it with reftlens."
        )
    site = native_site(unit.hook)
    if site is None or site[0] == "layer":
        what = (
            "the residual stream is the sum of the embedding and every block's output"
            if site is not None
            else "reftlens knows no single projection whose output it is"
        )
        raise ExportError(
            f"intervention {name!r} cannot fold into weights: its hook {unit.hook!r} is not the output of one linear "
            f"map o = Wx + b ({what}), so no W', b' give W'x + b' = Φ(o). Only attn_out and mlp_out fold (the "
            "attention output and MLP down projections)"
            + ("; keep the hooks with reftlens.to_hf(reft) instead." if site is not None else ".")
        )
    if not isinstance(unit.positions, All):
        raise ExportError(
            f"intervention {name!r} cannot fold into weights: it edits positions {unit.positions} only, but a "
            "weight acts on every position alike, so a W' with W'x = Φ(Wx) there would also change the positions "
            "Φ leaves alone. Train it with positions='all' to merge it, or export it with reftlens.to_hf(reft)."
        )
    phi = unit.phi
    if not callable(getattr(phi, "affine", None)):
        raise ExportError(
            f"intervention {name!r} cannot fold into weights: its Φ {phi_label(phi)} has no affine form "
            "Φ(h) = h + U(Dh + c), and W'x + b' = Φ(Wx + b) for every x needs Φ affine. A user Φ that is affine "
            "can say so with an affine() method returning reftlens.interventions.Affine(U, D, c)."
        )
    live = [m.p for m in phi.modules() if isinstance(m, nn.Dropout) and m.p > 0 and m.training]
    if live:
        raise ExportError(
            f"intervention {name!r} cannot fold into weights: its dropout (p={live[0]}) is on (train mode), so Φ "
            "is random and equals no fixed W'. Call reft.eval() before merging."
        )


def _checked_affine(unit: Any) -> Affine:
    """The Φ's affine form, checked against its own forward on random rows (a wrong affine()
    in a user Φ would otherwise fold silently wrong numbers)."""
    phi = unit.phi
    for key, t in phi.state_dict().items():  # a NaN would otherwise surface as "affine() disagrees by nan"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(
                f"intervention {unit.name!r}: its Φ ({phi_label(phi)}) has non-finite weights ({key}: "
                f"{int((~torch.isfinite(t)).sum())} NaN or inf values), which no exported model can run. Retrain or "
                "reload it (a NaN usually comes from a diverged training run); nothing was written."
            )
    e = phi.affine()
    bad = [n for n, t in zip(("up", "down", "shift"), e) if not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(
            f"intervention {unit.name!r}: its Φ's affine() has non-finite weights (in {', '.join(bad)}); nothing was "
            "written."
        )
    first = next(iter(phi.parameters()), e.up)
    d = e.up.shape[0]
    if not (e.up.ndim == 2 and e.down.shape == (e.up.shape[1], d) and e.shift.shape == (e.up.shape[1],)):
        raise ExportError(
            f"intervention {unit.name!r}: affine() gave up {tuple(e.up.shape)}, down {tuple(e.down.shape)}, shift "
            f"{tuple(e.shift.shape)}; expected [d, r], [r, d] and [r]."
        )
    h = torch.randn(8, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(first.device)
    with torch.no_grad():
        want = phi(h.to(first.dtype)).double()
        got = Affine(*(t.detach().double() for t in e))(h)
    eps = torch.finfo(first.dtype).eps if first.is_floating_point() else 1e-7
    tol = 100 * eps * d**0.5 * (1 + want.abs().max().item())
    err = (want - got).abs().max().item()
    if not err <= tol:
        raise ExportError(
            f"intervention {unit.name!r}: its Φ's affine() disagrees with its forward by {err:.3g} (tolerance "
            f"{tol:.3g}) on random rows, so the fold would be wrong; fix affine() to return (U, D, c) with "
            "Φ(h) = h + U(Dh + c)."
        )
    return e


def set_units(reft: Any, adapter: str | None, call: str = "merge(reft, adapter=name)") -> list[Any]:
    """The units that fold together: a plain set's (``adapter`` None), or the set ``adapter`` of a
    bank. A bank's sets are alternatives chosen per row (``reft(tokens, adapters=[...])``), never
    applied together, so a bank without ``adapter`` is refused rather than folded into one stack.
    ``call`` is the call to suggest. As :meth:`ReftModel.save`, ``adapter`` names a bank's set only."""
    from reftlens.saving import bank_sets, is_named

    if not is_named(reft):
        if adapter is not None:
            raise ExportError(
                f"there is no set {adapter!r} to fold; the sets are none (not a bank): this ReftModel is one set, "
                "which folds whole. Leave adapter= out."
            )
        return list(reft.units)
    sets = bank_sets(reft.units)  # a bank's sets are never empty
    names = list(sets)
    if adapter is None:
        raise ExportError(
            f"this ReftModel is a bank of sets {names}; a bank's sets are alternatives (each row runs the one its "
            f"adapters= names), not one edit, so they do not fold together. Fold one: {call}, name one of {names}."
        )
    if not isinstance(adapter, str) or adapter not in names:
        raise ExportError(f"there is no set {adapter!r} to fold; the sets are {names}.")
    return sets[adapter]


def folds(reft: Any, hf: nn.Module, adapter: str | None = None) -> list[Fold]:
    """Every linear map of ``hf`` that ``reft``'s interventions (a bank's: the set ``adapter``'s, see
    :func:`set_units`) edit, with the edits folded in hook order. Raises
    :class:`~reftlens.errors.ExportError` for the first intervention that cannot fold."""
    units = set_units(reft, adapter)
    arch = type(hf).__name__
    model_type = getattr(hf.config, "model_type", None)
    for unit in units:  # refuse before any work, and for every unit, whatever the architecture
        _refuse_if_not_foldable(unit)
    if model_type not in PROJECTIONS:
        raise ExportError(
            f"{arch} (model_type {model_type!r}) is not supported for merging: reftlens folds into "
            f"{', '.join(sorted(PROJECTIONS))}, where it has checked that the attention / MLP output is one "
            "projection's output. Export with reftlens.to_hf(reft) instead (hooks, same numbers)."
        )
    layers = decoder_layers(hf)
    names = {id(m): n for n, m in hf.named_modules()}
    edits: dict[str, tuple[str, int, list[Affine], list[str]]] = {}
    for unit in sorted(units, key=lambda u: u.stack or 0):  # the order the hooks run in
        kind, _ = native_site(unit.hook)
        e = _checked_affine(unit)
        for layer in unit.layers:
            module = block_module(layers[layer], kind, arch)
            proj = getattr(module, PROJECTIONS[model_type][kind], None)
            if proj is None:
                raise ExportError(
                    f"{arch} layer {layer}: its {kind} module has no {PROJECTIONS[model_type][kind]!r}; "
                    "this model does not have the layout reftlens folds into."
                )
            name = names[id(proj)]
            edits.setdefault(name, (kind, layer, [], []))
            edits[name][2].append(e)
            edits[name][3].append(f"{unit.name}@L{layer}" if len(unit.layers) > 1 else unit.name)
    out = []
    for name, (kind, layer, affines, sources) in edits.items():
        proj = hf.get_submodule(name)
        A, B, shift = compose(weight_of(proj), getattr(proj, "bias", None), affines)
        out.append(Fold(name, kind, layer, A, B, shift, sources))
    return out


def _with_biases(hf: nn.Module, need: list[Fold]) -> nn.Module:
    """``hf`` rebuilt with the config switches that give each map in ``need`` a bias (zeros
    wherever the switches add one), or an ExportError naming a map no switch reaches."""
    from transformers import AutoModelForCausalLM

    arch = type(hf).__name__
    config = copy.deepcopy(hf.config)
    for f in need:
        switch = _BIAS_SWITCHES[f.kind]
        if getattr(config, switch, None) is False:
            setattr(config, switch, True)
    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(config)
    for f in need:
        if getattr(probe.get_submodule(f.name), "bias", None) is None:
            raise ExportError(
                f"intervention {f.sources[0]!r} cannot fold into {arch}'s {f.name}: the fold adds a bias "
                f"U(Db + c) ≠ 0 (max |·| = {f.bias.abs().max().item():.3g}) to a map that has no bias, and {arch}'s "
                "config has no switch that gives it one. Train it without a shift (LoReFT(d, r, bias=False), "
                "DiReFT(d, r, bias=False): then the fold adds none), export a LoRA with a bias "
                "(reftlens.save_peft), or keep the hooks (reftlens.to_hf)."
            )
    first = next(hf.parameters())
    fresh = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    result = fresh.load_state_dict(hf.state_dict(), strict=False)
    wrong = [k for k in result.missing_keys if not k.endswith(".bias")] + list(result.unexpected_keys)
    if wrong:
        raise ExportError(f"cannot rebuild {arch} with biases: its weights {wrong[:3]} do not line up.")
    with torch.no_grad():
        for k in result.missing_keys:  # the biases the switches added: zero, so the function is unchanged
            fresh.get_parameter(k).zero_()
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.to(first.device).eval()


def merge(reft: Any, *, adapter: str | None = None) -> nn.Module:
    """The ReftModel's base as a plain transformers model (its own class) with the interventions
    folded into its weights: no hooks, and nothing from reftlens needed to run or save it.

    A bank folds one of its sets, named by ``adapter`` (its sets are alternatives, chosen per row:
    the merged model is the bank run with ``adapters=[adapter] * n``); without it a bank is refused,
    and a plain set takes no ``adapter``, as :meth:`ReftModel.save` does.

    Every intervention must sit on ``attn_out`` or ``mlp_out`` at ``positions="all"`` with an
    affine sourceless Φ (LoReFT, DiReFT, NoReFT, NodiReFT, ConsReFT, LoBiReFT, Steer, or a user Φ
    with ``affine()``); anything else raises :class:`~reftlens.errors.ExportError` saying which
    intervention and why. The merged model edits every token, generated ones included: it is
    ``to_hf(reft, intervene_on="all")`` at the plain model's cost.

    A fold that adds a bias to a map without one (Llama's ``o_proj``, say) switches on the
    config's ``attention_bias`` / ``mlp_bias`` (the other biases it adds are zero); where the
    class has no such switch (Qwen2's ``o_proj``, Mistral), train the Φ with ``bias=False``.

    >>> reft = ReftModel(model, Intervention(LoReFT(d, 4), layers="all", hook="mlp_out"))  # doctest: +SKIP
    >>> merged = reftlens.merge(reft)                                                       # doctest: +SKIP
    >>> merged.save_pretrained("merged")       # loads with AutoModelForCausalLM alone    # doctest: +SKIP
    >>> formal = reftlens.merge(bank, adapter="formal")   # one set of a bank               # doctest: +SKIP
    """
    set_units(reft, adapter)  # before copying the base: a wrong adapter fails fast
    hf = pristine_hf(reft.model)
    found = folds(reft, hf, adapter)
    need = [f for f in found if getattr(hf.get_submodule(f.name), "bias", None) is None and bool(f.bias.any())]
    if need:
        hf = _with_biases(hf, need)
    fast_attention(hf)  # as a freshly loaded model: the bridge had switched its base to eager attention
    with torch.no_grad():
        for f in found:
            proj = hf.get_submodule(f.name)
            W = weight_of(proj)
            W.copy_((W.double() + f.B @ f.A).to(W.dtype))
            if proj.bias is not None:
                proj.bias.copy_((proj.bias.double() + f.bias).to(proj.bias.dtype))
    return hf.eval()
