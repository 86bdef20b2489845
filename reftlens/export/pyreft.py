"""pyreft interop: read and write pyreft / pyvene ``ReftModel.save`` folders, no pickle.

pyreft (0.1.0, on pyvene 0.1.8) saves a folder with

``config.json``
    a pyvene ``IntervenableConfig``: ``representations`` (one list per intervention, the
    fields of pyvene's ``RepresentationConfig`` in order: layer, component, unit,
    max_number_of_units, low_rank_dimension, intervention_type, intervention,
    subspace_partition, group_key, intervention_link_key, moe_key, source_representation,
    hidden_source_representation, latent_dim), ``intervention_types`` (one
    ``"<class 'pyreft.interventions.LoreftIntervention'>"`` string per intervention; pyvene
    imports it by name on load, reftlens only matches it against a fixed table),
    ``sorted_keys``, ``intervention_dimensions``, ``intervention_constant_sources``.
``intkey_<key>.bin``
    ``torch.save`` of each intervention's state dict, for the key
    ``layer_<L>_comp_<component>_unit_<unit>_nunit_<n>#<k>`` where ``#k`` counts earlier
    interventions with the same layer/component/unit (so pyreft's untied first/last layout,
    layers ``[1, 3, 1, 3]``, gives ``layer_1_…#0``, ``layer_3_…#0``, ``layer_1_…#1``,
    ``layer_3_…#1``).

reftlens reads every ``.bin`` with ``torch.load(..., weights_only=True)``: tensors only, no code.

State dicts (d = hidden size, r = rank)::

    LoreftIntervention    weight [r,d], bias [r], rotate_layer [d,r]           (custom state_dict:
                          rotate_layer is the materialised orthogonal matrix)
    NoreftIntervention    proj_layer.weight [r,d] (+ proj_layer.bias [r] if add_bias),
                          learned_source.weight [r,d], learned_source.bias [r], embed_dim, interchange_dim
    NodireftIntervention  as Noreft (proj_layer.bias, if any, is unused by the forward)
    DireftIntervention    learned_source.weight [r,d], learned_source.bias [r],
                          rotate_layer.parametrizations.weight.original [d,r],
                          rotate_layer.parametrizations.weight.0.base [d,d], embed_dim, interchange_dim
    ConsreftIntervention  learned_source [r], rotate_layer.parametrizations.… as Direft, embed_dim, interchange_dim
    LobireftIntervention  as Consreft

For the last three, ``rotate_layer`` is a ``torch.nn.utils.parametrizations.orthogonal``
module (householder map for d > r, matrix_exp for d = r, with the dynamic trivialisation
``base``) and only the parametrisation's inputs are saved; the effective matrix is
``base @ householder(original)``, recomputed here with exactly torch's operations
(:func:`orthogonal_weight`, bit-identical to torch's own).

Forward formulas (rows h; ``R`` = rotate_layer.weight [d,r]; W = learned_source; P = proj_layer)::

    Loreft    h + (W h + b − h R) Rᵀ           → reftlens LoReFT  (R rows = Rᵀ, W)
    Noreft    h + (W h + b − P h − b_P) P      → reftlens NoReFT  (P, W with bias b − b_P)
    Direft    h + (W h + b) Rᵀ                 → reftlens DiReFT  (W1 = W, W2 = Rᵀ)
    Nodireft  h + (W h + b) P                  → reftlens NodiReFT (W, P)
    Consreft  h + (b − h R) Rᵀ                 → reftlens ConsReFT (R rows = Rᵀ, b)
    Lobireft  h + b Rᵀ                         → reftlens LoBiReFT (R rows = Rᵀ, b)

pyreft's ``act_fn`` (default ``None`` = linear, i.e. identity) wraps ``W h + b`` and its
``dropout`` wraps the *whole output* ``h + edit`` (Consreft has none); neither is saved, and
pyreft's own ``ReftModel.load`` rebuilds every intervention with the defaults (linear, no
dropout), so reftlens does the same. reftlens's dropout acts on the edit only.

pyreft does not save positions: they are chosen at data time, so :func:`load_pyreft` asks for
them (see there).

Per-type knowledge lives in one place: a :class:`Codec` per Φ type (pyreft class name, reftlens
Φ, rank, ``to_phi``, ``from_phi``), all listed in :data:`CODECS`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor, nn

from reftlens.errors import ConfigError, ExportError, StateError
from reftlens.interventions.reft import ConsReFT, DiReFT, LoBiReFT, LoReFT, NodiReFT, NoReFT
from reftlens.interventions.subspace import OrthonormalRows
from reftlens.positions import FirstLast, PositionSpec, from_json, parse_positions
from reftlens.saving import LoadError, atomic_dir, fingerprint, fingerprint_diff, inside, recover

if TYPE_CHECKING:
    from reftlens.model import ReftModel

__all__ = [
    "NodiReFT",
    "load_pyreft",
    "save_pyreft",
    "read_pyreft",
    "orthogonal_weight",
    "PYREFT_TYPES",
    "CODECS",
    "Codec",
]

CONFIG_FILE = "config.json"
METADATA_KEY = "reftlens"

# pyvene's RepresentationConfig fields, in order, with their defaults
_REPR_FIELDS = (
    "layer",
    "component",
    "unit",
    "max_number_of_units",
    "low_rank_dimension",
    "intervention_type",
    "intervention",
    "subspace_partition",
    "group_key",
    "intervention_link_key",
    "moe_key",
    "source_representation",
    "hidden_source_representation",
    "latent_dim",
)
_REPR_DEFAULTS = (0, "block_output", "pos", 1) + (None,) * 10

_TYPE_RE = re.compile(r"^<class '(?P<module>[A-Za-z_][\w.]*)\.(?P<cls>[A-Za-z_]\w*)'>$")

# TransformerLens hooks that are pyvene's "block_output" (the decoder layer's output)
_BLOCK_OUTPUT_HOOKS = ("hook_resid_post", "hook_out")

# load_pyreft refuses a rotate layer further than this from orthonormal (max |R Rᵀ − I|)
_ROTATE_CHECK_ATOL = 1e-4


# --------------------------------------------------------------------------- the orthogonal map


def orthogonal_weight(original: Tensor, base: Tensor | None = None) -> Tensor:
    """The matrix ``torch.nn.utils.parametrizations.orthogonal`` computes from a saved state.

    ``original`` is ``…parametrizations.weight.original`` and ``base`` the trivialisation buffer
    ``…parametrizations.weight.0.base``. The map is torch's default: householder for a
    non-square matrix, matrix_exp for a square one. The operations are torch's own (torch 2.x
    ``_Orthogonal.forward``), so the result is bit-identical to the parametrised weight,
    including its quirk of scaling each column by ``int()`` of ``original``'s diagonal
    (truncation: -1.5 → -1, 0.7 → 0).
    """
    X = original
    n, k = X.size(-2), X.size(-1)
    transposed = n < k
    if transposed:
        X = X.mT
        n, k = k, n
    if n == k:  # matrix_exp, torch's default for square matrices
        A = X.tril()
        A = A - A.mH
        Q = torch.matrix_exp(A)
    else:
        A = X.tril(diagonal=-1)
        tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
        Q = torch.linalg.householder_product(A, tau)
        Q = Q * X.diagonal(dim1=-2, dim2=-1).int().unsqueeze(-2)
    if base is not None:
        Q = base @ Q
    if transposed:
        Q = Q.mT
    return Q


def _trivialised_state(rotate: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """A parametrisation state (``original``, ``base``) whose weight is exactly ``rotate`` [d, r].

    ``original`` = -I (the value torch itself stores at registration: householder(-I) is
    exactly I[:, :r]) and ``base`` = [rotate | an orthonormal complement], so
    ``base @ I[:, :r]`` reproduces ``rotate`` bit for bit and further pyreft training keeps
    the columns orthonormal.
    """
    d, r = rotate.shape
    work = rotate.detach().to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    full = torch.cat([work, torch.randn(d, d - r, generator=gen, dtype=torch.float64)], dim=1)
    q, _ = torch.linalg.qr(full)
    base = torch.cat([rotate.detach(), q[:, r:].to(rotate.dtype)], dim=1).contiguous()
    original = torch.zeros(d, r, dtype=rotate.dtype)
    original.diagonal().fill_(-1.0)
    return {
        "rotate_layer.parametrizations.weight.original": original,
        "rotate_layer.parametrizations.weight.0.base": base,
    }


# --------------------------------------------------------------------------- one codec per Φ type


def _take(state: dict[str, Tensor], name: str, shape: tuple[int, ...], d_model: int) -> Tensor:
    t = state.get(name)
    if t is None:
        raise StateError(f"tensor {name!r} is missing; it has {sorted(state)}.")
    if tuple(t.shape) != shape:
        if len(t.shape) == len(shape) and t.ndim >= 1 and d_model in shape and d_model not in t.shape:
            raise StateError(
                f"{name} has shape {tuple(t.shape)}, which does not fit the model's d_model={d_model}. It was trained "
                "on a model with another hidden size."
            )
        raise StateError(f"{name} has shape {tuple(t.shape)}; expected {shape}.")
    if not t.is_floating_point():
        raise StateError(f"{name} is {t.dtype}, not a float tensor.")
    return t


def _rotate(state: dict[str, Tensor], d: int, r: int) -> Tensor:
    """The effective rotate_layer.weight [d, r] of a pyreft intervention."""
    if "rotate_layer" in state:  # LoreftIntervention's custom state_dict: already materialised
        return _take(state, "rotate_layer", (d, r), d)
    original = _take(state, "rotate_layer.parametrizations.weight.original", (d, r), d)
    base_name = "rotate_layer.parametrizations.weight.0.base"
    base = _take(state, base_name, (d, d), d) if base_name in state else None
    with torch.no_grad():
        return orthogonal_weight(original, base)


def _rotate_for_pyreft(rows_module: OrthonormalRows) -> Tensor:
    """pyreft's rotate [d, r] for a reftlens OrthonormalRows: the R reftlens computes with (its
    held rows, or QR(A)), so pyreft computes with the same R bit for bit."""
    return rows_module.weight.detach().T.contiguous().clone()


def _dims(phi: nn.Module) -> dict[str, Tensor]:
    return {"embed_dim": torch.tensor(phi.d_model), "interchange_dim": torch.tensor(phi.d_model)}


class Codec:
    """How one reftlens Φ type and one pyreft intervention class map onto each other.

    ``pyreft_class`` is the class name in ``pyreft.interventions`` (its config's
    ``intervention_types``), ``phi_type`` the reftlens Φ, ``rank_from`` the tensors that carry
    the rank (name, dim; the first present wins). :meth:`to_phi` builds the Φ from a pyreft
    state dict (tensors as ``torch.load`` returns them), :meth:`from_phi` writes one.
    Every codec is in :data:`CODECS`; nothing else in this module knows a type by name.
    """

    name: str
    pyreft_class: str
    phi_type: type[nn.Module]
    rank_from: tuple[tuple[str, int], ...]

    def rank(self, state: dict[str, Tensor]) -> int:
        for tensor, dim in self.rank_from:
            if tensor in state and state[tensor].ndim > dim:
                return int(state[tensor].shape[dim])
        raise StateError(f"cannot find its rank in tensors {sorted(state)}.")

    def to_phi(self, state: dict[str, Tensor], d: int, dtype: torch.dtype) -> nn.Module:
        """The reftlens Φ (eval mode, ``dtype``) computing what pyreft computes with ``state``."""
        embed = state.get("embed_dim")
        if embed is not None and embed.numel() == 1 and int(embed) != d:
            raise StateError(
                f"it was trained on a model with hidden size {int(embed)}, but this model's d_model is {d}. "
                "Load it onto the model it was trained on."
            )
        r = self.rank(state)
        phi = self.phi_type(d, r, init="random")
        with torch.no_grad():
            self._fill(phi, state, d, r)
        return phi.to(dtype).eval()  # a held R stays held: .to casts A and its held value alike

    def _fill(self, phi: nn.Module, state: dict[str, Tensor], d: int, r: int) -> None:
        raise NotImplementedError

    def from_phi(self, phi: nn.Module) -> dict[str, Tensor]:
        """The pyreft state dict (what pyreft's ``ReftModel.save`` writes) for ``phi``."""
        raise NotImplementedError

    def _hold_rotate(self, rows: OrthonormalRows, state: dict[str, Tensor], d: int, r: int) -> None:
        """Set an OrthonormalRows to the saved rotate layer, bit for bit (held: see OrthonormalRows)."""
        rotate = _rotate(state, d, r)
        err = (rotate.double().T @ rotate.double() - torch.eye(r, dtype=torch.float64)).abs().max().item()
        if not err <= _ROTATE_CHECK_ATOL:
            raise StateError(
                f"its rotate_layer is not orthonormal (max |R Rᵀ - I| = {err:.2g}; e.g. weight decay moved the "
                "diagonal of the orthogonal parametrisation's 'original'). reftlens's "
                f"{self.pyreft_class.replace('Intervention', '')} keeps R orthonormal and cannot represent it exactly."
            )
        rows.set_(rotate.T, atol=_ROTATE_CHECK_ATOL)  # A = Rᵀ exactly, and R = Aᵀ until trained

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pyreft_class} <-> {self.phi_type.__name__})"


