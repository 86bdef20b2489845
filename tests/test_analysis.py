"""Patching sweeps equal transformer_lens.patching, with fewer forwards; bad input is refused."""

import pytest
import torch
from transformer_lens import patching

from reftlens import ConfigError
from reftlens.analysis import AnalysisError, patch_sweep

CLEAN = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
CORRUPT = torch.tensor([[1, 51, 60, 71, 80, 90, 100, 110]])


def logit_diff(logits):
    return logits[0, -1, 5] - logits[0, -1, 7]


REFERENCE = {
    "resid_pre": patching.get_act_patch_resid_pre,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
}


@pytest.mark.parametrize("hook", sorted(REFERENCE))
def test_sweep_equals_transformer_lens_patching(model, hook):
    ours = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=hook)
    _, cache = model.run_with_cache(CLEAN)
    ref = REFERENCE[hook](model, CORRUPT, cache, logit_diff)
    assert ours.values.shape == (model.cfg.n_layers, CLEAN.shape[1])
    torch.testing.assert_close(ours.values, ref.float().cpu(), atol=1e-5, rtol=1e-5)
    assert (ours.values.abs() > 1e-4).any()  # not vacuous


def test_batched_metric_and_small_batches_agree(model):
    slow = patch_sweep(model, CLEAN, CORRUPT, logit_diff, batched=False, max_rows=1)
    fast = patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[:, -1, 5] - lg[:, -1, 7], batched=True)
    torch.testing.assert_close(slow.values, fast.values, atol=1e-5, rtol=1e-5)


def test_patching_the_last_layer_resid_post_restores_the_clean_run(model):
    res = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_post")
    assert res.values[-1, -1] == pytest.approx(res.clean, abs=1e-4)
    # position 0 sees the same token in both runs (and nothing before it): patching it changes nothing
    torch.testing.assert_close(res.values[:, 0], torch.full((model.cfg.n_layers,), res.corrupted), atol=1e-4, rtol=0)


def test_bad_input(model):
    with pytest.raises(AnalysisError, match=r"clean tokens have shape \(1, 8\) and corrupted tokens \(1, 6\).*same batch size and length"):
        patch_sweep(model, CLEAN, CORRUPT[:, :6], logit_diff)
    with pytest.raises(ConfigError, match="has no position axis"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="attn.hook_pattern")
    with pytest.raises(ConfigError, match="does not exist"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_middle")
    with pytest.raises(AnalysisError, match="must return one number"):
        patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[0, -1], batched=False)
    with pytest.raises(AnalysisError, match=r"batched metric must map logits"):
        patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[:, -1, :2], batched=True)


def test_heatmap_is_saved(model, tmp_path):
    res = patch_sweep(model, CLEAN, CORRUPT, logit_diff)
    fig = res.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len(fig.axes[0].get_xticklabels()) == CLEAN.shape[1]


# ---- causal tracing ---------------------------------------------------------------------------

from reftlens import ReftModel  # noqa: E402
from reftlens.analysis import causal_trace, corruption, restoration, subject_span  # noqa: E402
from reftlens.analysis.tracing import _window  # noqa: E402

PROMPT, SUBJECT = "the quick brown fox jumps over", "quick brown"


@pytest.fixture
def trace(model):
    return causal_trace(model, PROMPT, SUBJECT, samples=3, seed=1)


def test_trace_bounds(model, trace):
    start, end = trace.subject
    assert "".join(trace.tokens[start:end]).strip() == SUBJECT
    assert trace.values[-1, -1] == pytest.approx(trace.clean, abs=1e-6)  # the whole final state restored
    # before the subject nothing is noisy: restoring there changes nothing
    torch.testing.assert_close(trace.values[:, :start], torch.full((model.cfg.n_layers, start), trace.corrupted), atol=1e-6, rtol=0)
    assert trace.corrupted != pytest.approx(trace.clean, abs=1e-7)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_trace_equals_the_pieces_run_as_ordinary_interventions(model, kind):
    res = causal_trace(model, PROMPT, SUBJECT, samples=3, seed=1, kind=kind, window=2)
    tokens, span = subject_span(model, PROMPT, SUBJECT)
    answer_id = res.answer_id
    for layer, pos in [(0, span[0]), (1, span[1] - 1), (model.cfg.n_layers - 1, tokens.shape[1] - 2)]:
        layers = _window(layer, kind, 2, model.cfg.n_layers)
        reft = ReftModel(model, [corruption(model, span, noise=3.0, seed=1), restoration(layers, pos, kind)])
        batch = tokens.expand(3, -1)
        logits = reft(batch, sources=batch)
        p = logits[:, -1].softmax(-1)[:, answer_id].mean()
        assert res.values[layer, pos] == pytest.approx(float(p), abs=1e-6), (kind, layer, pos)


def test_trace_errors_and_plot(model, trace, tmp_path):
    from reftlens.analysis import AnalysisError

    with pytest.raises(AnalysisError, match="subject 'zebra' is not in the prompt"):
        causal_trace(model, PROMPT, "zebra")
    with pytest.raises(AnalysisError, match="kind must be one of"):
        causal_trace(model, PROMPT, SUBJECT, kind="heads")
    trace.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000
