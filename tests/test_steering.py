"""Steering: directions recover a planted concept, detection scores it, α sweeps batch, edits suppress,
ReFT-r1 and the preference objective train, save, load and export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reftlens import (
    AnalysisError,
    ConfigError,
    Intervention,
    LoReFT,
    ProjectOut,
    ReftError,
    ReftModel,
    ReFTr1,
    Scaled,
    Steer,
    TrainingError,
    to_hf,
    train,
)
from reftlens.analysis.toy import EVEN, ODD, planted_variable_model
from reftlens.steering import alpha_sweep, auroc, collect, diff_mean, pca, probe
from reftlens.training import Example, Preference, encode, evaluate

PROMPTS = ["the quick brown fox", "a", "over the river and through the wood"]


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
    assert abs(float(d.vector.norm()) - 1) < 1e-5 and d.fit_auroc == 1.0 and d.separation > 10
    with pytest.warns(
        DeprecationWarning, match=r"Direction.auroc is deprecated; use Direction.fit_auroc.*not held out"
    ):
        assert d.auroc == d.fit_auroc  # the old name still reads
    assert "fit_auroc=1.000" in repr(d)


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


def test_collect_shows_a_progress_bar_unless_told_not_to(model, capfd):
    texts = ["the quick brown fox", "a", "over the river"]
    capfd.readouterr()
    quiet = collect(model, texts, layers=1, batch_size=2, progress=False)
    assert capfd.readouterr() == ("", "")
    loud = collect(model, texts, layers=1, batch_size=2)
    err = capfd.readouterr().err
    assert "collect" in err and "3/3" in err, err
    torch.testing.assert_close(loud[1], quiet[1], atol=0, rtol=0)
    with pytest.raises(ConfigError, match=r"collect: progress must be True .* or False .*; got 1\."):
        collect(model, texts, layers=1, progress=1)


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


# ---- steering: α sweeps, positions, suppression ------------------------------------------------


@pytest.fixture
def steer(model):
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return ReftModel(model, Intervention(Steer(0.5 * v / v.norm()), layers=[1, 2], positions="all"))


def test_alpha_zero_is_the_identity(steer, model):
    tokens, mask = steer.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(steer.scaled(0.0)(tokens, attention_mask=mask), model(tokens, attention_mask=mask))
    base = ReftModel(model, Intervention(Steer(model.cfg.d_model), layers=1))  # v = 0: the base model
    assert alpha_sweep(steer, PROMPTS, [0.0], 12, intervene_on="all", eos_token_id=None)[0] == base.generate(
        PROMPTS, 12, intervene_on="all", eos_token_id=None
    )


@pytest.mark.parametrize("intervene_on", ["prompt", "all", "generated"])
def test_an_alpha_sweep_in_one_batch_equals_one_call_per_alpha(steer, model, intervene_on):
    alphas = [0.0, 1.0, -2.0, 4.0]
    batched = alpha_sweep(steer, PROMPTS, alphas, 12, intervene_on=intervene_on, eos_token_id=None)
    v = steer.phis[0].vector.detach()
    one = {a: ReftModel(model, Intervention(Steer(v, alpha=a), layers=[1, 2], positions="all")) for a in alphas}
    for a, row in zip(alphas, batched):
        assert row == one[a].generate(PROMPTS, 12, intervene_on=intervene_on, eos_token_id=None)
    assert len({tuple(r) for r in batched}) > 1  # the α values do steer
    tokens, mask = steer.tokenize(PROMPTS * len(alphas))
    with torch.no_grad():  # the batched rows' logits are those of one forward per α
        rows = steer.scaled(torch.tensor(alphas).repeat_interleave(len(PROMPTS)))(tokens, attention_mask=mask)
        for i, a in enumerate(alphas):
            sl = slice(i * len(PROMPTS), (i + 1) * len(PROMPTS))
            torch.testing.assert_close(rows[sl], one[a](tokens[sl], attention_mask=mask[sl]), atol=1e-5, rtol=0)


def test_a_views_alpha_is_fixed_and_views_are_independent(steer, model):
    """α is a per-call choice, so it is an argument of ``scaled``, not state written onto a module:
    a view's α cannot be reassigned, and two views over the same Φs do not disturb each other."""
    tokens, mask = steer.tokenize(PROMPTS)
    low, high = steer.scaled(1.0), steer.scaled(3.0)
    with pytest.raises(AttributeError):
        low.phis[0].alpha = 2.0
    with torch.no_grad():
        before = low(tokens, attention_mask=mask)
        high(tokens, attention_mask=mask)
        torch.testing.assert_close(low(tokens, attention_mask=mask), before, atol=0, rtol=0)
        torch.testing.assert_close(before, steer(tokens, attention_mask=mask), atol=1e-5, rtol=0)  # α = 1: the set