class LoReFTCodec(Codec):
    """LoreftIntervention: ``weight``, ``bias``, ``rotate_layer`` (materialised) ↔ LoReFT W, b, Rᵀ."""

    name, pyreft_class, phi_type = "loreft", "LoreftIntervention", LoReFT
    rank_from = (("weight", 0), ("rotate_layer", 1))

    def _fill(self, phi, state, d, r):
        self._hold_rotate(phi.R, state, d, r)
        phi.W.weight.copy_(_take(state, "weight", (r, d), d))
        phi.W.bias.copy_(_take(state, "bias", (r,), d))

    def from_phi(self, phi):
        return {
            "weight": phi.W.weight.detach().clone(),
            "bias": phi.b.detach().clone(),
            "rotate_layer": _rotate_for_pyreft(phi.R),
        }


class NoReFTCodec(Codec):
    """NoreftIntervention: ``proj_layer`` = P, ``learned_source`` = W, b (b − b_P with add_bias)."""

    name, pyreft_class, phi_type = "noreft", "NoreftIntervention", NoReFT
    rank_from = (("learned_source.weight", 0), ("proj_layer.weight", 0))

    def _fill(self, phi, state, d, r):
        phi.P.weight.copy_(_take(state, "proj_layer.weight", (r, d), d))
        phi.W.weight.copy_(_take(state, "learned_source.weight", (r, d), d))
        bias = _take(state, "learned_source.bias", (r,), d)
        if "proj_layer.bias" in state:  # add_bias=True: (Wh + b) − (Ph + b_P) = Wh + (b − b_P) − Ph
            bias = bias - _take(state, "proj_layer.bias", (r,), d)
        phi.W.bias.copy_(bias)

    def from_phi(self, phi):  # written without proj_layer.bias: build it in pyreft with add_bias=False
        return {
            **_dims(phi),
            "proj_layer.weight": phi.P.weight.detach().clone(),
            "learned_source.weight": phi.W.weight.detach().clone(),
            "learned_source.bias": phi.b.detach().clone(),
        }


