"""Bad input: each raises an error that names what was wrong and what to do; nothing is half-applied."""

import pytest
import torch

from reftlens import (
    CollisionError,
    ConfigError,
    Interchange,
    Intervention,
    LoReFT,
    NonFiniteError,
    PositionError,
    ReftError,
    ReftModel,
    ZeroAblation,
)


def lo(model, **kw):
    return LoReFT(model.cfg.d_model, 4, **kw)


def test_wrong_layer(model):
    with pytest.raises(
        ConfigError, match=r"intervention loreft\(rank=4\): layer 7 does not exist; the model has layers 0..3"
    ):
        ReftModel(model, Intervention(lo(model), layers=[1, 7]))


def test_unknown_hook(model):
    with pytest.raises(
        ConfigError,
        match=r"intervention 'loreft\(rank=4\)': hook 'resid_middle' at layer 1 \(blocks.1.hook_resid_middle\) does not "
        r"exist on this model. Did you mean 'resid_mid'.*Valid short names: resid_pre, attn_in, attn_out, resid_mid, "
        r"mlp_in, mlp_out, resid_post \(aliases: resid = resid_post, attn = attn_out, mlp = mlp_out\)",
    ) as err:
        ReftModel(model, Intervention(lo(model), layers=1, hook="resid_middle"))
    assert "ln1.hook_scale" not in str(err.value)  # the short list, not every hook point
    with pytest.raises(ConfigError, match=r"hook 'attn.hookz' .*Did you mean 'attn.hook_z'"):
        ReftModel(model, Intervention(ZeroAblation(), layers=0, hook="attn.hookz"))
    with pytest.raises(ConfigError, match=r"hook must be a TransformerLens hook name such as 'resid_post'; got 3"):
        Intervention(lo(model), layers=1, hook=3)


@pytest.mark.parametrize(("alias", "name"), [("mlp", "mlp_out"), ("attn", "attn_out"), ("resid", "resid_post")])
def test_hook_aliases_in_an_intervention(model, alias, name, tmp_path):
    phi = lo(model, init="random")
    short = ReftModel(model, Intervention(phi, layers=1, positions="l1", hook=alias))
    full = ReftModel(model, Intervention(phi, layers=1, positions="l1", hook=name))
    assert short.interventions[0].hook == name  # recorded (and saved) by its one name
    prompts = ["the quick brown fox", "a b"]
    with torch.no_grad():
        torch.testing.assert_close(short(prompts), full(prompts), atol=0, rtol=0)
        assert (
            short(prompts) - model(short.tokenize(prompts)[0], attention_mask=short.tokenize(prompts)[1])
        ).abs().max() > 0
    short.save(tmp_path / "s")
    assert ReftModel.load(tmp_path / "s", model).interventions[0].hook == name


def test_hook_without_a_position_axis(model):
    with pytest.raises(ConfigError, match="blocks.0.attn.hook_pattern has no position axis"):
        ReftModel(model, Intervention(ZeroAblation(), layers=0, hook="attn.hook_pattern"))


def test_positions_beyond_a_sequence(model):
    reft = ReftModel(model, Intervention(lo(model), layers=1, positions=[0, 6]))
    with pytest.raises(
        PositionError, match=r"positions \[0, 6\] ask for real token 6 of example 1, which has 3 real tokens"
    ):
        reft(["the quick brown fox jumps over", "a b"])


def test_d_model_mismatch(model):
    with pytest.raises(ConfigError, match=r"expects hidden width d_model=32, but blocks.2.hook_out carries width 64"):
        ReftModel(model, Intervention(LoReFT(32, 4), layers=2))


def test_dtype_mismatch_and_the_cast_option(model):
    phi = lo(model, init="random").double()
    reft = ReftModel(model, Intervention(phi, layers=1, positions="l1"))
    with pytest.raises(ConfigError, match=r"Φ is torch.float64 but the hidden states are torch.float32.*cast=True"):
        reft("the quick brown fox")
    out = ReftModel(model, Intervention(phi, layers=1, positions="l1"), cast=True)("the quick brown fox")
    assert out.dtype == torch.float32


