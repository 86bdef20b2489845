"""Folding ReFT into weights: reftlens.merge and reftlens.save_peft give the hooked path's numbers.

Φ(Wx + b) = (W + U·DW)x + b + U(Db + c) for Φ(h) = h + U(Dh + c): exact for an affine Φ at every
position on attn_out / mlp_out, on every architecture reftlens merges, with padding on either side.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reftlens
from reftlens import DII, DiReFT, ExportError, Intervention, LoReFT, NodiReFT, Noise, ReftModel, Steer
from reftlens.export.merge import compose
from reftlens.interventions import Affine, Phi
from reftlens.models import tiny_tokenizer
from reftlens.runtime.compat import fast_attention
from reftlens.runtime.hf_backend import pristine_hf

peft = pytest.importorskip("peft")

PROMPTS = ["the quick brown fox", "a", "over the river and"]

TINY_CONFIGS = {
    "qwen2": lambda c: T.Qwen2Config(num_key_value_heads=2, **c),
    "mistral": lambda c: T.MistralConfig(num_key_value_heads=2, **c),
    "gemma": lambda c: T.GemmaConfig(num_key_value_heads=2, head_dim=16, **c),
    "gpt-neox": lambda c: T.GPTNeoXConfig(**c),
}
ARCHS = ("tiny-gpt2", "tiny-llama", *TINY_CONFIGS)
# which projections can hold the bias a fold adds (natively or through a config switch)
BIAS_OK = {
    "tiny-gpt2": (True, True),
    "tiny-llama": (True, True),
    "gpt-neox": (True, True),
    "gemma": (True, False),
    "qwen2": (False, False),
    "mistral": (False, False),
}


@pytest.fixture(scope="module")
def arch_models(tiny_models):
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
    models = dict(tiny_models)
    for arch, make in TINY_CONFIGS.items():
        torch.manual_seed(0)
        models[arch] = reftlens.load_model(T.AutoModelForCausalLM.from_config(make(common)).eval(), tokenizer=tok)
    return models


def mergeable_set(model, bias_attn=True, bias_mlp=True, seed=0):
    """LoReFT tied over two layers' mlp_out; DiReFT then LoReFT stacked on one attn_out; all positions."""
    torch.manual_seed(seed)
    d = model.cfg.d_model
    return ReftModel(
        model,
        [
            Intervention(LoReFT(d, 4, init="random", bias=bias_mlp), layers=[0, 2], hook="mlp_out"),
            Intervention(DiReFT(d, 2, init="random", bias=bias_attn), layers=1, hook="attn_out", stack=0),
            Intervention(
                LoReFT(d, 3, init="random", bias=bias_attn), layers=1, hook="attn_out", stack=1, name="on top"
            ),
        ],
    ).eval()