class NodiReFTCodec(NoReFTCodec):
    """NodireftIntervention: as Noreft, but pyreft's forward never uses ``proj_layer.bias``."""

    name, pyreft_class, phi_type = "nodireft", "NodireftIntervention", NodiReFT

    def _fill(self, phi, state, d, r):
        phi.P.weight.copy_(_take(state, "proj_layer.weight", (r, d), d))
        phi.W.weight.copy_(_take(state, "learned_source.weight", (r, d), d))
        phi.W.bias.copy_(_take(state, "learned_source.bias", (r,), d))


class DiReFTCodec(Codec):
    """DireftIntervention: ``learned_source`` = W₁, b and the parametrised rotate layer = W₂ᵀ.

    pyreft's R is orthonormal, reftlens's W₂ free: a W₂ with non-orthonormal rows is written as
    W₂ᵀ = QU (R = Q, W₁ ← UW₁, b ← Ub), the same function.
    """

    name, pyreft_class, phi_type = "direft", "DireftIntervention", DiReFT
    rank_from = (("learned_source.weight", 0), ("rotate_layer.parametrizations.weight.original", 1))

    def _fill(self, phi, state, d, r):
        phi.W1.weight.copy_(_take(state, "learned_source.weight", (r, d), d))
        phi.W1.bias.copy_(_take(state, "learned_source.bias", (r,), d))
        phi.W2.copy_(_rotate(state, d, r).T)

    def from_phi(self, phi):
        with torch.no_grad():
            W1, b, W2 = phi.W1.weight.detach(), phi.b.detach(), phi.W2.detach()
            gram = W2.double() @ W2.double().T
            if (gram - torch.eye(W2.shape[0], dtype=torch.float64)).abs().max().item() <= 1e-5:
                rotate, W1, b = W2.T.contiguous(), W1.clone(), b.clone()
            else:
                q, u = torch.linalg.qr(W2.T.double())
                rotate = q.to(W2.dtype).contiguous()
                W1, b = (u @ W1.double()).to(W1.dtype), (u @ b.double()).to(b.dtype)
        return {**_dims(phi), "learned_source.weight": W1, "learned_source.bias": b, **_trivialised_state(rotate)}


