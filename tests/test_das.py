"""DAS against ground truth: a model with a variable planted in a known direction."""

import pytest
import torch

from reftlens import DII, Intervention, ReftModel
from reftlens.analysis import AnalysisError, iia, principal_angles, train_das
from reftlens.analysis.toy import EVEN, ODD, planted_pairs, planted_variable_model


@pytest.fixture(scope="module")
def planted():
    return planted_variable_model(write_layer=1)


def test_the_planted_model_computes_the_variable(planted):
    model, u, v = planted
    pairs = planted_pairs(64, seed=5)
    base = torch.stack([p["base"] for p in pairs])
    with torch.no_grad():
        logits, cache = model.run_with_cache(base)
    even = base[:, -1] % 2 == 0
    assert torch.equal(logits[:, -1, EVEN] > logits[:, -1, ODD], even)
    resid = cache["blocks.2.hook_resid_post"][:, -1]
    assert (resid @ v).abs().max() < 1e-4  # above the write layer: only in u
    assert torch.equal((resid @ u) > 0, even)


def test_das_recovers_the_planted_subspace(planted):
    model, u, _ = planted
    result = train_das(model, planted_pairs(256, seed=1), layers=2, rank=1, max_steps=300, lr=2e-2)
    held_out = planted_pairs(200, seed=2)
    assert iia(result.reft, held_out) >= 0.95
    # the mean direction is invisible to LayerNorm (no gradient reaches it): compare in its complement
    R = result.dii.R.weight.detach()
    R = R - R.mean(1, keepdim=True)
    assert principal_angles(R, u[None]).max() < 0.1  # radians
    # controls: a random subspace, and the learned one at a layer below the write, score at chance
    random = ReftModel(model, Intervention(DII(model.cfg.d_model, 1), layers=2, positions="l1"))
    wrong_layer = ReftModel(model, Intervention(result.dii, layers=0, positions="l1"))
    for control in (random, wrong_layer):
        assert 0.35 <= iia(control, held_out) <= 0.65


def test_das_input_errors(planted):
    model, _, _ = planted
    with pytest.raises(AnalysisError, match="needs 'base', 'source' and 'label'"):
        train_das(model, [{"base": [1, 2], "label": 4}], layers=1, max_steps=1)
    with pytest.raises(AnalysisError, match="same length"):
        train_das(
            model,
            [
                {"base": [11, 12], "source": [11, 12], "label": 4},
                {"base": [11, 12, 13], "source": [11, 12], "label": 4},
            ],
            layers=1,
            max_steps=1,
        )


def test_principal_angles():
    a = torch.eye(4)[:2]
    assert torch.allclose(principal_angles(a, a), torch.zeros(2), atol=1e-6)
    assert torch.allclose(principal_angles(a, torch.eye(4)[2:3]), torch.tensor([torch.pi / 2]), atol=1e-6)
