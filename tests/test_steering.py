"""Steering: directions recover a planted concept, detection scores it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reftlens import AnalysisError
from reftlens.analysis.toy import planted_variable_model
from reftlens.steering import auroc, collect, diff_mean, pca, probe

@pytest.fixture(scope="module")
def toy():
    """The planted-variable model: parity of the last token lives in v below layer 1, in u above."""
    model, u, v = planted_variable_model()
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(10, 400, (800, 4), generator=g).tolist()
    even = torch.tensor([s[-1] % 2 == 0 for s in seqs])
    acts = collect(model, seqs, layers=[0, 2], positions="l1", batch_size=200)
    return model, u, v, seqs, even, acts


def split(acts, layer, even, n_train=400):
    x = acts.pooled(layer, "last")
    tr = torch.arange(len(even)) < n_train
    return x[tr & even], x[tr & ~even]


# ---- directions -------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,which", [(0, "v"), (2, "u")])
@pytest.mark.parametrize("fit", [diff_mean, probe])
def test_diff_mean_and_probe_recover_the_planted_direction(toy, fit, layer, which):
    _, u, v, _, even, acts = toy
    d = fit(*split(acts, layer, even))
    truth = u if which == "u" else v
    assert float(d.vector @ truth) >= 0.95  # oriented: the positive class projects higher
    assert abs(float(d.vector.norm()) - 1) < 1e-5 and d.auroc == 1.0 and d.separation > 10


@pytest.mark.parametrize("layer,which", [(0, "v"), (2, "u")])
def test_pca_of_paired_differences_recovers_it(toy, layer, which):
    _, u, v, _, even, acts = toy
    pos, neg = split(acts, layer, even)
    n = min(len(pos), len(neg))
    d = pca(pos[:n], neg[:n])
    assert float(d.vector @ (u if which == "u" else v)) >= 0.95
    assert d.explained_variance > 0.8


def test_direction_statistics_are_what_they_say():
    g = torch.Generator().manual_seed(1)
    pos = torch.randn(300, 8, generator=g) + torch.tensor([2.0] + [0.0] * 7)
    neg = torch.randn(200, 8, generator=g)
    d = diff_mean(pos, neg)
    raw = pos.mean(0) - neg.mean(0)
    torch.testing.assert_close(d.vector, raw / raw.norm())
    assert d.norm == pytest.approx(float(raw.norm()), rel=1e-5)
    p, n = pos @ d.vector, neg @ d.vector
    assert d.pos_mean == pytest.approx(float(p.mean()), rel=1e-5)
    assert d.separation == pytest.approx(float((p.mean() - n.mean()) / ((p.var() + n.var()) / 2).sqrt()), rel=1e-4)
    assert d.mean_norm == pytest.approx(float(torch.cat([pos, neg]).norm(dim=1).mean()), rel=1e-5)


# ---- detection --------------------------------------------------------------------------------


def test_detection_auroc_is_one_held_out_and_one_half_on_a_shuffled_control(toy):
    _, _, _, _, even, acts = toy
    d = diff_mean(*split(acts, 2, even))
    test = torch.arange(len(even)) >= 400
    scores = acts.scores(2, d, pool="max")[test]
    assert auroc(scores, even[test]) == 1.0
    shuffled = even[test][torch.randperm(int(test.sum()), generator=torch.Generator().manual_seed(0))]
    assert abs(auroc(scores, shuffled) - 0.5) < 0.1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40))
def test_auroc_is_the_share_of_correctly_ordered_pairs(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([b for _, b in pairs])
    if labels.all() or not labels.any():
        with pytest.raises(AnalysisError, match="needs both classes"):
            auroc(scores, labels)
        return
    p, n = scores[labels], scores[~labels]
    wins = (p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()
    assert auroc(scores, labels) == pytest.approx(float(wins.mean()), abs=1e-12)


def test_collected_rows_are_the_hook_activations_whatever_the_padding(model):
    texts = ["the quick brown fox", "a", "over the river"]
    acts = collect(model, texts, layers=[1, 3], positions=slice(1, None), batch_size=2)
    for i, t in enumerate(texts):
        _, cache = model.run_with_cache(model.to_tokens(t), names_filter=lambda n: n.endswith("hook_resid_post"))
        for layer in (1, 3):
            want = cache[f"blocks.{layer}.hook_resid_post"][0, 1:]
            torch.testing.assert_close(acts[layer][acts.example == i], want, atol=1e-5, rtol=1e-5)
    mean = acts.pooled(3, "mean")
    torch.testing.assert_close(mean[1], acts[3][acts.example == 1].mean(0))
    u = torch.nn.functional.normalize(torch.randn(model.cfg.d_model), dim=0)
    for pool, reduce in (("max", lambda x: x.max()), ("mean", lambda x: x.mean()), ("last", lambda x: x[-1])):
        got = acts.scores(3, u, pool=pool)
        want = torch.stack([reduce(acts[3][acts.example == i] @ u) for i in range(len(texts))])
        torch.testing.assert_close(got, want)


def test_direction_errors_say_what_to_give():
    with pytest.raises(AnalysisError, match=r"pairs pos\[i\] with neg\[i\]"):
        pca(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(AnalysisError, match="same width"):
        diff_mean(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(AnalysisError, match="both classes"):
        probe(torch.randn(5, 3), torch.randn(0, 3))
    with pytest.raises(AnalysisError, match="one label per score"):
        auroc(torch.randn(4), torch.tensor([0, 1]))
