"""Export to plain transformers: same numbers as the TransformerLens path, no TransformerLens needed."""

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers as T

import reftlens
from reftlens import DiReFT, Interchange, Intervention, LoReFT, ReftModel
from reftlens.export import ExportError, load_hf, save_hf, to_hf
from reftlens.models import tiny_hf_model, tiny_tokenizer
from reftlens.runtime.hf_backend import decoder_layers

PROMPTS = ["the quick brown fox", "a", "over the river and"]


def build_set(model):
    torch.manual_seed(0)
    d = model.cfg.d_model
    return ReftModel(
        model,
        [
            Intervention(LoReFT(d, 4, init="random"), layers=[0, 2], positions="f2+l2"),
            Intervention(DiReFT(d, 2, init="random"), layers=1, positions="l3", hook="attn_out"),
            Intervention(LoReFT(d, 2, init="random"), layers=model.cfg.n_layers - 1, positions="f1", hook="mlp_out"),
            Intervention(LoReFT(d, 2, init="random"), layers=1, positions="all", hook="resid_pre"),
        ],
    )


def hf_logits(hf, tokens, mask):
    # HF computes positions from the mask only in generate; give them explicitly, as TransformerLens does
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits


def assert_same(reft, hf, side):
    tokens, mask = reft.tokenize(PROMPTS, padding_side=side)
    with torch.no_grad():
        ours = reft(tokens, attention_mask=mask)
    theirs = hf_logits(hf, tokens, mask)
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = reft.model(tokens, attention_mask=mask)
    assert (ours - plain)[real].abs().max() > 1e-3  # the interventions do something


@pytest.mark.parametrize("side", ["left", "right"])
def test_export_matches_the_transformer_lens_path(model, side):
    reft = build_set(model)
    hf = to_hf(reft)
    assert type(hf).__module__.startswith("transformers.") and "Bridge" not in type(hf).__name__
    assert_same(reft, hf, side)


def test_positions_after_a_marker_export(model, tmp_path):
    from reftlens.positions import after

    torch.manual_seed(0)
    marker = after(" over", "f2+l1", tokenizer=model.tokenizer)
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2, init="random"), layers=1, positions=marker))
    prompts = ["the fox jumped over the lazy dog", "a cat sat over there"]
    tokens, mask = reft.tokenize(prompts)
    with torch.no_grad():
        ours = reft(tokens, attention_mask=mask)
    loaded = load_hf(save_hf(to_hf(reft), tmp_path / "exported"))
    real = mask.bool()
    torch.testing.assert_close(hf_logits(loaded, tokens, mask)[real], ours[real], atol=1e-5, rtol=0)


TINY_CONFIGS = {
    "qwen2": lambda c: T.Qwen2Config(num_key_value_heads=2, **c),
    "mistral": lambda c: T.MistralConfig(num_key_value_heads=2, **c),
    "gemma": lambda c: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **c),
    "gpt-neox": lambda c: T.GPTNeoXConfig(**c),
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_more_architectures(arch):
    tok = tiny_tokenizer()
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = reftlens.load_model(T.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](common)).eval(), tokenizer=tok)
    reft = build_set(model)
    assert_same(reft, to_hf(reft), "left")


def test_base_weights_are_bit_identical_and_the_tree_is_pristine(tiny_models):
    reft = build_set(tiny_models["tiny-llama"])
    hf = to_hf(reft)
    original, _ = tiny_hf_model("tiny-llama", seed=0)
    exported = {k: v for k, v in hf.state_dict().items() if not k.startswith("reft_interventions.")}
    assert exported.keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in exported.items())
    assert not any("_original_component" in n for n, _ in hf.named_modules())