def test_the_sweep_is_the_same_on_the_bridge_the_twin_and_in_chunks(steer):
    kw = dict(intervene_on="all", eos_token_id=None)
    whole = alpha_sweep(steer, PROMPTS, [0.0, 3.0], 10, backend="hf", **kw)
    assert whole == alpha_sweep(steer, PROMPTS, [0.0, 3.0], 10, backend="bridge", **kw)
    assert whole == alpha_sweep(steer, PROMPTS, [0.0, 3.0], 10, batch_size=2, **kw)


def test_per_example_phis_are_told_the_batch_row_of_each_row(model):
    seen = []

    class Record(torch.nn.Module):
        per_example = True

        def forward(self, h, examples):
            seen.append(examples.clone())
            return h

    reft = ReftModel(model, Intervention(Record(), layers=1, positions="l2"))
    tokens, mask = reft.tokenize(PROMPTS)
    plan = reft.plan(tokens, attention_mask=mask)
    reft(tokens, attention_mask=mask)
    counts = plan.masks[id(reft.units[0])].sum(1).tolist()
    assert seen[-1].tolist() == [b for b, c in enumerate(counts) for _ in range(c)]
    reft.generate(tokens, 3, attention_mask=mask, intervene_on="all", eos_token_id=None, backend="hf")
    assert seen[-1].tolist() == [0, 1, 2]  # a decoding step: one new row per example


def test_project_out_suppresses_and_steering_flips_the_planted_concept(toy):
    model, u, _, seqs, even, _ = toy
    tokens = torch.tensor(seqs[:64])
    with torch.no_grad():
        gap = lambda logits: logits[:, -1, EVEN] - logits[:, -1, ODD]  # noqa: E731
        base = gap(model(tokens))
        removed = gap(ReftModel(model, Intervention(ProjectOut(u), layers=2, positions="l1"))(tokens))
        pushed = gap(ReftModel(model, Intervention(Steer(u, alpha=10.0), layers=2, positions="l1"))(tokens))
    assert bool((base[even[:64]] > 0).all() and (base[~even[:64]] < 0).all())
    assert float(removed.abs().max()) < 1e-5  # the readout sees only u: the concept is gone
    assert bool((pushed > 0).all())  # every prediction moves to "even"


