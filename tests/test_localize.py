"""localize (where to train) and inspect (what a trained set learned), on planted models."""

import copy
import json
import math

import pytest
import torch

import reftlens
from reftlens import AnalysisError, DiReFT, Intervention, LoReFT, ReftModel, Steer
from reftlens.analysis.toy import planted_site_data, planted_site_model
from reftlens.insight.localize import localize
from reftlens.interventions import DII

SITE = ("resid_post", 1, "l1")  # where planted_site_model's answer is linear


@pytest.fixture(scope="module")
def planted():
    model, dirs = planted_site_model(site_layer=1)
    return model, planted_site_data(model, 64, seed=0)


def _no_hooks(model):
    return not [n for n, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]


# ---- localize -------------------------------------------------------------------------------------


@pytest.mark.parametrize("score", ["gradient", "train"])
def test_localize_ranks_the_planted_site_first(planted, score):
    model, data = planted
    res = localize(
        model, data, hooks=("resid_post",), positions=("f1", "l1", "f3+l3"), score=score, steps=None, progress=False
    )
    best = res.top(1)[0]
    assert (best.hook, best.layer, best.positions) == SITE
    # every candidate whose layer cannot read the answer scores far below the planted site
    top = float(res.scores[res.order[0]])
    for c, s in zip(res.candidates, res.scores.tolist()):
        if c.layer != 1 or c.positions == "f1":
            assert s < 0.3 * top, (c, s, top)
    assert len(res.recipe) == 1 and res.recipe[0].hook == "resid_post" and res.recipe[0].layers == (1,)
    assert str(res.recipe[0].positions) == "l1"
    assert _no_hooks(model)


def test_localize_default_hooks_find_the_layer_that_holds_the_answer(planted):
    model, data = planted
    res = localize(model, data, positions=("f1", "l1"), progress=False)
    assert [c.hook for c in res.candidates[:2]] == ["resid_post", "resid_post"]
    best = res.top(1)[0]
    assert (best.hook, best.layer, best.positions) == SITE
    # where the answer is linear (resid_post@1, mlp_out@1 writes it, mlp_out@2 erases it) vs everywhere else
    readable = {("resid_post", 1), ("mlp_out", 1), ("mlp_out", 2)}
    top = float(res.scores[res.order[0]])
    for c, s in zip(res.candidates, res.scores.tolist()):
        if (c.hook, c.layer) not in readable or c.positions == "f1":
            assert s < 0.3 * top, (c, s, top)
    assert res.values("attn_out").shape == (4, 2)
    table = res.table()
    assert table[0]["rank"] == 1 and table[0]["chosen"] and sum(r["chosen"] for r in table) == 1
    assert json.loads(res.to_json())["recipe"][0]["layers"] == [1]
    fig = res.heatmap()
    assert len(fig.axes) >= 3


def test_localize_recipe_trains_as_is(planted):
    model, data = planted
    res = localize(model, data, hooks=("resid_post",), positions=("l1",), budget=10_000, progress=False)
    assert len(res.recipe) == 4  # one Φ per layer fits; each site once
    sites = {(iv.hook, iv.layers) for iv in res.recipe}
    assert len(sites) == 4
    reft = ReftModel(model, res.recipe[:1])
    reftlens.train(reft, data, batch_size=16, max_steps=30, lr=2e-2, progress=False)
    test = planted_site_data(model, 32, seed=1)
    with torch.no_grad():
        logits = reft([d["prompt"] for d in test])
    answers = model.tokenizer.convert_tokens_to_ids([d["completion"] for d in test])
    assert logits[:, -1].argmax(-1).tolist() == answers  # the base model knows none of them


