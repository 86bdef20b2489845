"""Generation: the KV-cached path gives exactly the tokens of a no-cache recomputation."""

import pytest
import torch

from reftlens import ConfigError, Interchange, Intervention, LoReFT, ReftModel
from reftlens.generation import to_left_padding
from reftlens.runtime.compat import kv_cache_fix

PROMPTS = ["the quick brown fox", "a", "over the river and through the wood"]


@pytest.fixture
def reft(model):
    torch.manual_seed(0)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W.bias.mul_(20)  # a strong edit, so generations differ from the base model's
    return ReftModel(model, Intervention(phi, layers=[1, 3], positions="f2+l2"))


def ids(reft, prompts, **kw):
    tokens, mask = reft.tokenize(prompts)
    return reft.generate(tokens, 16, attention_mask=mask, eos_token_id=None, **kw)[:, tokens.shape[1] :]


@pytest.mark.parametrize("intervene_on", ["prompt", "all", "generated"])
def test_cached_greedy_equals_no_cache_recomputation(reft, intervene_on):
    cached = ids(reft, PROMPTS, intervene_on=intervene_on)
    recomputed = ids(reft, PROMPTS, intervene_on=intervene_on, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_the_no_cache_reference_is_a_plain_forward_per_step(reft, model):
    """Build the reference by hand: prompt edited, generated tokens untouched, argmax each step."""
    tokens, mask = reft.tokenize(PROMPTS[:1])
    seq = tokens
    with torch.no_grad():
        for _ in range(6):
            prompt_mask = torch.zeros_like(seq)
            prompt_mask[:, : tokens.shape[1]] = 1
            logits = reft(seq, prompt_mask=prompt_mask)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    got = reft.generate(tokens, 6, eos_token_id=None)
    assert torch.equal(got, seq)


def test_interventions_change_generation(reft, model):
    plain = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1))  # identity init
    assert not torch.equal(ids(reft, PROMPTS), ids(plain, PROMPTS))


def test_intervene_on_generated_leaves_the_prompt_alone(reft, model):
    """The first new token comes from the unedited prompt; after it, the edits steer."""
    plain = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4), layers=1))  # identity init
    base = ids(plain, PROMPTS)
    generated, everywhere = ids(reft, PROMPTS, intervene_on="generated"), ids(reft, PROMPTS, intervene_on="all")
    assert torch.equal(generated[:, 0], base[:, 0])
    assert not torch.equal(generated, base) and not torch.equal(generated, everywhere)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(reft):
    batched = reft.generate(PROMPTS, 12, eos_token_id=None)
    assert batched == [reft.generate([p], 12, eos_token_id=None)[0] for p in PROMPTS]


def test_right_padded_prompts_are_moved_to_the_left(reft):
    left = ids(reft, PROMPTS)
    tokens, mask = reft.tokenize(PROMPTS, padding_side="right")
    right = reft.generate(tokens, 16, attention_mask=mask, eos_token_id=None)[:, tokens.shape[1] :]
    assert torch.equal(left, right)


def test_to_left_padding_keeps_token_order():
    tokens = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 1]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    t, m = to_left_padding(tokens, mask, pad_id=0)
    assert t.tolist() == [[0, 0, 5, 6], [7, 8, 9, 1]] and m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_eos_stops_and_pads(reft, model):
    free = ids(reft, PROMPTS[:1])[0].tolist()
    eos = free[3]
    out = reft.generate(PROMPTS[:1], 16, eos_token_id=eos)
    expected = model.tokenizer.decode(free[: free.index(eos)], skip_special_tokens=True)
    assert out == [expected]


