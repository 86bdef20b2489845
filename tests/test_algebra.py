"""The paper's identities on real (tiny) models, and sets of interventions."""

import torch
from conftest import plain

from reftlens import DII, Collect, DiReFT, Interchange, Intervention, LoReFT, ReftModel, Steer, ZeroAblation

PROMPTS = ["the quick brown fox jumps", "a lazy dog", "over the river and through the wood"]


def tokens_of(model):
    reft = ReftModel(model, Intervention(ZeroAblation(), layers=0, positions=0))
    return reft.tokenize(PROMPTS)


def perturbed_loreft(d):
    phi = LoReFT(d, 4, init="random")
    with torch.no_grad():
        phi.W.weight.copy_(phi.R.weight)
        phi.W.bias.zero_()
    return phi


def test_loreft_at_w_equal_r_changes_nothing(model):
    tokens, mask = tokens_of(model)
    d = model.cfg.d_model
    reft = ReftModel(model, Intervention(perturbed_loreft(d), layers="all", positions="f2+l2"))
    torch.testing.assert_close(reft(tokens, attention_mask=mask), plain(model, tokens, mask), atol=1e-5, rtol=0)
    with torch.no_grad():
        reft.phis[0].W.bias.fill_(1.0)  # and it is not vacuous: a bias moves the output
    assert (reft(tokens, attention_mask=mask) - plain(model, tokens, mask)).abs().max() > 1e-3


def test_direft_with_zero_w2_changes_nothing(model):
    tokens, mask = tokens_of(model)
    phi = DiReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W2.zero_()
    reft = ReftModel(model, Intervention(phi, layers=[0, 2], positions="all"))
    torch.testing.assert_close(reft(tokens, attention_mask=mask), plain(model, tokens, mask), atol=1e-5, rtol=0)


def test_full_rank_dii_equals_interchange(model):
    base, source = ["the quick brown fox jumps"], ["a lazy dog sat on the"]
    d = model.cfg.d_model
    dii = ReftModel(model, Intervention(DII(d, d), layers=1, positions="l3"))
    swap = ReftModel(model, Intervention(Interchange(), layers=1, positions="l3"))
    out_dii, out_swap = dii(base, sources=source), swap(base, sources=source)
    torch.testing.assert_close(out_dii, out_swap, atol=1e-4, rtol=0)
    assert (out_swap - plain(model, *dii.tokenize(base))).abs().max() > 1e-3


def test_interchange_with_source_equal_to_base_changes_nothing(model):
    tokens, mask = tokens_of(model)
    reft = ReftModel(model, Intervention(Interchange(), layers=[1, 3], positions="all", hook="mlp_out"))
    out = reft(tokens, sources=tokens, attention_mask=mask, source_attention_mask=mask)
    torch.testing.assert_close(out, plain(model, tokens, mask), atol=1e-5, rtol=0)


def test_interchange_really_patches_the_source_activation(model):
    reft = ReftModel(model, Intervention(Interchange(), layers=2, positions="l1"))
    base, source = reft.tokenize(["the quick brown fox"]), reft.tokenize(["a lazy dog sat"])
    with reft.hooks(base[0], attention_mask=base[1], sources=source[0], source_attention_mask=source[1]):
        _, patched = model.run_with_cache(base[0], names_filter="blocks.2.hook_resid_post")
    _, src_cache = model.run_with_cache(source[0], names_filter="blocks.2.hook_resid_post")
    got = patched["blocks.2.hook_resid_post"][0, -1]
    torch.testing.assert_close(got, src_cache["blocks.2.hook_resid_post"][0, -1])


def test_a_disjoint_set_equals_applying_its_members_one_after_another(model):
    tokens, mask = tokens_of(model)
    d = model.cfg.d_model
    torch.manual_seed(1)
    a = Intervention(LoReFT(d, 2, init="random"), layers=1, positions="f2")
    b = Intervention(DiReFT(d, 2, init="random"), layers=1, positions="l2")
    c = Intervention(Steer(torch.randn(d)), layers=[0, 3], positions="all", hook="attn_out")
    together = ReftModel(model, [a, b, c])(tokens, attention_mask=mask)
    with ReftModel(model, a).hooks(tokens, attention_mask=mask):
        with ReftModel(model, b).hooks(tokens, attention_mask=mask):
            with ReftModel(model, c).hooks(tokens, attention_mask=mask):
                sequential = plain(model, tokens, mask)
    torch.testing.assert_close(together, sequential, atol=1e-5, rtol=0)