class SubspaceBiasCodec(Codec):
    """ConsreftIntervention / LobireftIntervention: ``learned_source`` = b [r] and the parametrised
    rotate layer = Rᵀ (the two differ only in their forward)."""

    rank_from = (("rotate_layer.parametrizations.weight.original", 1), ("learned_source", 0))

    def __init__(self, name: str, pyreft_class: str, phi_type: type[nn.Module]):
        self.name, self.pyreft_class, self.phi_type = name, pyreft_class, phi_type

    def _fill(self, phi, state, d, r):
        self._hold_rotate(phi.R, state, d, r)
        phi.b.copy_(_take(state, "learned_source", (r,), d))

    def from_phi(self, phi):
        return {**_dims(phi), "learned_source": phi.b.detach().clone(), **_trivialised_state(_rotate_for_pyreft(phi.R))}


# the one table: pyreft class ↔ reftlens Φ type
CODECS: tuple[Codec, ...] = (
    LoReFTCodec(),
    NoReFTCodec(),
    DiReFTCodec(),
    NodiReFTCodec(),
    SubspaceBiasCodec("consreft", "ConsreftIntervention", ConsReFT),
    SubspaceBiasCodec("lobireft", "LobireftIntervention", LoBiReFT),
)
# pyreft class name → reftlens type name
PYREFT_TYPES = {c.pyreft_class: c.name for c in CODECS}


def codec_for_pyreft(pyreft_class: str) -> Codec:
    for c in CODECS:
        if c.pyreft_class == pyreft_class:
            return c
    raise KeyError(pyreft_class)


def codec_for_phi(phi: nn.Module) -> Codec | None:
    return next((c for c in CODECS if type(phi) is c.phi_type), None)


# --------------------------------------------------------------------------- reading


class PyreftIntervention:
    """One intervention of a pyreft save, as read from disk (tensors only)."""

    def __init__(self, key: str, type_name: str, layer: int, component: str, state: dict[str, Tensor]):
        self.key, self.type_name, self.layer, self.component, self.state = key, type_name, layer, component, state

    @property
    def codec(self) -> Codec:
        return codec_for_pyreft(self.type_name)

    def __repr__(self) -> str:
        return f"PyreftIntervention({self.key!r}, {self.type_name}, layer={self.layer})"


def _representation(entry: Any, i: int, config_path: Path) -> dict[str, Any]:
    if isinstance(entry, dict):
        unknown = set(entry) - set(_REPR_FIELDS)
        if unknown:
            raise LoadError(f"{config_path}: representation {i} has unknown fields {sorted(unknown)}.")
        return {f: entry.get(f, d) for f, d in zip(_REPR_FIELDS, _REPR_DEFAULTS)}
    if isinstance(entry, (list, tuple)) and len(entry) <= len(_REPR_FIELDS):
        values = list(entry) + list(_REPR_DEFAULTS[len(entry) :])
        return dict(zip(_REPR_FIELDS, values))
    raise LoadError(f"{config_path}: representation {i} is not a pyvene RepresentationConfig: {entry!r}.")


def _pyvene_key(rep: dict[str, Any], seen: dict[str, int]) -> str:
    """pyvene's ``_get_representation_key``."""
    c, u, n = str(rep["component"]), str(rep["unit"]), rep["max_number_of_units"]
    u = u.replace(".", "_")
    proposal = (
        f"comp_{c.replace('.', '_')}_unit_{u}_nunit_{n}"
        if "." in c
        else f"layer_{rep['layer']}_comp_{c}_unit_{u}_nunit_{n}"
    )
    seen[proposal] = seen.get(proposal, -1) + 1
    return f"{proposal}#{seen[proposal]}"


def _type_name(type_str: Any, key: str) -> str:
    m = _TYPE_RE.match(type_str) if isinstance(type_str, str) else None
    cls = m.group("cls") if m else None
    if m is None or cls not in PYREFT_TYPES or not m.group("module").startswith("pyreft"):
        raise LoadError(
            f"intervention {key}: unsupported intervention type {type_str!r}. Supported pyreft types: "
            f"{', '.join(PYREFT_TYPES)} (pyreft.interventions)."
        )
    return cls