@pytest.mark.parametrize("intervene_on", ["prompt", "all"])
def test_generate_gives_the_same_tokens_as_reft_generate(model, intervene_on):
    reft = build_set(model)
    hf = to_hf(reft, intervene_on=intervene_on)
    tokens, mask = reft.tokenize(PROMPTS)
    ours = reft.generate(tokens, 10, attention_mask=mask, eos_token_id=None, intervene_on=intervene_on)
    theirs = hf.generate(
        input_ids=tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(ours, theirs)


BLOCK_TL = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformer_lens" or name.startswith("transformer_lens."):
            raise ImportError("transformer_lens is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_save_and_load_without_transformer_lens(model, tmp_path):
    reft = build_set(model)
    hf = to_hf(reft)
    path = save_hf(hf, tmp_path / "exported", tokenizer=model.tokenizer)
    tokens, mask = reft.tokenize(PROMPTS)
    expected = hf_logits(hf, tokens, mask)
    torch.save({"tokens": tokens, "mask": mask, "logits": expected}, tmp_path / "expected.pt")
    code = (
        BLOCK_TL
        + f"""
import torch, reftlens
from reftlens.export import load_hf
m = load_hf({str(path)!r})
e = torch.load({str(tmp_path / "expected.pt")!r})
pos = (e["mask"].cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    got = m(input_ids=e["tokens"], attention_mask=e["mask"], position_ids=pos).logits
real = e["mask"].bool()
print("maxdiff", float((got - e["logits"])[real].abs().max()))
print("tl loaded", "transformer_lens" in sys.modules)
"""
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tl loaded False" in out.stdout
    assert float(out.stdout.split("maxdiff")[1].split()[0]) < 1e-5
    # in process too, and the reft folder is the usual safetensors + JSON
    loaded = load_hf(path)
    torch.testing.assert_close(hf_logits(loaded, tokens, mask)[mask.bool()], expected[mask.bool()], atol=1e-6, rtol=0)
    assert json.loads((path / "reft" / "reft_config.json").read_text())["intervene_on"] == "prompt"


def test_plain_transformers_cannot_load_a_save_hf_folder_as_the_base(tiny_models, tmp_path):
    from safetensors.torch import load_file

    reft = build_set(tiny_models["tiny-llama"])
    hf = to_hf(reft)
    path = save_hf(hf, tmp_path / "exported", tokenizer=tiny_models["tiny-llama"].tokenizer)
    small = save_hf(hf, tmp_path / "small", include_base=False, base_reference=str(path))
    for folder in (path, small):
        for auto in (T.AutoModelForCausalLM, T.AutoConfig):
            with pytest.raises(ValueError, match=r"reftlens-export: load this folder with reftlens\.load_hf\(folder\)"):
                auto.from_pretrained(folder)
    # the weights are still plain safetensors, bit-identical to the base's
    weights = load_file(path / "model.safetensors")
    base = {k: v for k, v in hf.state_dict().items() if not k.startswith("reft_interventions.")}
    assert weights.keys() == base.keys() and all(torch.equal(weights[k], base[k]) for k in base)
    # the tokenizer still loads alone; load_hf restores the config and applies the edits
    assert len(T.AutoTokenizer.from_pretrained(path)) == len(tiny_models["tiny-llama"].tokenizer)
    tokens, mask = reft.tokenize(PROMPTS)
    real = mask.bool()
    expected = hf_logits(hf, tokens, mask)
    for folder in (path, small):
        loaded = load_hf(folder)
        assert type(loaded) is type(hf) and loaded.config.model_type == "llama"
        assert loaded.config.architectures == ["LlamaForCausalLM"]
        torch.testing.assert_close(hf_logits(loaded, tokens, mask)[real], expected[real], atol=1e-6, rtol=0)
    # an export written before the guard (config.json as save_pretrained wrote it) still loads
    config = json.loads((path / "config.json").read_text())
    saved = config.pop("reftlens_export")
    config.update(model_type=saved["base_model_type"], architectures=saved["base_architectures"])
    (path / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(hf_logits(load_hf(path), tokens, mask)[real], expected[real], atol=1e-6, rtol=0)


def test_pickled_base_weights_are_refused_never_unpickled(tiny_models, tmp_path):
    hf = to_hf(build_set(tiny_models["tiny-llama"]))
    path = save_hf(hf, tmp_path / "exported")
    (path / "model.safetensors").unlink()
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("reft_interventions.")}
    torch.save(state, path / "pytorch_model.bin")  # what save_pretrained(safe_serialization=False) wrote
    with pytest.raises(
        reftlens.LoadError,
        match=rf"{path / 'pytorch_model.bin'}: the base model's weights are a "
        r"pickled checkpoint.*reftlens loads safetensors only.*"
        r"model.save_pretrained\(folder\) writes model.safetensors",
    ) as err:
        load_hf(path)
    assert "weights_only" not in str(err.value) and "unpickl" not in str(err.value).lower()
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(reftlens.LoadError, match=r"holds no base-model weights \(model.safetensors\)"):
        load_hf(path)


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_save_hf_replaces_only_its_own_earlier_export(tiny_models, tmp_path):
    reft = build_set(tiny_models["tiny-llama"])
    hf = to_hf(reft)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(reftlens.SaveError, match=rf"cannot save to {re.escape(str(notes))}: it is a file"):
        save_hf(hf, notes)
    assert notes.read_text() == "mine"
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n")
    reft.save(tmp_path / "reft")  # another writer's save is foreign here too
    for folder in (work, tmp_path / "reft"):
        before = files(folder)
        with pytest.raises(
            reftlens.SaveError, match=r"is not an earlier save to replace \(it has no reftlens_export.json\)"
        ):
            save_hf(hf, folder)
        assert files(folder) == before
    path = save_hf(hf, tmp_path / "exported")
    save_hf(hf, path, include_base=False, base_reference="elsewhere")  # its own earlier export: replaced whole
    assert not (path / "model.safetensors").exists() and (path / "reftlens_export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "notes.txt", "reft", "work"]  # no temporaries


def test_base_by_reference(tiny_models, tmp_path):
    reft = build_set(tiny_models["tiny-llama"])
    hf = to_hf(reft)
    base = tmp_path / "base"
    original, tok = tiny_hf_model("tiny-llama", seed=0)
    original.save_pretrained(base)
    path = save_hf(hf, tmp_path / "small", include_base=False, base_reference=str(base))
    assert not (path / "model.safetensors").exists()
    tokens, mask = reft.tokenize(PROMPTS)
    real = mask.bool()
    torch.testing.assert_close(
        hf_logits(load_hf(path), tokens, mask)[real], hf_logits(hf, tokens, mask)[real], atol=1e-6, rtol=0
    )


def test_refusals(model):
    with pytest.raises(ExportError, match="takes a source"):
        to_hf(ReftModel(model, Intervention(Interchange(), layers=1, positions="l1")))
    with pytest.raises(ExportError, match="hook 'attn.hook_z' has no native equivalent"):
        to_hf(ReftModel(model, Intervention(lambda h: h, layers=1, hook="attn.hook_z")))
    with pytest.raises(ExportError, match="Linear is not supported for export"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ExportError, match="carries no reftlens interventions"):
        save_hf(tiny_hf_model("tiny-gpt2")[0], "/tmp/never")


def test_compatibility_mode_is_refused_not_silently_wrong():
    hf, tok = tiny_hf_model("tiny-gpt2", seed=3)
    bridge = reftlens.load_model(hf, tokenizer=tok)
    bridge.enable_compatibility_mode()
    reft = ReftModel(bridge, Intervention(LoReFT(bridge.cfg.d_model, 2), layers=1, positions="l1"))
    with pytest.raises(ExportError, match="compatibility mode.*different basis"):
        to_hf(reft)


def test_exported_sets_keep_the_stack_order_and_the_collision_check(model):
    d = model.cfg.d_model
    torch.manual_seed(0)
    stacked = ReftModel(
        model,
        [
            Intervention(reftlens.Steer(torch.randn(d)), layers=1, positions="l2", stack=1),
            Intervention(LoReFT(d, 2, init="random"), layers=1, positions="l2", stack=0),
        ],
    )
    assert_same(stacked, to_hf(stacked), "left")  # LoReFT first, then the steer, on both paths
    untied = ReftModel(model, Intervention(LoReFT(d, 2), layers=1, positions="f3+l3", untied="positions"))
    hf = to_hf(untied)
    short = torch.tensor([[1, 5, 6, 7]])
    with pytest.raises(reftlens.CollisionError, match="both edit layers.1.layer.output"):
        hf(input_ids=short, attention_mask=torch.ones_like(short))


def test_load_hf_refuses_interventions_linked_from_outside_the_export(model, tmp_path):
    import os
    import shutil

    from reftlens.saving import LoadError

    hf = to_hf(build_set(model))
    save_hf(hf, tmp_path / "a")
    save_hf(hf, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "reft")
    os.symlink(tmp_path / "a" / "reft", tmp_path / "b" / "reft")
    with pytest.raises(LoadError, match=r"b: reft: .*is a link to .*outside"):
        load_hf(tmp_path / "b")


def test_load_pyreft_refuses_an_intkey_file_linked_from_outside(model, tmp_path):
    import os

    from reftlens.saving import LoadError

    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2, init="random"), layers=1, positions="l1"))
    reftlens.save_pyreft(reft, tmp_path / "a")
    reftlens.save_pyreft(reft, tmp_path / "b")
    (intkey,) = (tmp_path / "b").glob("intkey_*.bin")
    intkey.unlink()
    os.symlink(next((tmp_path / "a").glob("intkey_*.bin")), intkey)
    with pytest.raises(LoadError, match=r"config.json: intervention layer_1.*is a link to .*outside"):
        reftlens.load_pyreft(tmp_path / "b", model)