def hf_logits(hf, tokens, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as TransformerLens does; HF derives them only in generate
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits


def assert_same_as_hooked(reft, hf):
    for side in ("left", "right"):
        tokens, mask = reft.tokenize(PROMPTS, padding_side=side)
        with torch.no_grad():
            ours, plain = reft(tokens, attention_mask=mask), reft.model(tokens, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(hf_logits(hf, tokens, mask)[real], ours[real], atol=1e-4, rtol=0)
        assert (ours - plain)[real].abs().max() > 1e-2  # the interventions do something


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_equals_the_hooked_path(arch_models, arch):
    model = arch_models[arch]
    reft = mergeable_set(model, *BIAS_OK[arch])
    merged = reftlens.merge(reft)
    assert type(merged) is type(model.original_model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in merged.modules())
    assert not hasattr(merged, "reft_interventions")
    assert_same_as_hooked(reft, merged)
    # the base is untouched, and the merged model has exactly the base's parameter names (+ switched-on biases)
    base = dict(pristine_hf(model).named_parameters())
    extra = set(dict(merged.named_parameters())) - set(base)
    assert all(n.endswith(".bias") for n in extra)


def test_llama_gets_its_bias_switches_and_zero_biases_elsewhere(arch_models):
    model = arch_models["tiny-llama"]
    merged = reftlens.merge(mergeable_set(model))
    assert merged.config.attention_bias and merged.config.mlp_bias
    q_bias = merged.model.layers[0].self_attn.q_proj.bias
    assert q_bias is not None and not q_bias.any()  # added by the switch, zero: the function is unchanged
    assert merged.model.layers[1].self_attn.o_proj.bias.any()
    assert not merged.model.layers[0].self_attn.o_proj.bias.any()  # no intervention on attn_out at layer 0
    bias_free = reftlens.merge(mergeable_set(model, bias_attn=False, bias_mlp=False))
    assert not bias_free.config.attention_bias and not bias_free.config.mlp_bias  # nothing to add: config unchanged


@pytest.mark.parametrize("arch", ["tiny-llama", "qwen2", "tiny-gpt2"])
def test_a_merge_without_new_biases_has_the_plain_models_layout(arch_models, arch):
    """Same config, same parameter names and shapes as the base: the forward costs what the plain model's does."""
    model = arch_models[arch]
    merged = reftlens.merge(mergeable_set(model, bias_attn=False, bias_mlp=False))
    plain = pristine_hf(model)
    fast_attention(plain)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert merged.config.to_diff_dict() == plain.config.to_diff_dict()
    assert merged.config._attn_implementation == plain.config._attn_implementation


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_equals_the_hooked_path(arch_models, arch, tmp_path):
    model = arch_models[arch]
    reft = mergeable_set(model)  # with b: peft's lora_bias carries it, even where the projection has no bias
    path = reftlens.save_peft(reft, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 5 and config["lora_bias"]
    assert config["fan_in_fan_out"] == (arch == "tiny-gpt2")
    loaded = peft.PeftModel.from_pretrained(pristine_hf(model), path)
    assert_same_as_hooked(reft, loaded.eval())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_generation_gives_the_same_tokens(arch_models, name, tmp_path):
    model = arch_models[name]
    reft = mergeable_set(model)
    tokens, mask = reft.tokenize(PROMPTS)
    ours = reft.generate(tokens, 10, attention_mask=mask, eos_token_id=None, intervene_on="all")
    kwargs = dict(
        input_ids=tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(reftlens.merge(reft).generate(**kwargs), ours)
    adapter = peft.PeftModel.from_pretrained(pristine_hf(model), reftlens.save_peft(reft, tmp_path / "a")).eval()
    assert torch.equal(adapter.generate(**kwargs), ours)


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("reftlens", "transformer_lens"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_saved_merge_and_adapter_load_with_plain_transformers_and_peft(arch_models, tmp_path):
    cases = {}
    for name in ("tiny-llama", "tiny-gpt2"):
        model = arch_models[name]
        reft = mergeable_set(model)
        reftlens.merge(reft).save_pretrained(tmp_path / name / "merged")
        pristine_hf(model).save_pretrained(tmp_path / name / "base")
        reftlens.save_peft(reft, tmp_path / name / "adapter", base_model_name_or_path=str(tmp_path / name / "base"))
        tokens, mask = reft.tokenize(PROMPTS)
        with torch.no_grad():
            expected = reft(tokens, attention_mask=mask)
        torch.save({"tokens": tokens, "mask": mask, "logits": expected}, tmp_path / name / "expected.pt")
        cases[name] = str(tmp_path / name)
    code = (
        BLOCK
        + f"""
import torch
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM
for name, folder in {cases!r}.items():
    e = torch.load(folder + "/expected.pt")
    pos = (e["mask"].cumsum(-1) - 1).clamp(min=0)
    real = e["mask"].bool()
    for kind, m in (("merged", AutoModelForCausalLM.from_pretrained(folder + "/merged")),
                    ("adapter", AutoPeftModelForCausalLM.from_pretrained(folder + "/adapter"))):
        with torch.no_grad():
            got = m.eval()(input_ids=e["tokens"], attention_mask=e["mask"], position_ids=pos).logits
        print(name, kind, float((got - e["logits"])[real].abs().max()))
print("blocked", "reftlens" in sys.modules, "transformer_lens" in sys.modules)
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
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "blocked False False"
    assert len(lines) == 5 and all(float(line.split()[-1]) < 1e-4 for line in lines[:-1]), out.stdout


# ---- what cannot fold is refused, with the intervention's name and the algebra


class Tanh(nn.Module):
    def forward(self, h):
        return torch.tanh(h)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda d: Intervention(LoReFT(d, 2), layers=1, name="resid"),
            "'resid'.*hook 'resid_post' is not the output of one linear map",
        ),
        (
            lambda d: Intervention(LoReFT(d, 2), layers=1, hook="mlp_out", positions="f2+l2", name="fl"),
            "'fl'.*edits positions f2\\+l2 only.*a weight acts on every position",
        ),
        (
            lambda d: Intervention(DII(d, 2), layers=1, hook="attn_out", name="das"),
            "'das'.*reads s from another \\(source\\) run",
        ),
        (lambda d: Intervention(Tanh(), layers=1, hook="mlp_out", name="squash"), "'squash'.*no affine form"),
        (
            lambda d: Intervention(Noise(0.1, d_model=d), layers=1, hook="mlp_out", name="noise"),
            "'noise'.*no affine form",
        ),
    ],
)
def test_what_cannot_fold_is_refused(tiny_models, build, message, tmp_path):
    model = tiny_models["tiny-llama"]
    d = model.cfg.d_model
    reft = ReftModel(model, [Intervention(LoReFT(d, 2), layers=0, hook="mlp_out"), build(d)])
    with pytest.raises(ExportError, match=message):
        reftlens.merge(reft)
    with pytest.raises(ExportError, match=message):
        reftlens.save_peft(reft, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_dropout_in_train_mode_is_refused_and_eval_folds(tiny_models):
    model = tiny_models["tiny-gpt2"]
    reft = ReftModel(
        model, Intervention(LoReFT(model.cfg.d_model, 2, dropout=0.1), layers=1, hook="mlp_out", name="dp")
    )
    with pytest.raises(ExportError, match="'dp'.*dropout \\(p=0.1\\) is on \\(train mode\\).*reft.eval\\(\\)"):
        reftlens.merge(reft.train())
    reftlens.merge(reft.eval())


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_a_bias_the_class_cannot_hold_is_refused(arch_models, arch, tmp_path):
    reft = mergeable_set(arch_models[arch], bias_attn=False, bias_mlp=True)
    with pytest.raises(
        ExportError,
        match=r"'loreft\(rank=4\)@L0' cannot fold into .*mlp.down_proj: the fold adds a bias"
        r".*no switch.*bias=False",
    ):
        reftlens.merge(reft)
    reftlens.save_peft(reft, tmp_path / "adapter")  # a LoRA bias carries it


def test_an_old_peft_without_lora_bias_refuses_only_a_nonzero_bias(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("reftlens.export.lora.peft_supports_lora_bias", lambda: False)
    model = tiny_models["tiny-llama"]
    with pytest.raises(ExportError, match="has no LoRA bias.*bias=False"):
        reftlens.save_peft(mergeable_set(model), tmp_path / "a")
    path = reftlens.save_peft(mergeable_set(model, bias_attn=False, bias_mlp=False), tmp_path / "b")
    assert (
        "lora_bias" not in json.loads((path / "adapter_config.json").read_text())
        or not json.loads((path / "adapter_config.json").read_text())["lora_bias"]
    )


def test_to_peft_replaces_its_own_folder_and_refuses_others(tiny_models, tmp_path):
    reft = mergeable_set(tiny_models["tiny-llama"])
    path = reftlens.save_peft(reft, tmp_path / "a")
    reftlens.save_peft(reft, path)  # an earlier adapter is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(reftlens.SaveError, match="holds other files"):
        reftlens.save_peft(reft, tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(reftlens.SaveError, match="it is a file"):
        reftlens.save_peft(reft, tmp_path / "file")


def test_save_peft_records_the_base_it_is_given(tiny_models, tmp_path):
    reft = mergeable_set(tiny_models["tiny-llama"])
    path = reftlens.save_peft(reft, tmp_path / "a", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for bad in ("", "  ", 3, ["a"]):
        with pytest.raises(reftlens.ExportError, match=r"base_model_name_or_path must be a non-empty hub id"):
            reftlens.save_peft(reft, tmp_path / "b", base_model_name_or_path=bad)
        assert not (tmp_path / "b").exists()


# ---- a bank: its sets are alternatives, so one set folds at a time


def bank_of(model):
    """Two mergeable sets as a bank, and each set alone (the same Φs)."""
    alone = {"A": mergeable_set(model, seed=0), "B": mergeable_set(model, bias_attn=False, seed=1)}
    return ReftModel(model, {name: reft.interventions for name, reft in alone.items()}).eval(), alone


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_merging_a_banks_set_is_merging_that_set_alone_and_running_the_bank_on_it(arch_models, arch):
    model = arch_models[arch]
    bank, alone = bank_of(model)
    tokens, mask = bank.tokenize(PROMPTS)
    real, n = mask.bool(), len(PROMPTS)
    merged = {name: reftlens.merge(bank, adapter=name) for name in bank.adapters}
    for name, reft in alone.items():
        solo = reftlens.merge(reft)
        assert merged[name].state_dict().keys() == solo.state_dict().keys()
        assert all(torch.equal(v, solo.state_dict()[k]) for k, v in merged[name].state_dict().items())
        with torch.no_grad():
            hooked = bank(tokens, attention_mask=mask, adapters=[name] * n)
        torch.testing.assert_close(hf_logits(merged[name], tokens, mask)[real], hooked[real], atol=1e-5, rtol=0)
    a, b = (hf_logits(merged[name], tokens, mask)[real] for name in ("A", "B"))
    assert (a - b).abs().max() > 1e-2  # the sets differ, so neither merge holds the other's edits


def test_a_bank_merges_only_a_named_set_and_a_plain_set_takes_no_name(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    bank, alone = bank_of(model)
    missing = re.escape(
        "this ReftModel is a bank of sets ['A', 'B']; a bank's sets are alternatives (each row runs the one its "
        "adapters= names), not one edit, so they do not fold together. Fold one: "
    )
    with pytest.raises(ExportError, match=missing + re.escape("merge(reft, adapter=name), name one of ['A', 'B'].")):
        reftlens.merge(bank)
    with pytest.raises(
        ExportError, match=missing + re.escape("save_peft(reft, path, adapter=name), name one of ['A', 'B'].")
    ):
        reftlens.save_peft(bank, tmp_path / "a")
    for bad in ("C", ["A"], 0):
        unknown = re.escape(f"there is no set {bad!r} to fold; the sets are ['A', 'B'].")
        with pytest.raises(ExportError, match=unknown):
            reftlens.merge(bank, adapter=bad)
        with pytest.raises(ExportError, match=unknown):
            reftlens.save_peft(bank, tmp_path / "a", adapter=bad)
    for name in ("A", "default"):  # as ReftModel.save: a plain set is not a bank, whatever the name
        plain = re.escape(f"there is no set {name!r} to fold; the sets are none (not a bank)") + ".*Leave adapter= out"
        with pytest.raises(ExportError, match=plain):
            reftlens.merge(alone["A"], adapter=name)
        with pytest.raises(ExportError, match=plain):
            reftlens.save_peft(alone["A"], tmp_path / "a", adapter=name)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("name", ["A", "B"])
def test_save_peft_of_a_banks_set_is_save_peft_of_that_set_alone(tiny_models, tmp_path, name):
    from safetensors.torch import load_file

    model = tiny_models["tiny-llama"]
    bank, alone = bank_of(model)
    ours = reftlens.save_peft(bank, tmp_path / "bank", adapter=name)
    solo = reftlens.save_peft(alone[name], tmp_path / "solo")
    assert json.loads((ours / "adapter_config.json").read_text()) == json.loads(
        (solo / "adapter_config.json").read_text()
    )
    got, want = load_file(ours / "adapter_model.safetensors"), load_file(solo / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    loaded = peft.PeftModel.from_pretrained(pristine_hf(model), ours).eval()
    tokens, mask = bank.tokenize(PROMPTS)
    with torch.no_grad():
        hooked = bank(tokens, attention_mask=mask, adapters=[name] * len(PROMPTS))
    real = mask.bool()
    torch.testing.assert_close(hf_logits(loaded, tokens, mask)[real], hooked[real], atol=1e-5, rtol=0)


# ---- the algebra, and user Φs


@reftlens.register("test_scale_shift")
class ScaleShift(Phi):
    """A user Φ that is affine and says so: h + v(αᵀh + β)."""

    def __init__(self, d_model: int, wrong: bool = False):
        super().__init__()
        self.d_model, self.wrong = d_model, wrong
        self.v, self.a, self.beta = (
            nn.Parameter(torch.randn(d_model)),
            nn.Parameter(torch.randn(d_model)),
            nn.Parameter(torch.randn(1)),
        )

    def forward(self, h):
        return h + (h @ self.a + self.beta)[..., None] * self.v

    def affine(self):
        return Affine(self.v[:, None], self.a[None] * (2 if self.wrong else 1), self.beta)


def test_a_user_phi_with_affine_folds_and_a_wrong_affine_is_caught(tiny_models):
    model = tiny_models["tiny-gpt2"]
    d = model.cfg.d_model
    torch.manual_seed(0)
    reft = ReftModel(
        model,
        [
            Intervention(ScaleShift(d), layers=[0, 1], hook="attn_out"),
            Intervention(Steer(torch.randn(d)), layers=2, hook="mlp_out"),
        ],
    )
    assert_same_as_hooked(reft, reftlens.merge(reft))
    wrong = ReftModel(model, Intervention(ScaleShift(d, wrong=True), layers=0, hook="attn_out", name="liar"))
    with pytest.raises(ExportError, match="'liar'.*affine\\(\\) disagrees with its forward"):
        reftlens.merge(wrong)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    ranks=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    conv=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_composition_is_sequential_application(n, ranks, conv, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    d_in, d_out = 7, 5
    W, b = torch.randn(d_out, d_in, **f64), torch.randn(d_out, **f64) if has_bias else None
    edits = [
        Affine(torch.randn(d_out, r, **f64), torch.randn(r, d_out, **f64), torch.randn(r, **f64)) for r in ranks[:n]
    ]
    A, B, shift = compose(W.T.contiguous().T if conv else W, b, edits)  # Conv1D hands a transposed view
    x = torch.randn(4, d_in, **f64)
    y = x @ W.T + (0 if b is None else b)
    for e in edits:
        y = e(y)
    torch.testing.assert_close(x @ (W + B @ A).T + (0 if b is None else b) + shift, y, atol=1e-9, rtol=1e-9)
    assert A.shape == (sum(ranks[:n]), d_in) and B.shape == (d_out, sum(ranks[:n]))


def test_bias_free_phis_are_linear_and_save_their_option(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    d = model.cfg.d_model
    for cls in (LoReFT, DiReFT, NodiReFT, reftlens.NoReFT):
        phi = cls(d, 2, init="random", bias=False)
        assert phi.config()["bias"] is False and not phi.b.any()
        assert "bias" not in cls(d, 2).config()  # saves from before the option are unchanged
        h = torch.randn(3, d)
        torch.testing.assert_close(phi(2 * h), 2 * phi(h), atol=1e-5, rtol=0)  # no shift: Φ is linear
    reft = ReftModel(model, Intervention(LoReFT(d, 2, init="random", bias=False), layers=1, hook="mlp_out"))
    loaded = ReftModel.load(str(reft.save(tmp_path / "s")), model)
    assert loaded.phis[0].W.bias is None


def test_the_vllm_benchmark_skips_cleanly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the benchmark would run, not skip")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_vllm_lora.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("skipped: ") and "CUDA" in out.stdout


class _NoDirections(Phi):
    """An affine Φ of rank 0: Φ(h) = h, with no direction to write."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def forward(self, h):
        return h

    def affine(self):
        d = self.d_model
        return Affine(torch.zeros(d, 0), torch.zeros(0, d), torch.zeros(0))


def test_save_peft_of_a_rank_0_edit_says_lora_needs_rank_1(model, tmp_path):
    reft = ReftModel(model, Intervention(_NoDirections(model.cfg.d_model), layers=1, hook="mlp_out", name="noop"))
    with pytest.raises(ExportError, match=r"'noop' fold to rank 0.*LoRA adapter needs rank ≥ 1 \(peft refuses r=0\)"):
        reftlens.save_peft(reft, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    reftlens.merge(reft)  # merging a rank-0 edit is a no-op, not an error


def test_a_nan_in_a_phi_is_reported_as_non_finite_weights_by_every_fold(model, tmp_path):
    reft = mergeable_set(model)
    phi = reft.units[0].phi
    with torch.no_grad():
        next(phi.parameters()).view(-1)[0] = float("nan")
    for export in (lambda: reftlens.save_peft(reft, tmp_path / "a"), lambda: reftlens.merge(reft)):
        with pytest.raises(
            ExportError, match=rf"intervention {re.escape(repr(reft.units[0].name))}: its Φ .*non-finite weights"
        ) as e:
            export()
        assert "disagrees" not in str(e.value)
    assert not (tmp_path / "a").exists()
