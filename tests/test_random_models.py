"""Random models with a real model's shape (benchmarking at scale), tested at a scaled-down size."""

import pytest
import torch

from reftlens import ConfigError, Intervention, LoReFT, ReftModel
from reftlens.models import RANDOM_SHAPES, random_model

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


@pytest.mark.parametrize("shape", ["llama-1b", "qwen-1.5b"])
def test_random_model_loads_is_seeded_and_runs_a_set(shape):
    a, b, c = random_model(shape, **SMALL), random_model(shape, **SMALL), random_model(shape, seed=1, **SMALL)
    sa, sb, sc = (m.original_model.state_dict() for m in (a, b, c))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed: same weights
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())  # another seed differs
    assert (a.cfg.d_model, a.cfg.n_layers, a.cfg.d_vocab) == (64, 2, 512)
    torch.manual_seed(0)
    reft = ReftModel(a, Intervention(LoReFT(64, rank=4), layers=1, positions="l1"))
    with torch.no_grad():
        edited, base = reft(["The capital of France is"]), a(a.to_tokens("The capital of France is"))
    assert edited.shape == base.shape and torch.isfinite(edited).all()
    # the set edits the last position only: every earlier position is the base model's
    assert torch.allclose(edited[:, :-1], base[:, :-1], atol=1e-5)


@pytest.mark.parametrize(
    "shape, n_params", [("smollm2-135m", 134_515_008), ("llama-1b", 1_235_814_400), ("qwen-1.5b", 1_543_714_304)]
)
def test_random_model_shapes_have_the_published_parameter_counts(shape, n_params):
    """The full-size configs, built on the meta device (no memory, no init), count the published models'
    parameters (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    from reftlens.models import _random_config, tiny_tokenizer

    fields = {k: v for k, v in RANDOM_SHAPES[shape].items() if k != "arch"}
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(_random_config(RANDOM_SHAPES[shape]["arch"], fields, tiny_tokenizer()))
    assert sum(p.numel() for p in hf.parameters()) == n_params


def test_random_model_in_bfloat16_and_aliases():
    m = random_model("Llama-3.2-1B", dtype=torch.bfloat16, **SMALL)
    assert {p.dtype for p in m.original_model.parameters()} == {torch.bfloat16}
    assert type(m.original_model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(shape="gpt-7b"), "unknown shape 'gpt-7b'"),
        (dict(rope_theta=3), "'rope_theta' cannot be overridden"),
        (dict(hidden_size=0), "hidden_size=0 must be a positive int"),
        (dict(hidden_size=65, num_attention_heads=4), "must divide hidden_size"),
        (dict(vocab_size=10), "below the tokenizer's"),
        (dict(dtype=torch.int8), "dtype must be a floating torch.dtype"),
        (dict(seed=1.5), "seed must be an int"),
    ],
)
def test_random_model_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        random_model(**kwargs)