def test_project_out_is_a_projection():
    U = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    phi = ProjectOut(U)
    h = torch.randn(5, 6)
    out = phi(h)
    torch.testing.assert_close(out @ U.T, torch.zeros(5, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(phi(out), out)
    torch.testing.assert_close(h - out, (h - out) @ phi.U.T @ phi.U, atol=1e-5, rtol=0)  # only U's span removed
    with pytest.raises(ValueError, match="linearly dependent"):
        ProjectOut(torch.stack([U[0], 2 * U[0]]))


def test_scaled_errors_and_steer_saves_written_with_scale_still_load(steer, tmp_path):
    phi = Scaled(Steer(torch.ones(3)), alpha=torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="alpha holds 2 values, one per example, but the batch has at least 3 rows"):
        phi(torch.zeros(3, 3), examples=torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match="at least one prompt and one alpha"):
        alpha_sweep(steer, PROMPTS, [])
    assert Steer(3, scale=2.0).alpha == 2.0 and Steer(3, 2.0).config() == {"vector": 3, "alpha": 2.0}
    with pytest.raises(ReftError, match=r"is a view for running several α at once and is not saved; save the set"):
        steer.scaled(2.0).save(tmp_path / "view")


# ---- ReFT-r1 and the preference objective --------------------------------------------------------

DATA = [
    {"prompt": p, "completion": "a b a b a", "rejected": "x y z x y"}
    for p in ["say one", "say two", "tell me three", "go four", "and five", "now six"]
]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(1, 4))
def test_reft_r1_adds_each_examples_own_top_k_mean(counts, k):
    examples = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    h = torch.randn(len(examples), 6, generator=torch.Generator().manual_seed(sum(counts) + k))
    phi = ReFTr1(6, k=k)
    with torch.no_grad():
        edit = (phi(h, examples=examples) - h) @ phi.direction
        z = phi.latent(h)
    want = torch.stack([z[examples == e].topk(min(k, c)).values.mean() for e, c in enumerate(counts)])
    torch.testing.assert_close(edit, want[examples], atol=1e-5, rtol=0)


def test_reft_r1_trains_saves_loads_and_exports(model, tmp_path):
    torch.manual_seed(0)
    phi = ReFTr1(model.cfg.d_model, k=2, l1=0.05)
    reft = ReftModel(model, Intervention(phi, layers=[1, 2], positions="all"))
    examples = encode(model, DATA)
    before = evaluate(reft, examples)["loss"]
    history = train(reft, DATA, max_steps=15, batch_size=len(DATA), lr=0.05, progress=False)
    assert evaluate(reft, examples)["loss"] < before
    assert any(s.get("penalty", 0) > 0 for s in history.steps)  # the L1 on the latents is in the loss
    assert abs(float(phi.w.detach().norm()) - 1) > 1e-3 and abs(float(phi.direction.detach().norm()) - 1) < 1e-6

    tokens, mask = reft.tokenize(PROMPTS)
    with torch.no_grad():
        ours = reft(tokens, attention_mask=mask)
    reft.save(tmp_path / "r1")
    loaded = ReftModel.load(tmp_path / "r1", model)
    assert isinstance(loaded.phis[0], ReFTr1) and loaded.phis[0].k == 2
    with torch.no_grad():
        assert torch.equal(loaded(tokens, attention_mask=mask), ours)
    hf = to_hf(reft)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make", [lambda d: Steer(d), lambda d: LoReFT(d, 2), lambda d: ReFTr1(d, k=2)], ids=["steer", "loreft", "reft_r1"]
)
def test_the_preference_objective_trains(model, make, tmp_path):
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(make(model.cfg.d_model), layers=[1, 2], positions="all"))
    # every step sees the same batch and α, so the loss must go down
    history = train(reft, DATA, max_steps=12, batch_size=len(DATA), lr=0.05, objective="preference", progress=False)
    assert history.losses[-1] < history.losses[0]
    reft.save(tmp_path / "pref")  # a preference-trained set is an ordinary set
    with torch.no_grad():
        tokens = model.to_tokens(PROMPTS[0])
        assert torch.equal(ReftModel.load(tmp_path / "pref", model)(tokens), reft(tokens))


def test_the_preference_objective_measures_both_directions(model):
    """Toward the concept at +α, away at −α: training it raises ℓ̄(completion) − ℓ̄(rejected) at +α and lowers it at −α."""
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(Steer(model.cfg.d_model), layers=[1, 2], positions="all"))
    examples = encode(model, DATA)
    objective = Preference()
    objective.setup(reft, examples, 1)

    def margins():
        with torch.no_grad():
            n = len(examples)
            rows = [Example(e.prompt, e.completion) for e in examples] + [
                Example(e.prompt, e.rejected) for e in examples
            ]
            lp = objective._mean_logprob(
                reft, rows * 2, torch.tensor([1.0] * 2 * n + [-1.0] * 2 * n), reft.pad_token_id, reft.device
            )
            return float((lp[:n] - lp[n : 2 * n]).mean()), float((lp[2 * n : 3 * n] - lp[3 * n :]).mean())

    up0, down0 = margins()
    train(reft, DATA, max_steps=12, batch_size=len(DATA), lr=0.05, objective=objective, progress=False)
    up1, down1 = margins()
    assert up1 > up0 and down1 < down0