def test_localize_budget_and_collisions(planted):
    model, data = planted
    one = sum(p.numel() for p in LoReFT(16, 4).parameters())
    res = localize(model, data, hooks=("resid_post",), positions=("l1", "f3+l3", "f1"), budget=2 * one, progress=False)
    assert len(res.recipe) == 2
    # l1 and f3+l3 overlap at one site: the recipe never holds both at one layer
    picked = [(iv.layers, str(iv.positions)) for iv in res.recipe]
    assert picked[0] == ((1,), "l1") and picked[1] != ((1,), "f3+l3")
    reft = ReftModel(model, res.recipe)  # builds: no collision
    assert reft.num_trainable_parameters() <= 2 * one
    steer = localize(model, data, family="steer", hooks=("resid_post",), positions=("l1",), progress=False)
    assert isinstance(steer.recipe[0].phi, Steer)


def test_train_score_bank_equals_candidates_trained_alone(planted):
    """A bank trains each candidate exactly as alone: chunking the bank changes no score."""
    model, data = planted
    kw = dict(hooks=("resid_post",), layers=[0, 1], positions=("l1", "f1"), score="train", steps=5, progress=False)
    joint = localize(model, data, **kw)
    alone = localize(model, data, bank_size=1, **kw)
    torch.testing.assert_close(joint.scores, alone.scores, rtol=1e-4, atol=1e-5)


def test_localize_on_a_bf16_base_gives_phis_that_train_as_they_are(tiny_models):
    """On a bf16 base the candidates' Φs take the base's dtype (as load_pyreft builds them): both
    scores run, and the recipe trains with ``train(ReftModel(model, res.recipe))``, no ``cast=``."""
    model = reftlens.load_model("tiny-llama", dtype=torch.bfloat16)
    kw = dict(hooks=("resid_post",), layers=[1], positions=("l1", "f1"), budget=10_000, progress=False)
    for score in ("gradient", "train"):
        res = localize(model, DATA, score=score, steps=2, batch_size=2, **kw)
        assert torch.isfinite(res.scores).all() and len(res.recipe) == 2
        assert {p.dtype for iv in res.recipe for p in iv.phi.parameters()} == {torch.bfloat16}
        losses = reftlens.train(ReftModel(model, res.recipe), DATA, max_steps=2, progress=False).losses
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # the same seed builds the same Φ as on the float32 base, rounded to bf16 once
    one = dict(kw, positions=("l1",), budget=None)
    (lo16,) = localize(model, DATA, steps=1, **one).recipe
    (lo32,) = localize(tiny_models["tiny-llama"], DATA, steps=1, **one).recipe
    want = {k: v.to(torch.bfloat16) for k, v in lo32.phi.state_dict().items()}
    got = lo16.phi.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"family": "lora"}, "family"),
        ({"rank": 0}, "rank"),
        ({"rank": 1000}, "rank"),
        ({"hooks": ("resid_post", "nope")}, "hooks"),
        ({"hooks": ()}, "hooks"),
        ({"hooks": ("attn.hook_z",)}, "hooks"),
        ({"layers": [0, 9]}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"positions": "l1"}, "positions"),
        ({"positions": ("l1", "bogus")}, "positions"),
        ({"positions": ("l1", "l1")}, "positions"),
        ({"budget": 10}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"score": "causal"}, "score"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": float("nan")}, "lr"),
        ({"bank_size": 0}, "bank_size"),
        ({"task": "regression"}, "task"),
        ({"progress": "yes"}, "progress"),
        ({"seed": -1}, "seed"),
    ],
)
def test_localize_names_bad_arguments(planted, kwargs, words):
    model, data = planted
    with pytest.raises(AnalysisError, match=words):
        localize(model, data, **{"progress": False, **kwargs})


def test_localize_names_bad_data(planted):
    model, _ = planted
    with pytest.raises(AnalysisError, match="data is empty"):
        localize(model, [], progress=False)
    with pytest.raises(AnalysisError, match="data"):
        localize(model, [{"text": "no prompt"}], progress=False)
    with pytest.raises(AnalysisError, match="data must be"):
        localize(model, "a string", progress=False)
    with pytest.raises(AnalysisError, match="bridge"):
        localize(object(), [{"prompt": "a", "completion": "b"}])


