"""Φ on its own: the paper's equations, orthonormality, registry, construction errors."""

import pytest
import torch

from reftlens import (
    DII,
    Collect,
    ConsReFT,
    DiReFT,
    Interchange,
    LoBiReFT,
    LoReFT,
    MeanAblation,
    Noise,
    NoReFT,
    Steer,
    ZeroAblation,
)
from reftlens.interventions import OrthonormalRows, phi_class, register, registered_types, takes_source
from reftlens.interventions.base import Phi

D = 16


def test_loreft_matches_the_paper_equation():
    torch.manual_seed(0)
    phi = LoReFT(D, 4, init="random")
    h = torch.randn(5, D)
    R, W, b = phi.R.weight, phi.W.weight, phi.W.bias
    expected = h + (h @ W.T + b - h @ R.T) @ R  # h + Rᵀ(Wh + b − Rh), row-wise
    torch.testing.assert_close(phi(h), expected)


def test_loreft_with_w_equal_r_and_zero_bias_is_the_identity():
    phi = LoReFT(D, 4, init="random")
    with torch.no_grad():
        phi.W.weight.copy_(phi.R.weight)
        phi.W.bias.zero_()
    h = torch.randn(3, 7, D)
    torch.testing.assert_close(phi(h), h, atol=1e-6, rtol=0)
    assert not torch.allclose(LoReFT(D, 4, init="random")(h), h)


def test_direft_matches_the_paper_and_w2_zero_is_the_identity():
    phi = DiReFT(D, 4, init="random")
    h = torch.randn(5, D)
    torch.testing.assert_close(phi(h), h + (h @ phi.W1.weight.T + phi.W1.bias) @ phi.W2)
    with torch.no_grad():
        phi.W2.zero_()
    assert torch.equal(phi(h), h)


def test_identity_init_is_the_default_where_the_math_allows():
    h = torch.randn(4, D)
    for cls in (LoReFT, NoReFT, DiReFT, LoBiReFT):
        torch.testing.assert_close(cls(D, 3)(h), h, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot start at the identity"):
        ConsReFT(D, 3, init="identity")


def test_dii_full_rank_is_interchange_and_low_rank_swaps_only_the_subspace():
    b, s = torch.randn(6, D), torch.randn(6, D)
    torch.testing.assert_close(DII(D, D)(b, s), Interchange()(b, s), atol=1e-5, rtol=0)
    dii = DII(D, 3)
    out, R = dii(b, s), dii.R.weight
    torch.testing.assert_close(out @ R.T, s @ R.T, atol=1e-5, rtol=0)  # subspace from the source
    P = torch.eye(D) - R.T @ R
    torch.testing.assert_close(out @ P, b @ P, atol=1e-5, rtol=0)  # complement from the base


def test_orthonormal_rows_stay_orthonormal_through_training():
    torch.manual_seed(0)
    phi = LoReFT(64, 8, init="random")
    opt = torch.optim.Adam(phi.parameters(), lr=0.05)
    target = torch.randn(32, 64)
    for _ in range(200):
        loss = (phi(torch.randn(32, 64)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = phi.R.weight
    assert (R @ R.T - torch.eye(8)).abs().max() < 1e-5


def test_orthonormal_rows_set_is_exact_for_orthonormal_input():
    q, _ = torch.linalg.qr(torch.randn(D, 4))
    rows = OrthonormalRows(D, 4).set_(q.T)
    torch.testing.assert_close(rows.weight, q.T, atol=1e-6, rtol=0)


def test_analysis_phis():
    h = torch.randn(3, D)
    assert torch.equal(ZeroAblation()(h), torch.zeros_like(h))
    mu = torch.randn(D)
    assert torch.equal(MeanAblation(mu)(h), mu.expand(3, D))
    v = torch.randn(D)
    torch.testing.assert_close(Steer(v, scale=2.0)(h), h + 2 * v)
    n1, n2 = Noise(0.5, seed=3)(h), Noise(0.5, seed=3)(h)
    assert torch.equal(n1, n2) and not torch.equal(n1, h)
    assert not torch.equal(Noise(0.5, seed=4)(h), n1)
    c = Collect()
    assert torch.equal(c(h), h) and torch.equal(c.activations[0], h)


@pytest.mark.parametrize("cls", [LoReFT, DII, DiReFT])
@pytest.mark.parametrize("rank", [0, D + 1])
def test_rank_out_of_range_is_an_error(cls, rank):
    with pytest.raises(ValueError, match=f"rank must be between 1 and d_model={D}; got rank={rank}"):
        cls(D, rank)


def test_registry_and_source_detection():
    assert {"loreft", "direft", "dii", "interchange", "noise"} <= set(registered_types())
    assert phi_class("loreft") is LoReFT
    with pytest.raises(KeyError, match="Unknown Φ type 'nope'"):
        phi_class("nope")
    assert takes_source(Interchange()) and takes_source(DII(4, 2)) and not takes_source(LoReFT(4, 2))
    assert takes_source(lambda b, s: s) and not takes_source(lambda h: h)

    @register("test_double")
    class Double(Phi):
        def forward(self, h):
            return 2 * h

    assert phi_class("test_double") is Double
    with pytest.raises(ValueError, match="already registered"):
        register("test_double")(type("Other", (Phi,), {}))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.0, "0.1"])
def test_a_reft_dropout_is_a_probability(bad):
    from reftlens import ConfigError

    with pytest.raises(ConfigError, match="LoReFT: dropout must"):
        LoReFT(8, 2, dropout=bad)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(l1=float("nan")), "ReFTr1: l1 must be a finite number"),
        (dict(l1=-1.0), "ReFTr1: l1 .* at least 0"),
        (dict(k=True), "ReFTr1: k"),
        (dict(k=0), "ReFTr1: k"),
    ],
)
def test_reft_r1_arguments_are_checked(kw, words):
    from reftlens import ConfigError, ReFTr1

    with pytest.raises(ConfigError, match=words):
        ReFTr1(8, **kw)