def test_device_mismatch(model, monkeypatch):
    reft = ReftModel(model, Intervention(lo(model), layers=1), move=False)
    monkeypatch.setattr(ReftModel, "device", property(lambda self: torch.device("cuda", 0)))  # no GPU needed
    with pytest.raises(ConfigError, match=r"has tensors on cpu but the model is on cuda:0; call reft.to\('cuda:0'\)"):
        reft.plan("the quick brown fox")


@pytest.mark.parametrize("move", [True, False])
def test_a_phi_on_the_meta_device_must_be_materialised_first(model, move):
    with torch.device("meta"):
        phi = lo(model)
    words = (
        r"Φ loreft\(rank=4\) of intervention 'steer' is on the meta device: its tensors \(R.A, W.weight, W.bias\) "
        r"have shapes but no values.*phi.to_empty\(device='cpu'\), then give it values \(phi.load_state_dict"
    )
    with pytest.raises(ConfigError, match=words):
        ReftModel(model, Intervention(phi, layers=1, name="steer"), move=move)
    # the advice works
    phi.to_empty(device="cpu")
    phi.load_state_dict(lo(model).state_dict())
    reft = ReftModel(model, Intervention(phi, layers=1, positions="l1", name="steer"), move=move)
    assert torch.allclose(reft("the quick brown fox"), model(reft.tokenize("the quick brown fox")[0]), atol=1e-5)
    reft.to("meta")  # moved there later: refused when it runs, with the same advice
    with pytest.raises(ConfigError, match=words):
        reft("the quick brown fox")


def test_source_batch_of_the_wrong_size(model):
    reft = ReftModel(model, Intervention(Interchange(), layers=1, positions="l1"))
    with pytest.raises(ValueError, match=r"sources have 1 examples but the inputs have 2"):
        reft(["a b", "c d"], sources=["e f"])
    with pytest.raises(ValueError, match=r"takes a source; pass sources="):
        reft(["a b"])


def test_source_positions_that_do_not_pair(model):
    reft = ReftModel(model, Intervention(Interchange(), layers=1, positions="all"))
    with pytest.raises(PositionError, match=r"example 0 selects 3 input positions \(all\) but 5 source positions"):
        reft(["a b"], sources=["a b c d"])


def poison_first_run(example, position, value):
    """A hook that puts ``value`` at one (example, position) of the first forward it sees: the source run."""
    calls = []

    def fn(h, hook=None):
        calls.append(1)
        if len(calls) == 1:
            h = h.clone()
            h[example, position] = value
        return h

    return fn


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_a_non_finite_source_is_refused_by_default(model, value, word):
    reft = ReftModel(model, Intervention(Interchange(), layers=1, positions="l2", name="swap"))
    base = ["the quick brown fox jumps", "a lazy dog sat down"]
    src, src_mask = reft.tokenize(["over the river and far away", "into the woods"])  # example 1 left padded
    pad = int((src_mask[1] == 0).sum())
    last = src.shape[1] - 1
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison_first_run(1, last, value))]):
        with pytest.raises(
            NonFiniteError,
            match=rf"intervention 'swap' at blocks.1.hook_out: the source run's activation "
            rf"for example 1 at real token {last - pad} \(padded position {last}\) "
            rf"holds {word}.*check_finite=False",
        ):
            reft(base, sources=src, source_attention_mask=src_mask)
    assert issubclass(NonFiniteError, ReftError)


def test_non_finite_sources_pass_with_check_finite_false(model):
    reft = ReftModel(model, Intervention(Interchange(), layers=1, positions="l2"), check_finite=False)
    base, mask = reft.tokenize(["the quick brown fox jumps", "a lazy dog sat down"])
    src, src_mask = reft.tokenize(["over the river and far away", "into the woods"])
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison_first_run(1, src.shape[1] - 1, float("nan")))]):
        out = reft(base, sources=src, attention_mask=mask, source_attention_mask=src_mask)
    assert out[1, -1].isnan().all() and not out[0].isnan().any()  # copied into example 1's last position only
    reft.check_finite = True  # the attribute switches the check back on
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison_first_run(1, src.shape[1] - 1, float("nan")))]):
        with pytest.raises(NonFiniteError):
            reft(base, sources=src, attention_mask=mask, source_attention_mask=src_mask)