def test_sampling_is_seeded_and_matches_without_cache(reft):
    a = ids(reft, PROMPTS, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    b = ids(reft, PROMPTS, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    c = ids(reft, PROMPTS, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, ids(reft, PROMPTS, do_sample=True, seed=4))


def test_generation_with_a_source_and_errors(model):
    reft = ReftModel(model, Intervention(Interchange(), layers=2, positions="l1"))
    got = reft.generate(["the quick brown fox"], 8, sources=["a lazy dog sat"], eos_token_id=None)
    nocache = reft.generate(["the quick brown fox"], 8, sources=["a lazy dog sat"], eos_token_id=None, use_cache=False)
    assert got == nocache
    with pytest.raises(ConfigError, match="intervene_on='all' edits generated tokens, which have no source"):
        reft.generate(["a b"], 4, sources=["c d"], intervene_on="all")
    with pytest.raises(ValueError, match="intervene_on must be"):
        reft.generate(["a b"], 4, sources=["c d"], intervene_on="every")


def test_the_kv_cache_fix_is_what_makes_cached_decoding_right(model):
    """TL 4.3 + transformers 5 drop the cache inside attention; with the fix, a cached step equals a full forward."""
    tokens = model.to_tokens("the quick brown fox")
    with torch.no_grad():
        full = model(torch.cat([tokens, tokens[:, -1:]], 1))[:, -1]
        with kv_cache_fix(model):
            _, cache = model(tokens, return_type="logits_and_cache")
            step, _ = model(tokens[:, -1:], past_key_values=cache, return_type="logits_and_cache")
    torch.testing.assert_close(step[:, -1], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("intervene_on", ["prompt", "all", "generated"])
def test_the_transformers_twin_and_the_bridge_generate_the_same(reft, intervene_on):
    """reft.generate decodes on a plain-transformers twin (shared weights, native hooks) when it can."""
    fast = ids(reft, PROMPTS, intervene_on=intervene_on, backend="hf")
    bridge = ids(reft, PROMPTS, intervene_on=intervene_on, backend="bridge")
    assert torch.equal(fast, bridge)


def test_the_twin_shares_weights_and_follows_training(reft, model):
    from reftlens.runtime.hf_backend import twin as hf_twin

    twin = hf_twin(reft.model, reft.units, reft.cast).hf
    bridge_ptrs = {p.data_ptr() for p in model.parameters()}
    assert all(p.data_ptr() in bridge_ptrs for p in twin.parameters())  # no copy of the base
    assert sum(p.numel() for p in reft.parameters()) == sum(p.numel() for p in reft.phis.parameters())
    before = ids(reft, PROMPTS, backend="hf")
    with torch.no_grad():
        reft.phis[0].W.bias.mul_(-1)  # "training" changes Φ: the twin sees it at once
    assert torch.equal(ids(reft, PROMPTS, backend="hf"), ids(reft, PROMPTS, backend="bridge"))
    assert not torch.equal(before, ids(reft, PROMPTS, backend="hf"))


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(do_sample=True, temperature=-1.0), "temperature must be above 0 when sampling"),
        (dict(do_sample=True, temperature=0.0), "temperature must be above 0 when sampling"),
        (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number; got nan"),
        (dict(do_sample=True, top_k=0), "top_k must be None or an integer of at least 1"),
        (dict(do_sample=True, top_k=-3), "top_k must be None or an integer of at least 1"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be None or a number in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be None or a number in \(0, 1\]"),
        (dict(do_sample=True, top_p=float("nan")), r"top_p must be None or a number in \(0, 1\]"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens="4"), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=None), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=True), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(do_sample="yes"), "do_sample must be True or False"),
    ],
)
def test_bad_sampling_arguments_are_refused_by_name(reft, kw, words):
    from reftlens.steering import alpha_sweep

    kw = {"max_new_tokens": 4, **kw}
    n = kw.pop("max_new_tokens")
    with pytest.raises(ConfigError, match=words):
        reft.generate(PROMPTS, n, **kw)
    with pytest.raises(ConfigError, match=words):
        alpha_sweep(reft, PROMPTS[:1], [1.0], n, **kw)


def test_generation_beyond_the_context_is_refused_with_the_lengths(reft):
    n_ctx = reft.model.cfg.n_ctx
    tokens, mask = reft.tokenize(["a b c"])
    room = n_ctx - tokens.shape[1]
    reft.generate(tokens, 1, attention_mask=mask, eos_token_id=None)
    with pytest.raises(
        ConfigError,
        match=rf"longest prompt is {tokens.shape[1]} tokens and max_new_tokens={room + 1}: {n_ctx + 1} tokens",
    ):
        reft.generate(tokens, room + 1, attention_mask=mask)
    with pytest.raises(ConfigError, match=rf"beyond the limit of {n_ctx} tokens"):
        reft.generate(["x " * (n_ctx + 5)], 2)


def test_no_prompts_is_refused_as_empty(reft):
    """An empty list is a list: the error says it is empty (it said "must be a list … got list")."""
    with pytest.raises(ConfigError, match="prompts is an empty list: give at least one"):
        reft.generate([], 4)
    with pytest.raises(ConfigError, match="is an empty list"):
        reft([], attention_mask=None)