# ---- inspect --------------------------------------------------------------------------------------

DATA = [
    {"prompt": "the cat sat on", "completion": " the mat"},
    {"prompt": "a dog ran", "completion": " away"},
    {"prompt": "the sun is", "completion": " hot"},
]


def test_inspect_lists_the_planted_token_first(model):
    token = 123
    v = model.W_U.detach()[:, token].clone() * 4
    reft = ReftModel(model, Intervention(Steer(v), layers=model.cfg.n_layers - 1, positions="l1", name="plant"))
    report = reftlens.inspect(reft, DATA, top_k=5)
    iv = report.interventions[0]
    assert report.promoted(0)[0] == token
    layer = model.cfg.n_layers - 1
    assert iv.mean_edit[layer]["promoted"][0]["id"] == token
    assert iv.mean_edit[layer]["rows"] == len(DATA)  # one edited row (l1) per example, data only
    torch.testing.assert_close(torch.tensor(iv.mean_edit[layer]["norm"]), v.norm(), rtol=1e-5, atol=1e-6)
    assert iv.share_alone == pytest.approx(1.0) and iv.share_removed == pytest.approx(1.0)
    assert iv.off_target["kl"] > 0
    out = json.loads(report.to_json())
    assert out["interventions"][0]["directions"][0]["promoted"][0]["id"] == token


def test_inspect_reads_each_stacked_phi_at_its_own_input(model):
    """Two Φs stacked at one site (stack=0 under stack=1): each one's report is computed on the rows
    that Φ edits, the base's hidden state for the lower one and that state after the lower Φ for the
    upper one; the lower one's report is the one it gets in a set of its own."""
    d = model.cfg.d_model
    torch.manual_seed(0)
    low, up = LoReFT(d, 2), LoReFT(d, 2)
    with torch.no_grad():
        for phi in (low, up):
            phi.W.weight.normal_()
            phi.W.bias.normal_()
    stacked = [
        Intervention(low, layers=1, positions="l1", stack=0, name="low"),
        Intervention(up, layers=1, positions="l1", stack=1, name="up"),
    ]
    report = reftlens.inspect(ReftModel(model, stacked), DATA, neutral=["hello world"])
    name = "blocks.1.hook_resid_post"
    h = torch.stack(
        [
            model.run_with_cache(reftlens.text_tokens(model, e["prompt"])[None], names_filter=name)[1][name][0, -1]
            for e in DATA
        ]
    )
    with torch.no_grad():
        reads = {"low": h, "up": low(h)}  # what each Φ edits: the base's state; the state after `low`
        for iv, phi in zip(report.interventions, (low, up)):
            rows = reads[iv.name]
            _, down, shift = phi.affine()
            got = torch.tensor([x["coefficient"] for x in iv.directions])
            torch.testing.assert_close(got, (rows @ down.T + shift).mean(0), rtol=1e-5, atol=1e-5)
            edit = torch.tensor(iv.mean_edit[1]["norm"])
            torch.testing.assert_close(edit, (phi(rows) - rows).mean(0).norm(), rtol=1e-5, atol=1e-5)
    alone = reftlens.inspect(ReftModel(model, Intervention(low, layers=1, positions="l1", name="low")), DATA)
    assert alone.interventions[0].directions == report.interventions[0].directions
    assert alone.interventions[0].mean_edit == report.interventions[0].mean_edit