def test_padded_tokens_without_a_mask(model):
    reft = ReftModel(model, Intervention(lo(model), layers=1, positions="l1"))
    tokens, mask = reft.tokenize(["a", "the quick brown fox"])
    with pytest.raises(
        PositionError, match=r"inputs row 0 starts or ends with the pad token 0 but no attention_mask was given"
    ):
        reft(tokens)
    reft(tokens, attention_mask=mask)


def test_mask_with_gaps(model):
    reft = ReftModel(model, Intervention(lo(model), layers=1))
    tokens = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(PositionError, match=r"row 0 has gaps"):
        reft(tokens, attention_mask=torch.tensor([[1, 0, 1, 1]]))


def test_static_collision_names_both_interventions(model):
    a = Intervention(lo(model), layers=[1, 2], positions="f3", name="a")
    b = Intervention(ZeroAblation(), layers=2, positions=[2, 5], name="b")
    with pytest.raises(
        CollisionError, match=r"'a' \(f3\) and 'b' \(\[2, 5\]\) both edit blocks.2.hook_out at real token\(s\) \[2\]"
    ):
        ReftModel(model, [a, b])
    c = Intervention(ZeroAblation(), layers=2, positions="all", name="c")
    with pytest.raises(CollisionError, match="every position"):
        ReftModel(model, [a, c])
    ReftModel(model, [a, Intervention(ZeroAblation(), layers=2, positions=[3, 4])])  # disjoint: fine


def test_relative_positions_collide_per_batch(model):
    a = Intervention(lo(model), layers=1, positions="f3", name="first")
    b = Intervention(lo(model), layers=1, positions="l3", name="last")
    reft = ReftModel(model, [a, b])  # cannot be known before an input
    reft(["the quick brown fox jumps over"])
    with pytest.raises(
        CollisionError,
        match=r"'first' \(f3\) and 'last' \(l3\) both edit blocks.1.hook_out at example 1, real token 0 \(padded position \d+\) of an input with 3 real tokens",
    ):
        reft(["the quick brown fox jumps over", "a b"])


def test_untied_first_last_groups_on_a_short_prompt(model):
    iv = Intervention(lo(model), layers=1, positions="f5+l5", untied="positions")
    reft = ReftModel(model, iv)
    short = ["the fox"]
    n = reft.tokenize(short)[1].sum().item()
    assert n < 10
    with pytest.raises(CollisionError, match=r"untied first/last groups.*overlap='clamp'"):
        reft(short)
    clamped = ReftModel(
        model, Intervention(lo(model), layers=1, positions="f5+l5", untied="positions", overlap="clamp")
    )
    clamped(short)
    # tied, the same spec is one set of positions: overlap merges, no error
    ReftModel(model, Intervention(lo(model), layers=1, positions="f5+l5"))(short)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(layers="x"), "layers must be"),
        (dict(layers=[1, 1]), "repeat a layer"),
        (dict(positions="first5"), "unknown position spec 'first5'"),
        (dict(positions=slice(0, 4, -1)), "positive step"),
        (dict(untied="both"), "untied must be one of"),
        (dict(overlap="merge"), "overlap must be"),
    ],
)
def test_bad_intervention_arguments(model, bad, match):
    with pytest.raises(ValueError, match=match):
        Intervention(lo(model), **bad)


def test_untied_positions_need_a_splittable_spec(model):
    with pytest.raises(ValueError, match="cannot be split into untied groups"):
        ReftModel(model, Intervention(lo(model), layers=1, positions="all", untied=True))


def test_a_phi_that_cannot_be_called():
    with pytest.raises(TypeError, match="Cannot tell how to call"):
        Intervention(lambda a, b, c: a)
    with pytest.raises(TypeError, match="must be an nn.Module or a callable"):
        Intervention(3)