def test_tied_shares_one_phi_and_untied_copies_it(model):
    d = model.cfg.d_model
    phi = LoReFT(d, 4)
    tied = ReftModel(model, Intervention(phi, layers=[0, 1, 2], positions="f2+l2"))
    assert len(tied.phis) == 1 and tied.phis[0] is phi
    untied = ReftModel(model, Intervention(phi, layers=[0, 1, 2], positions="f2+l2", untied=True))
    assert len(untied.phis) == 6  # 3 layers × {f2, l2}
    assert len({id(p) for p in untied.phis}) == 6
    assert untied.num_trainable_parameters() == 6 * tied.num_trainable_parameters()
    names = [u.name for u in untied.units]
    assert names[:2] == ["loreft(rank=4)@L0[f2]", "loreft(rank=4)@L0[l2]"]
    by_layer = ReftModel(model, Intervention(phi, layers=[0, 1], positions="f2+l2", untied="layers"))
    assert len(by_layer.phis) == 2


def test_untied_copies_train_apart(model):
    d = model.cfg.d_model
    reft = ReftModel(model, Intervention(LoReFT(d, 2), layers=[1, 2], untied="layers", positions="l1"))
    tokens, mask = tokens_of(model)
    opt = torch.optim.SGD(reft.parameters(), lr=0.1)
    reft(tokens, attention_mask=mask)[:, -1, :5].sum().backward()
    opt.step()
    w0, w1 = (p.W.weight for p in reft.phis)
    assert not torch.allclose(w0, w1)


def test_only_phi_parameters_train(model):
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1, positions="l1"))
    assert all(not p.requires_grad for p in model.parameters())
    names = {n for n, _ in reft.named_parameters()}
    assert names == {"phis.0.R.A", "phis.0.W.weight", "phis.0.W.bias"}
    tokens, mask = tokens_of(model)
    loss = reft(tokens, attention_mask=mask)[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None for p in reft.parameters())


def test_user_defined_phi_module_and_callable(model):
    tokens, mask = tokens_of(model)

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, h):
            return self.s * h

    reft = ReftModel(
        model,
        [
            Intervention(Scale(), layers=1, positions="all"),
            Intervention(lambda b, s: 0.5 * (b + s), layers=2, positions="l1"),  # with a source
        ],
    )
    out = reft(tokens, sources=tokens, attention_mask=mask, source_attention_mask=mask)
    torch.testing.assert_close(out, plain(model, tokens, mask), atol=1e-5, rtol=0)
    with torch.no_grad():
        reft.phis[0].s.fill_(0.5)
    assert (reft(tokens, sources=tokens, attention_mask=mask, source_attention_mask=mask) - out).abs().max() > 1e-3


def test_collect_reads_rows_in_example_then_position_order(model):
    tokens, mask = tokens_of(model)
    collect = Collect()
    reft = ReftModel(model, Intervention(collect, layers=2, positions=[0, -1]))
    out = reft(tokens, attention_mask=mask)
    torch.testing.assert_close(out, plain(model, tokens, mask))
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.2.hook_resid_post")
    resid = cache["blocks.2.hook_resid_post"]
    starts = mask.argmax(1)
    expected = torch.stack([resid[b, p] for b in range(3) for p in (int(starts[b]), tokens.shape[1] - 1)])
    torch.testing.assert_close(collect.activations[0], expected, atol=1e-5, rtol=0)


def test_interventions_are_values():
    phi = LoReFT(16, 2)
    a = Intervention(phi, layers=[1, 2], positions="f2+l2")
    assert a == Intervention(phi, layers=[1, 2], positions="f2+l2")
    assert a != Intervention(phi, layers=[1, 2], positions="f2+l3")
    assert a != Intervention(LoReFT(16, 2), layers=[1, 2], positions="f2+l2")  # another Φ object
    assert len({a, Intervention(phi, layers=[1, 2], positions="f2+l2")}) == 1
    assert a.to(torch.float64) is a and phi.W.weight.dtype == torch.float64