def test_the_preference_objective_needs_rejected_completions(model):
    reft = ReftModel(model, Intervention(Steer(model.cfg.d_model), layers=1))
    with pytest.raises(TrainingError, match="needs a 'rejected' completion in every example; example 0"):
        train(reft, [{"prompt": "a", "completion": "b"}], max_steps=1, objective="preference", progress=False)
    with pytest.raises(TrainingError, match="objective must be one of"):
        train(reft, DATA, max_steps=1, objective="dpo", progress=False)


@pytest.mark.parametrize("intervene_on", ["prompt", "all", "generated"])
def test_training_edits_the_part_of_the_sequence_generation_edits(model, intervene_on):
    """ "f1+l1" are the ends of the prompt, of the whole sequence or of the completion; the first
    completion token, predicted at the last prompt position, moves unless only generated tokens are edited."""
    from reftlens.training import collate
    from reftlens.training.forward import edited_part, forward

    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    reft = ReftModel(model, Intervention(Steer(2 * v / v.norm()), layers=1, positions="f1+l1"))
    batch = collate(encode(model, DATA[:2]), reft.pad_token_id)
    plan = reft.plan(batch.tokens, attention_mask=batch.attention_mask, prompt_mask=edited_part(batch, intervene_on))
    where = [m.nonzero().squeeze(1).tolist() for m in plan.masks[id(reft.units[0])]]
    n_prompt, n_all = batch.prompt_mask.sum(1).tolist(), batch.attention_mask.sum(1).tolist()
    ends = {
        "prompt": [[0, p - 1] for p in n_prompt],
        "all": [[0, a - 1] for a in n_all],
        "generated": [[p, a - 1] for p, a in zip(n_prompt, n_all)],
    }
    assert where == ends[intervene_on]
    with torch.no_grad():
        edited, labels = forward(reft, batch, intervene_on)
        plain = model(batch.tokens, attention_mask=batch.attention_mask)
    plain = plain[:, (batch.labels != -100).any(0)]  # forward unembeds only where some row has a target
    first = (labels != -100).float().argmax(1)  # where each row's first completion token is predicted
    moved = (edited - plain).abs().amax(-1)[torch.arange(2), first]
    assert bool((moved > 1e-4).all()) == (intervene_on != "generated")
    assert bool((moved < 1e-6).all()) == (intervene_on == "generated")


# --------------------------------------------------------------------------- non-finite arguments


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("bad", NONFINITE)
def test_non_finite_steering_arguments_are_refused_by_name(model, bad):
    d = model.cfg.d_model
    with pytest.raises(ConfigError, match="Steer: alpha must be a finite number"):
        Steer(torch.ones(d), alpha=bad)
    v = torch.ones(d)
    v[3] = bad
    with pytest.raises(ConfigError, match=r"Steer: vector holds 1 non-finite value\(s\) \(first: .* at index 3\)"):
        Steer(v)
    with pytest.raises(ConfigError, match="ProjectOut: directions holds 1 non-finite"):
        ProjectOut(v)
    reft = ReftModel(model, Intervention(Steer(torch.ones(d)), layers=1, positions="all"))
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        reft.scaled(bad)
    with pytest.raises(ConfigError, match=r"alpha holds 1 non-finite"):
        reft.scaled(torch.tensor([1.0, bad]))
    with pytest.raises(ConfigError, match=r"alphas\[1\] must be a finite number"):
        alpha_sweep(reft, ["a b"], [0.0, bad], 2)


def test_pca_refuses_rows_without_variance_like_diff_mean_and_probe():
    rows = torch.ones(6, 8)
    with pytest.raises(AnalysisError, match="pca: the paired differences pos − neg have no variance"):
        pca(rows, rows.clone())
    with pytest.raises(AnalysisError, match="diff_mean: the two classes have the same mean"):
        diff_mean(rows, rows.clone())