def test_inspect_effect_shares_of_independent_interventions_add_up(model):
    """Two Steers that each edit only their own examples (a token predicate): the set's effect on
    the mean metric is the sum of theirs, so shares alone and shares removed each sum to 1."""
    tok = lambda s: reftlens.text_tokens(model, s).tolist()  # noqa: E731
    p1, p2 = "the cat sat on", "a dog ran"
    x, y = tok(p1)[-1], tok(p2)[-1]
    assert x not in tok(p2) and y not in tok(p1)
    g = torch.Generator().manual_seed(0)
    d = model.cfg.d_model
    a = Intervention(Steer(torch.randn(d, generator=g)), layers=1, positions=lambda t: t == x, name="A")
    b = Intervention(Steer(2 * torch.randn(d, generator=g)), layers=2, positions=lambda t: t == y, name="B")
    data = [{"prompt": p1, "completion": " the mat"}, {"prompt": p2, "completion": " away"}] * 2
    report = reftlens.inspect(ReftModel(model, [a, b]), data)
    A, B = report.interventions
    assert A.share_alone + B.share_alone == pytest.approx(1.0, abs=1e-4)
    assert A.share_removed + B.share_removed == pytest.approx(1.0, abs=1e-4)
    assert A.share_alone == pytest.approx(A.share_removed, abs=1e-4)
    assert 0.0 < abs(A.share_alone) and 0.0 < abs(B.share_alone)


def test_inspect_off_target_of_an_identity_set_is_zero(model):
    d = model.cfg.d_model
    zero = reftlens.inspect(ReftModel(model, Intervention(Steer(d), layers=1, positions="all")), DATA)
    assert zero.sets[0].off_target == {"kl": 0.0, "top1_changed": 0.0}
    ident = reftlens.inspect(ReftModel(model, Intervention(LoReFT(d, 4), layers=[0, 2], positions="f2+l2")), DATA)
    assert abs(ident.sets[0].off_target["kl"]) < 1e-6 and ident.sets[0].off_target["top1_changed"] == 0.0
    assert ident.interventions[0].mean_edit[0]["norm"] < 1e-5  # LoReFT at init edits nothing
    own = reftlens.inspect(
        ReftModel(model, Intervention(Steer(d), layers=1, positions="l1")), DATA, neutral=["one text", "two"]
    )
    assert own.sets[0].off_target["kl"] == 0.0


def test_inspect_bank_angles_and_composition(model):
    d = model.cfg.d_model
    torch.manual_seed(0)
    lo = LoReFT(d, 2)
    with torch.no_grad():
        lo.W.bias.fill_(0.5)
    twin = copy.deepcopy(lo)  # the same subspace in another set: angles 0
    other = DiReFT(d, 2)
    with torch.no_grad():
        other.W2.normal_()
        other.W1.bias.fill_(0.3)
    bank = ReftModel(
        model,
        {
            "a": Intervention(lo, layers=1, positions="l1"),
            "b": [Intervention(twin, layers=1, positions="l2"), Intervention(other, layers=2, positions="l1")],
        },
    )
    data = DATA + [{"prompt": "x y z", "completion": " w", "adapter": "a"}]
    report = reftlens.inspect(bank, data)
    assert [s.name for s in report.sets] == ["a", "b"]
    assert report.sets[0].examples == 4 and report.sets[1].examples == 3
    (angle,) = report.angles  # one shared site: resid_post of layer 1
    assert angle["sets"] == ["a", "b"] and angle["layer"] == 1
    assert max(angle["degrees"]) < 1e-2
    assert all(s.metric_composed is not None for s in report.sets)
    names = [(iv.set, iv.phi) for iv in report.interventions]
    assert names == [("a", "loreft(rank=2)"), ("b", "loreft(rank=2)"), ("b", "direft(rank=2)")]
    b_share = [iv.share_alone for iv in report.interventions[1:]]
    assert all(abs(s) < 10 for s in b_share)
    json.loads(report.to_json())
    report.plot()