def _load_state(path: Path, key: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise LoadError(f"intervention {key}: its weights file {path.name} is missing from {path.parent}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{path} is not a plain tensor state dict: torch.load(weights_only=True) refused it ({first}). "
            "reftlens never unpickles code; re-save it with pyreft's ReftModel.save or torch.save of a "
            "dict of tensors."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise LoadError(f"{path} does not hold a state dict of tensors (got {type(state).__name__}).")
    return dict(state)


def read_pyreft(path: str | os.PathLike) -> tuple[list[PyreftIntervention], dict[str, Any]]:
    """Read a pyreft save: its interventions (in pyvene's key order) and its raw config.

    Only ``config.json`` (JSON) and the ``intkey_*.bin`` files (``weights_only=True``) are read,
    and only inside the folder (a key leading out of it raises :class:`LoadError`).
    """
    folder = recover(path)  # a save_pyreft interrupted by a crash: its earlier output is restored
    if not folder.is_dir():
        raise LoadError(f"{folder} does not exist or is not a folder; expected a pyreft ReftModel.save folder.")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise LoadError(f"{folder} is not a pyreft save: {CONFIG_FILE} is missing.")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_path} is not valid JSON ({e}).") from None
    reps = config.get("representations") if isinstance(config, dict) else None
    types = config.get("intervention_types") if isinstance(config, dict) else None
    if not isinstance(reps, list) or not reps or types is None:
        raise LoadError(
            f"{config_path} is not a pyreft/pyvene config: it needs 'representations' and 'intervention_types'."
        )
    if isinstance(types, str):
        types = [types] * len(reps)
    if not isinstance(types, list) or len(types) != len(reps):
        raise LoadError(f"{config_path}: {len(reps)} representations but intervention_types is {types!r}.")

    seen: dict[str, int] = {}
    out = []
    for i, (entry, type_str) in enumerate(zip(reps, types)):
        rep = _representation(entry, i, config_path)
        key = _pyvene_key(rep, seen)
        cls = _type_name(type_str, key)
        if rep["component"] != "block_output":
            raise LoadError(
                f"intervention {key}: component {rep['component']!r} is not supported. reftlens maps only pyvene's "
                "'block_output' (the decoder layer's output, TransformerLens resid_post)."
            )
        if rep["unit"] != "pos" or rep["max_number_of_units"] != 1:
            raise LoadError(
                f"intervention {key}: unit {rep['unit']!r} with max_number_of_units={rep['max_number_of_units']} is not "
                "supported; reftlens maps pyreft's token-position interventions (unit 'pos', 1 unit)."
            )
        if rep["intervention_link_key"] is not None:
            raise LoadError(
                f"intervention {key} has intervention_link_key={rep['intervention_link_key']!r}. pyvene feeds a linked "
                "intervention the *edited activations* of the first one it is linked to (from that one's layer), not "
                "its own hidden state, which no reftlens Φ expresses. (To share weights across layers, pyreft passes "
                "one intervention object to several representations, without a link key; that loads.)"
            )
        if rep["subspace_partition"] is not None or rep["hidden_source_representation"]:
            raise LoadError(
                f"intervention {key}: subspace partitions and constant source representations are not supported."
            )
        layer = rep["layer"]
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise LoadError(f"intervention {key}: layer {layer!r} is not a layer index.")
        state = _load_state(inside(folder, f"intkey_{key}.bin", f"{config_path}: intervention {key}"), key)
        out.append(PyreftIntervention(key, cls, layer, rep["component"], state))
    return out, config


def _metadata_positions(config: dict[str, Any], ivs: Sequence[PyreftIntervention]) -> list[PositionSpec] | None:
    meta = config.get(METADATA_KEY)
    if not isinstance(meta, dict) or not isinstance(meta.get("positions"), dict):
        return None
    saved = meta["positions"]
    if set(saved) != {iv.key for iv in ivs} or any(saved[iv.key] is None for iv in ivs):
        return None
    try:
        return [from_json(saved[iv.key]) for iv in ivs]
    except ValueError:
        return None


def _metadata_ties(config: dict[str, Any], ivs: Sequence[PyreftIntervention]) -> dict[str, int]:
    """Keys that were one reftlens Φ (recorded by save_pyreft): key → Φ index."""
    meta = config.get(METADATA_KEY)
    phi = meta.get("phi") if isinstance(meta, dict) else None
    if not isinstance(phi, dict):
        return {}
    return {iv.key: phi[iv.key] for iv in ivs if isinstance(phi.get(iv.key), int)}


def _same_state(a: PyreftIntervention, b: PyreftIntervention) -> bool:
    return (
        a.type_name == b.type_name
        and a.state.keys() == b.state.keys()
        and all(a.state[k].dtype == b.state[k].dtype and torch.equal(a.state[k], b.state[k]) for k in a.state)
    )


def _untied_layout(layers: Sequence[int]) -> bool:
    """pyreft's untied first/last layout: the layer list is duplicated (``layers += layers``)."""
    n = len(layers)
    return n % 2 == 0 and list(layers[: n // 2]) == list(layers[n // 2 :])


def _resolve_positions(
    positions: Any,
    ivs: Sequence[PyreftIntervention],
    config: dict[str, Any],
    untied: bool | str,
    clamp: bool,
    folder: Path,
) -> list[PositionSpec]:
    n = len(ivs)
    if positions is None:
        stored = _metadata_positions(config, ivs)
        if stored is not None:
            return stored
        raise ConfigError(
            f"{folder}: pyreft does not save which tokens its interventions edit, and this folder records none "
            '(only save_pyreft writes them), so say which ones the checkpoint was trained on: positions="l1" for '
            "pyreft's README example (the last token), positions=\"f1+l1\" for its training script's default "
            '(examples/loreft/train.py --position f1+l1), "f5+l5" etc. for other --position values, or a list with '
            f"one spec per intervention ({n} here, in config order). A wrong guess loads without error but gives "
            "other logits."
        )
    if (
        isinstance(positions, (list, tuple))
        and positions
        and all(isinstance(p, (str, PositionSpec)) for p in positions)
    ):
        if len(positions) != n:
            raise ConfigError(
                f"positions lists {len(positions)} specs, but the save has {n} pyreft interventions; give one spec per "
                f"intervention, in config order: {[iv.key for iv in ivs]}."
            )
        return [_clamped(parse_positions(p), clamp) for p in positions]
    spec = parse_positions(positions)
    if untied not in ("auto", True, False):
        raise ConfigError(f"untied must be 'auto', True or False; got {untied!r}.")
    splittable = isinstance(spec, FirstLast) and spec.first > 0 and spec.last > 0
    layout = _untied_layout([iv.layer for iv in ivs])
    if untied is True and not (splittable and layout):
        raise ConfigError(
            f"untied=True needs an 'fN+lM' position spec (got {spec}) and pyreft's untied layout, the layer list "
            f"duplicated (got layers {[iv.layer for iv in ivs]})."
        )
    if splittable and layout and untied in ("auto", True):
        first, last = FirstLast(spec.first, 0, clamp), FirstLast(0, spec.last, clamp)
        return [first] * (n // 2) + [last] * (n // 2)
    return [_clamped(spec, clamp)] * n


def _saved_width(state: dict[str, Any]) -> int | None:
    """The hidden size a pyreft intervention was trained on: its ``embed_dim``, else the larger
    side of its weight matrices (a rank is never above the width)."""
    embed = state.get("embed_dim")
    if isinstance(embed, torch.Tensor) and embed.numel() == 1:
        return int(embed)
    sides = [max(t.shape) for t in state.values() if isinstance(t, torch.Tensor) and t.ndim == 2]
    return max(sides) if sides else None


def _check_base_model(config: dict[str, Any], model: Any, folder: Path) -> None:
    """The base-model fingerprint save_pyreft recorded, if any, against ``model``'s (as ReftModel.load)."""
    meta = config.get(METADATA_KEY)
    saved = meta.get("base_model") if isinstance(meta, dict) else None
    if not isinstance(saved, dict):
        return  # pyreft's own saves record no base model
    here = fingerprint(model)
    diff = fingerprint_diff(saved, here)
    if diff:
        kept, shapes = ({k: v for k, v in f.items() if k != "weights"} for f in (saved, here))
        raise LoadError(
            f"{folder} was trained on a different base model ({'; '.join(diff)}): saved fingerprint {kept}, this "
            f"model's {shapes}. Load it onto the model it was trained on."
        )


def _clamped(spec: PositionSpec, clamp: bool) -> PositionSpec:
    if clamp and isinstance(spec, FirstLast) and spec.first > 0 and spec.last > 0:
        return FirstLast(spec.first, spec.last, True)
    return spec


def load_pyreft(
    path: str | os.PathLike,
    model: Any,
    *,
    positions: Any = None,
    untied: bool | str = "auto",
    overlap: str = "clamp",
    dtype: torch.dtype | None = None,
    cast: bool = False,
) -> "ReftModel":
    """Load a pyreft ``ReftModel.save`` folder onto a TransformerLens model, as a reftlens ``ReftModel``.

    Each pyreft intervention becomes an :class:`~reftlens.Intervention` named by its pyvene key,
    with identical weights (see the module docstring for the mapping), at its layer's
    ``resid_post`` (pyvene's ``block_output``). Only tensors are read (``weights_only=True``).
    Each key gets its own Φ (pyreft's own load does the same, even where one intervention object
    served several layers in training), except keys that :func:`save_pyreft` recorded as one Φ and
    whose tensors are still equal: those share it again. pyvene's ``intervention_link_key`` is
    refused: a linked intervention reads the first one's edited activations, not its own layer.

    Positions: pyreft does not save them (they are a data-time choice, ``unit_locations``), so
    say which tokens each intervention edits; a wrong guess loads without error and gives other
    logits, so there is no default:

    - ``positions=None`` (default): the positions recorded by :func:`save_pyreft` in config.json;
      a folder without them (any save made by pyreft itself) raises a ConfigError that says what
      to pass: ``"l1"`` for pyreft's README example (last token), ``"f1+l1"`` for the default of
      its training script (``examples/loreft/train.py --position``).
    - one spec (``"f5+l5"``, ``"l1"``, ...): with ``untied="auto"`` an ``fN+lM`` spec is split the
      way pyreft's data pipeline splits it for untied weights (``share_weights=False``, where the
      script duplicates the layer list, ``layers += layers``): when the saved layers read
      ``[L1..Lk, L1..Lk]``, the first k interventions edit the first N tokens and the last k the
      last M tokens. Otherwise (``share_weights=True``, or ``untied=False``) every intervention
      edits the whole spec. ``untied=True`` insists on the split.
    - a list with one spec per pyreft intervention, in config order, for anything else.

    ``overlap="clamp"`` (default; as :class:`~reftlens.Intervention`'s ``overlap``) clamps N and M
    of an ``fN+lM`` spec to half of each prompt, as pyreft's ``get_intervention_locations`` does,
    so first and last groups never meet on short prompts (pyreft then points the missing slots at
    a pad token; reftlens edits nothing there). ``overlap="error"`` keeps N and M as given, and
    first/last groups that meet raise an error.
    Positions count real tokens, whatever the padding (pyreft's datasets prepend one pad token
    and shift positions by one; reftlens needs no such shift).

    ``dtype``: the Φs' dtype (default: the model's). pyreft builds ``learned_source`` and
    ``proj_layer`` in bf16 unless told otherwise; the upcast to fp32 is exact. ``cast``: as
    :class:`~reftlens.ReftModel`'s, needed when ``dtype`` differs from a bf16/fp16 base's (float32 Φs
    over a bf16 base: the edit runs in float32 and is cast back to the base's dtype).

    Errors (:class:`reftlens.saving.LoadError`) name the file, key or tensor: a missing folder,
    config or ``intkey_*.bin``, an unknown intervention type or a component other than
    ``block_output``, a hidden size or layer the model does not have, a ``.bin`` that is not a
    plain tensor state dict, and (for folders written by :func:`save_pyreft`, which records the
    base model's fingerprint as :meth:`reftlens.ReftModel.save` does) another base model.

    Start tokens: pyreft's pipeline tokenizes with the Hugging Face tokenizer, which for SmolLM2
    adds no start token, while reftlens prepends the model's (see :func:`reftlens.text_tokens`):
    pass ``prepend_bos=False`` to ``reft(...)``, ``reft.generate`` and ``collect`` to reproduce
    pyreft's tokenization (on one-token prompts the last-position logits otherwise differ by up
    to 45). Which token reftlens prepends depends on the load: ``load_model("smollm2-135m")``
    configures its offline copy with start token ``<|endoftext|>`` (id 0) and pad
    ``<empty_output>`` (id 16) (see docs/export.md, "Start tokens"), while a SmolLM2 folder loaded with
    ``load_model(folder)`` keeps its own tokenizer config (``<|im_start|>``, pad ``<|im_end|>``).

    Weights are loaded bit for bit; rotations are held as saved (see
    :class:`~reftlens.OrthonormalRows`), so a loaded LoReFT, ConsReFT or LoBiReFT computes with
    pyreft's own R rather than a re-orthonormalised one.

    >>> reft = load_pyreft("my-pyreft-save", bridge, positions="f5+l5")  # doctest: +SKIP
    """
    from reftlens.model import ReftModel
    from reftlens.sets import Intervention

    if overlap not in ("clamp", "error"):
        raise ConfigError(f"overlap must be 'clamp' or 'error'; got {overlap!r}.")
    if not isinstance(cast, bool):
        raise ConfigError(f"cast must be True or False; got {cast!r}.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype (e.g. torch.float32) or None; got {dtype!r}.")
    ivs, config = read_pyreft(path)
    folder = Path(path)
    _check_base_model(config, model, folder)
    _check_layers(ivs, int(model.cfg.n_layers), int(model.cfg.d_model))
    if dtype is None:
        dtype = next(model.parameters()).dtype
    phis = _build_phis(ivs, _metadata_ties(config, ivs), int(model.cfg.d_model), dtype)
    specs = _resolve_positions(positions, ivs, config, untied, overlap == "clamp", folder)
    interventions = [
        Intervention(phi, layers=iv.layer, positions=spec, hook="resid_post", name=iv.key)
        for iv, phi, spec in zip(ivs, phis, specs)
    ]
    return ReftModel(model, interventions, cast=cast)


def _check_layers(ivs: Sequence[PyreftIntervention], n_layers: int, d: int) -> None:
    """Each saved intervention fits this model: its width (named first) and its layer."""
    for iv in ivs:
        width = _saved_width(iv.state)
        if width is not None and width != d:
            raise LoadError(
                f"intervention {iv.key} was trained on a model of hidden size (width) {width}, but this model's "
                f"d_model is {d}"
                + (
                    f" (and it is at layer {iv.layer}, beyond this model's 0..{n_layers - 1})"
                    if iv.layer >= n_layers
                    else ""
                )
                + ". Load it onto the model it was trained on."
            )
        if iv.layer >= n_layers:
            raise LoadError(
                f"intervention {iv.key} is at layer {iv.layer}, but the model has layers 0..{n_layers - 1}."
            )


def _build_phis(ivs: Sequence[PyreftIntervention], ties: dict[str, int], d: int, dtype: torch.dtype) -> list[nn.Module]:
    """One Φ per pyreft intervention, in order; keys that save_pyreft recorded as one Φ (``ties``)
    share the first one's Φ again while their tensors are still equal."""
    phis: list[nn.Module] = []
    by_group: dict[int, tuple[PyreftIntervention, nn.Module]] = {}
    for iv in ivs:
        group = ties.get(iv.key)
        if group is not None and group in by_group and _same_state(by_group[group][0], iv):
            phi = by_group[group][1]
        else:
            try:
                phi = iv.codec.to_phi(iv.state, d, dtype)
            except StateError as e:
                raise LoadError(f"intervention {iv.key} ({iv.type_name}): {e}") from None
            if group is not None and group not in by_group:
                by_group[group] = (iv, phi)
        phis.append(phi)
    return phis


# --------------------------------------------------------------------------- writing


def save_pyreft(reft: "ReftModel", path: str | os.PathLike) -> Path:
    """Write ``reft`` as a pyreft / pyvene ``ReftModel.save`` folder (``config.json`` + ``intkey_*.bin``).

    Supported: LoReFT, NoReFT, DiReFT, NodiReFT, ConsReFT and LoBiReFT at ``resid_post``
    (pyvene's ``block_output``). One pyreft intervention is written per (Φ, layer, position group),
    ordered the way pyreft's untied first/last layout expects (all first-token groups, then all
    last-token groups); a Φ used at several of them (tied) is written once per key with equal
    tensors (no ``intervention_link_key``, which in pyvene means something else), so pyreft runs
    the same function but loads the copies untied. Positions, tying and the base model's
    fingerprint (:func:`reftlens.saving.fingerprint`) are not part of pyreft's format: they are
    recorded under the config key ``"reftlens"`` (ignored by pyvene), which :func:`load_pyreft`
    reads back and checks.

    Tensors: NoReFT/NodiReFT are written without ``proj_layer.bias`` (build them in pyreft with
    ``add_bias=False``); DiReFT's W₂ is written as is when its rows are orthonormal, else
    re-factored as W₂ᵀ = QU (R = Q, W₁ ← UW₁, b ← Ub: the same function, since pyreft's R must be
    orthonormal); LoReFT's, ConsReFT's and LoBiReFT's R is written as reftlens computes it (the
    held rows of a Φ loaded from pyreft, else QR(A)), so pyreft computes with the same R bit for
    bit; the parametrised rotate layers are written as ``original`` = -I and ``base`` =
    [R | orthonormal complement], which pyreft evaluates to R bit for bit.

    Loading the folder in pyreft: ``pyreft.ReftModel.load(path, hf_model)`` works for Loreft, Direft,
    Consreft and Lobireft, but it rebuilds ``learned_source`` in bf16 (its constructor default,
    since the config cannot carry a dtype), so Loreft fails on an fp32 model until the
    interventions are cast, and the weights are rounded to bf16. It cannot build Noreft/Nodireft
    at all (their constructor needs ``add_bias``, which the config cannot carry). For exact
    weights, build the interventions yourself (``dtype=torch.float32``, ``add_bias=False``) and
    ``load_state_dict(torch.load(intkey_<key>.bin))`` each one.

    ``path`` must be new, an empty folder or an earlier pyreft save (``config.json`` with
    ``intkey_*.bin``), which is replaced whole; anything else raises
    :class:`~reftlens.errors.SaveError` and is left untouched.
    """
    if getattr(reft, "bank", None) is not None:
        raise ExportError(
            f"pyreft holds one intervention set per model, and this ReftModel is a bank of {len(reft.bank)} sets "
            f"({list(reft.bank)[:4]}). Export one set: save_pyreft(ReftModel(model, reft.bank[name]), path)."
        )
    sites = _sites_in_pyreft_order(reft)
    for s in sites:
        _check_exportable(s)
    config, states = _pyreft_config(reft, sites)

    def write(folder: Path) -> None:
        for key, state in states.items():
            torch.save({k: v.contiguous() for k, v in state.items()}, folder / f"intkey_{key}.bin")
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_dir(path, write, markers=[(CONFIG_FILE, "intkey_*.bin")])


def _sites_in_pyreft_order(reft: "ReftModel") -> list[Any]:
    """The set's sites, one pyreft intervention each: by intervention, then by position group
    (all first-token groups before all last-token groups), layers in order within a group."""
    entries = []  # (origin index, group index, site)
    for oi, iv in enumerate(reft.interventions):
        groups: dict[str, int] = {}
        for s in reft.sites:
            if s.unit.origin is not iv:
                continue
            label = str(s.unit.positions)
            gi = groups.setdefault(label, len(groups))
            entries.append((oi, gi, s))
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: layers keep their order within a group
    return [s for _, _, s in entries]


def _check_exportable(s: Any) -> None:
    """A site pyreft can hold: a Φ with a codec, at resid_post, not stacked."""
    phi, unit = s.unit.phi, s.unit
    if codec_for_phi(phi) is None:
        raise ConfigError(
            f"intervention {unit.name!r}: Φ {type(phi).__name__} has no pyreft counterpart; save_pyreft writes "
            f"{', '.join(c.phi_type.__name__ for c in CODECS)}."
        )
    if s.hook_name.split(".", 2)[-1] not in _BLOCK_OUTPUT_HOOKS:
        raise ConfigError(
            f"intervention {unit.name!r}: hook {s.hook_name} has no pyreft counterpart; save_pyreft writes "
            "resid_post interventions only (pyvene's 'block_output')."
        )
    if unit.stack is not None:
        raise ConfigError(
            f"intervention {unit.name!r} is stacked (stack={unit.stack}); pyreft interventions cannot stack."
        )


def _pyreft_config(reft: "ReftModel", sites: Sequence[Any]) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """pyvene's ``config.json`` (with reftlens's own record under ``"reftlens"``) and each key's tensors."""
    from reftlens.version import __version__

    phi_index = {id(phi): i for i, phi in enumerate(reft.phis)}
    seen: dict[str, int] = {}
    reps, types, keys, positions, phi_of, states = [], [], [], {}, {}, {}
    for s in sites:
        phi = s.unit.phi
        rep = dict(zip(_REPR_FIELDS, _REPR_DEFAULTS))
        rep.update(
            layer=s.layer, component="block_output", unit="pos", max_number_of_units=1, low_rank_dimension=phi.rank
        )
        key = _pyvene_key(rep, seen)
        reps.append([rep[f] for f in _REPR_FIELDS])
        codec = codec_for_phi(phi)
        types.append(f"<class 'pyreft.interventions.{codec.pyreft_class}'>")
        keys.append(key)
        phi_of[key] = phi_index[id(phi)]
        try:
            positions[key] = s.unit.positions.to_json()
        except ValueError:
            positions[key] = None
        with torch.no_grad():
            states[key] = codec.from_phi(phi)
    config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [int(reft.model.cfg.d_model)] * len(keys),
        "intervention_types": types,
        "mode": "parallel",
        "representations": reps,
        "sorted_keys": keys,
        METADATA_KEY: {
            "format": "reftlens-pyreft",
            "version": 1,
            "reftlens_version": __version__,
            "base_model": fingerprint(reft.model),
            "positions": positions,
            "phi": phi_of,
        },
    }
    return config, states