def test_collect_takes_the_tokenization_arguments(model):
    from reftlens.inputs import text_tokens

    text = "the quick brown fox jumps"
    ids = text_tokens(model, text, prepend_bos=False).tolist()
    a = collect(model, [text], layers=1, prepend_bos=False)
    b = collect(model, [ids], layers=1)
    assert torch.equal(a[1], b[1]) and a[1].shape[0] == len(ids)
    with_bos = collect(model, [text], layers=1, prepend_bos=True)
    assert with_bos[1].shape[0] == len(ids) + 1
    cut = collect(model, [text], layers=1, prepend_bos=False, max_length=2, truncation="right")
    assert torch.equal(cut[1], collect(model, [ids[:2]], layers=1)[1])
    long = "x " * (model.cfg.n_ctx + 10)
    with pytest.raises(ConfigError, match=rf"is \d+ tokens long, beyond the limit of {model.cfg.n_ctx} tokens"):
        collect(model, [long], layers=1)
    n = collect(model, [long], layers=1, truncation="left")[1].shape[0]
    assert n == model.cfg.n_ctx
    with pytest.raises(ConfigError, match="truncation must be None, 'left' or 'right'; got 'middle'"):
        collect(model, [text], layers=1, truncation="middle")
    with pytest.raises(ConfigError, match="max_length must be a positive integer"):
        collect(model, [text], layers=1, max_length=0)


def test_pooling_refuses_texts_without_rows_and_names_them(model):
    texts = ["I love this film", "", "Once upon a time", ""]  # "" is only the start token: slice(1, None) skips it
    acts = collect(model, texts, layers=[1], positions=slice(1, None), progress=False)
    assert sorted(set(acts.example.tolist())) == [0, 2] and acts.n_examples == 4
    u = torch.randn(model.cfg.d_model)
    named = r"the texts at indexes 1, 3 \(of 4\) have no selected position .* Drop such texts before collecting"
    for how in ("mean", "first", "last"):
        with pytest.raises(AnalysisError, match=rf"pooled\(how='{how}'\): {named}"):
            acts.pooled(1, how)
    for pool in ("max", "mean", "first", "last"):
        with pytest.raises(AnalysisError, match=rf"scores\(pool='{pool}'\): {named}"):
            acts.scores(1, u, pool=pool)
    with pytest.raises(AnalysisError, match="pooled: how must be 'mean', 'first' or 'last'; got 'median'"):
        acts.pooled(1, "median")
    # without the empty texts, every pool is the reduction of each text's own rows
    kept = collect(model, [texts[0], texts[2]], layers=[1], positions=slice(1, None), progress=False)
    for i, t in enumerate((0, 2)):
        torch.testing.assert_close(kept[1][kept.example == i], acts[1][acts.example == t])
    reduce = {"max": lambda x: x.max(), "mean": lambda x: x.mean(), "first": lambda x: x[0], "last": lambda x: x[-1]}
    for pool, f in reduce.items():
        want = torch.stack([f(kept[1][kept.example == i] @ u) for i in range(2)])
        torch.testing.assert_close(kept.scores(1, u, pool=pool), want, atol=1e-5, rtol=1e-5)
    for how, pick in (("first", 0), ("last", -1)):
        want = torch.stack([kept[1][kept.example == i][pick] for i in range(2)])
        torch.testing.assert_close(kept.pooled(1, how), want, atol=0, rtol=0)


def test_an_alpha_sweep_of_a_bank_runs_each_prompt_with_its_own_set(model):
    """adapters= names one set per prompt: each prompt runs its set at every α, as the sweep of that
    set alone does (in chunks too); a list of another length is refused by name."""
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(1)
    v = {n: torch.randn(d, generator=g) for n in ("a", "b")}

    def one(name):
        return Intervention(Steer(0.5 * v[name] / v[name].norm()), layers=[1, 2], positions="all")

    bank = ReftModel(model, {"a": one("a"), "b": one("b")})
    names = ["a", "b", "a"]
    kw = dict(intervene_on="all", eos_token_id=None)
    out = alpha_sweep(bank, PROMPTS[:3], [0.0, 2.0], 8, adapters=names, batch_size=4, **kw)
    for name in ("a", "b"):
        idx = [j for j, n in enumerate(names) if n == name]
        alone = alpha_sweep(ReftModel(model, one(name)), [PROMPTS[j] for j in idx], [0.0, 2.0], 8, **kw)
        assert [[row[j] for j in idx] for row in out] == alone
    for bad in (["a"], "a", 3):
        with pytest.raises(ConfigError, match="one set name \\(or None\\) per prompt, 3 here"):
            alpha_sweep(bank, PROMPTS[:3], [1.0], 8, adapters=bad)
