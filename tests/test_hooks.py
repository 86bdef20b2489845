"""Hook hygiene: reftlens adds its hooks per call, removes exactly them, touches nobody else's."""

import pytest
import torch

from reftlens import DII, Intervention, LoReFT, ReftModel, Steer


def hooked(model):
    return {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items() if hp.fwd_hooks}


def make(model, **kw):
    torch.manual_seed(0)
    return ReftModel(
        model, Intervention(LoReFT(model.cfg.d_model, 4, init="random"), layers=[1, 2], positions="f2+l2", **kw)
    )


def test_an_exception_inside_a_forward_leaves_no_hooks(model):
    class Boom(torch.nn.Module):
        def forward(self, h):
            raise RuntimeError("boom")

    reft = ReftModel(
        model, [Intervention(Steer(torch.ones(model.cfg.d_model)), layers=0), Intervention(Boom(), layers=2)]
    )
    with pytest.raises(RuntimeError, match="boom"):
        reft("the quick brown fox")
    assert hooked(model) == {}


def test_an_exception_inside_the_with_block_removes_the_hooks(model):
    reft = make(model)
    with pytest.raises(KeyError):
        with reft.hooks():
            assert hooked(model)
            raise KeyError("user error")
    assert hooked(model) == {}


def test_other_hooks_survive_and_still_fire(model):
    reft = make(model)
    seen = []
    user = lambda x, hook: seen.append(hook.name)  # noqa: E731
    model.add_hook("blocks.1.hook_resid_post", user)
    try:
        reft("the quick brown fox")
        with reft.hooks():
            model(model.to_tokens("a lazy dog"))
        assert len(seen) == 2
        assert hooked(model) == {"blocks.1.hook_out": 1, "blocks.1.hook_resid_post": 1}
    finally:
        model.reset_hooks()


def test_hooks_mix_with_run_with_hooks_and_run_with_cache(model):
    reft = make(model)
    tokens = model.to_tokens("the quick brown fox jumps")
    expected = reft(tokens)
    with reft.hooks():
        torch.testing.assert_close(model(tokens), expected)
        logits, cache = model.run_with_cache(tokens)  # the cache sees the edited stream
        torch.testing.assert_close(logits, expected)
    out = model.run_with_hooks(tokens, fwd_hooks=reft.fwd_hooks())
    torch.testing.assert_close(out, expected)
    _, clean = model.run_with_cache(tokens)
    edited = cache["blocks.1.hook_resid_post"] - clean["blocks.1.hook_resid_post"]
    assert edited[0, [0, 1, -2, -1]].abs().amax() > 1e-3 and edited[0, 2:-2].abs().amax() == 0
    assert hooked(model) == {}


def test_padded_inputs_through_hooks_match_forward(model):
    reft = make(model)
    tokens, mask = reft.tokenize(["a", "the quick brown fox jumps"])
    with reft.hooks(tokens, attention_mask=mask):
        got = model(tokens, attention_mask=mask)
    torch.testing.assert_close(got, reft(tokens, attention_mask=mask))


def test_sources_are_collected_in_one_forward(model):
    calls = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: calls.append(x.shape[0]))
    try:
        d = model.cfg.d_model
        reft = ReftModel(
            model,
            [Intervention(DII(d, 2), layers=1, positions="l1"), Intervention(DII(d, 2), layers=3, positions="l1")],
        )
        reft(["a b c", "d e f"], sources=["g h i", "j k l"])
    finally:
        model.reset_hooks()
    assert calls == [2, 2]  # one source forward, one base forward, each batched


def test_gradients_flow_only_into_phi(model):
    reft = make(model)
    out = reft(["the quick brown fox"])
    out[0, -1].logsumexp(-1).backward()
    assert all(p.grad is not None for p in reft.parameters())
    assert all(p.grad is None for p in model.parameters())
