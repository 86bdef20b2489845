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
