import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a mistake that reaches for the hub fails fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ("tiny-gpt2", "tiny-llama")


@pytest.fixture(scope="session")
def tiny_models():
    from reftlens import load_model

    return {name: load_model(name) for name in TINY}


@pytest.fixture(params=TINY)
def model(request, tiny_models):
    m = tiny_models[request.param]
    yield m
    # every test must leave the shared model without hooks
    left = [n for n, hp in m.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not left, f"hooks left on {left}"


def plain(model, tokens, mask=None):
    with torch.no_grad():
        return model(tokens, attention_mask=mask)


# Tiers: the slow tests are marked so they can be seen and chosen (`-m "not slow"` for a quick run,
# `-m notebook` for the tutorials). Notebook and multi-process modules mark themselves; a test that
# takes a real-model fixture is marked here, so a new one is marked without anyone remembering to.
REAL_MODEL_FIXTURES = {"smollm2", "pyreft_smollm2"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realmodel)
        if any(item.get_closest_marker(m) for m in ("notebook", "multiprocess", "realmodel")):
            item.add_marker(pytest.mark.slow)