def test_inspect_names_bad_arguments(model):
    d = model.cfg.d_model
    reft = ReftModel(model, Intervention(Steer(d), layers=1, positions="l1"))
    with pytest.raises(AnalysisError, match="ReftModel"):
        reftlens.inspect(model, DATA)
    with pytest.raises(AnalysisError, match="metric"):
        reftlens.inspect(reft, DATA, metric="bleu")
    with pytest.raises(AnalysisError, match="metric must return one value per example"):
        reftlens.inspect(reft, DATA, metric=lambda logits, labels: logits.sum())
    with pytest.raises(AnalysisError, match="neutral"):
        reftlens.inspect(reft, DATA, neutral="just one string")
    with pytest.raises(AnalysisError, match="neutral"):
        reftlens.inspect(reft, DATA, neutral=["", "x"])
    with pytest.raises(AnalysisError, match="batch_size"):
        reftlens.inspect(reft, DATA, batch_size=0)
    with pytest.raises(AnalysisError, match="top_k"):
        reftlens.inspect(reft, DATA, top_k=0)
    with pytest.raises(AnalysisError, match="'adapter'"):
        reftlens.inspect(reft, [{**DATA[0], "adapter": "x"}])
    with pytest.raises(AnalysisError, match="data is empty"):
        reftlens.inspect(reft, [])
    das = ReftModel(model, Intervention(DII(d, 1), layers=1, positions="l1"))
    with pytest.raises(AnalysisError, match="takes a source"):
        reftlens.inspect(das, DATA)


def test_inspect_custom_metric_and_accuracy(model):
    d = model.cfg.d_model
    reft = ReftModel(model, Intervention(Steer(torch.ones(d)), layers=1, positions="l1"))
    acc = reftlens.inspect(reft, DATA, metric="accuracy")
    assert 0.0 <= acc.sets[0].metric_full <= 1.0 and acc.metric == "accuracy"

    def first_logit(logits, labels):
        return logits[:, 0, 5].float()

    custom = reftlens.inspect(reft, DATA, metric=first_logit)
    assert custom.metric == "first_logit"


def test_localize_classification_data(model):
    data = [
        {"prompt": "the cat sat on the", "label": " mat"},
        {"prompt": "a dog ran far", "label": " away"},
        {"prompt": "the sun is very", "label": " hot"},
    ] * 3
    res = localize(model, data, task="classification", hooks=("resid_post",), positions=("l1",), progress=False)
    assert len(res.candidates) == model.cfg.n_layers and torch.isfinite(res.scores).all()
    with pytest.raises(AnalysisError, match="label_names"):
        localize(model, data, task="lm", label_names=[" mat"], progress=False)
    with pytest.raises(AnalysisError, match="label"):
        localize(model, data, task="classification", label_names=[" mat"], progress=False)


def test_inspect_leaves_the_set_as_it_was(model):
    d = model.cfg.d_model
    torch.manual_seed(0)
    phi = LoReFT(d, 2)
    reft = ReftModel(model, Intervention(phi, layers=[1, 2], positions="f1+l1", untied="layers"))
    before = {k: v.clone() for k, v in reft.state_dict().items()}
    reft.train()
    reftlens.inspect(reft, DATA)
    assert reft.training and all(p.training for p in reft.phis)
    after = reft.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_inspect_iia_of_the_written_subspace():
    """On the planted-variable model the answer lives in direction u above the write layer: a set
    that writes along u has IIA 1; one that writes elsewhere has chance IIA."""
    from reftlens.analysis.toy import planted_pairs, planted_variable_model

    model, u, v = planted_variable_model(write_layer=1)
    d = model.cfg.d_model
    pairs = planted_pairs(48, seed=1)
    on, off = LoReFT(d, 1), LoReFT(d, 1)
    with torch.no_grad():
        on.R.set_(u[None])
        rest = torch.linalg.qr(torch.stack([u, v, torch.randn(d, generator=torch.Generator().manual_seed(0))], 1)).Q
        off.R.set_(rest[:, 2][None])
    report = reftlens.inspect(
        ReftModel(model, [Intervention(on, layers=2, positions="l1"), Intervention(off, layers=3, positions="l1")]),
        [{"prompt": "a b c", "completion": " d"}],
        counterfactuals=pairs,
    )
    assert report.interventions[0].iia == 1.0
    assert report.interventions[1].iia < 0.75
    with pytest.raises(AnalysisError, match="counterfactuals"):
        reftlens.inspect(ReftModel(model, Intervention(on, layers=2, positions="l1")), DATA, counterfactuals=[])
