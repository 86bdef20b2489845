"""Patching sweeps equal transformer_lens.patching, with fewer forwards; bad input is refused."""

import pytest
import torch
from transformer_lens import patching

from reftlens import ConfigError, NonFiniteError, Steer
from reftlens.analysis import AnalysisError, patch_sweep
from reftlens.analysis import activation_patching as patching_module

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
    slow = patch_sweep(model, CLEAN, CORRUPT, logit_diff, batched=False, batch_size=1)
    fast = patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[:, -1, 5] - lg[:, -1, 7], batched=True)
    torch.testing.assert_close(slow.values, fast.values, atol=1e-5, rtol=1e-5)


def test_patching_the_last_layer_resid_post_restores_the_clean_run(model):
    res = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_post")
    assert res.values[-1, -1] == pytest.approx(res.clean, abs=1e-4)
    # position 0 sees the same token in both runs (and nothing before it): patching it changes nothing
    torch.testing.assert_close(res.values[:, 0], torch.full((model.cfg.n_layers,), res.corrupted), atol=1e-4, rtol=0)


def test_bad_input(model):
    with pytest.raises(
        AnalysisError,
        match=r"clean tokens have shape \(1, 8\) and corrupted tokens \(1, 6\).*same batch size and length",
    ):
        patch_sweep(model, CLEAN, CORRUPT[:, :6], logit_diff)
    with pytest.raises(ConfigError, match="has no position axis"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="attn.hook_pattern")
    with pytest.raises(
        ConfigError,
        match=r"hook 'resid_middle' at layer 0 \(blocks.0.hook_resid_middle\) does not exist on this model. "
        r"Did you mean 'resid_mid'.*Valid short names: resid_pre, attn_in, attn_out, resid_mid",
    ):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_middle")
    with pytest.raises(ConfigError, match=r"hook 'attn.hookz' at layer 0 .*Did you mean 'attn.hook_z'"):
        patch_heads(model, CLEAN, CORRUPT, logit_diff, hook="attn.hookz")
    with pytest.raises(ConfigError, match=r"hook must be a hook name such as 'resid_post' or 'mlp_out'; got None"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=None)
    with pytest.raises(AnalysisError, match="must return one number"):
        patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[0, -1], batched=False)
    with pytest.raises(AnalysisError, match=r"batched metric must map logits"):
        patch_sweep(model, CLEAN, CORRUPT, lambda lg: lg[:, -1, :2], batched=True)


def test_short_hook_names_mean_the_same_in_patch_sweep(model):
    short = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="mlp", layers=[1])
    full = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="mlp_out", layers=[1])
    assert short.hook == "mlp_out"
    torch.testing.assert_close(short.values, full.values, atol=0, rtol=0)


def test_heatmap_is_saved(model, tmp_path):
    res = patch_sweep(model, CLEAN, CORRUPT, logit_diff)
    fig = res.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len(fig.axes[0].get_xticklabels()) == CLEAN.shape[1]
    small = res.plot(tmp_path / "small.png", figsize=(3, 2), dpi=50)
    assert tuple(small.get_size_inches()) == (3, 2)
    from PIL import Image

    assert Image.open(tmp_path / "small.png").size == (150, 100)
    import matplotlib.pyplot as plt

    outer, axes = plt.subplots(1, 2)
    assert res.plot(ax=axes[1]) is outer and axes[1].images  # drawn into the given subplot


def test_the_colour_scale_follows_the_values():
    """Values on one side of 0 (log-probabilities) get a sequential scale over their own range, so a
    grid of them is not all one colour; values that straddle 0 get a diverging scale centred at 0."""
    import matplotlib.pyplot as plt

    from reftlens.analysis.plots import heatmap

    logprobs = -torch.linspace(0.5, 6.0, 24).reshape(4, 6)
    fig = heatmap(logprobs, range(4), list("abcdef"))
    im = fig.axes[0].images[0]
    assert im.get_cmap().name == "viridis"
    assert im.get_clim() == pytest.approx((-6.0, -0.5))
    signed = torch.tensor([[-1.0, 3.0], [0.5, 2.0]])
    im2 = heatmap(signed, [0, 1], ["a", "b"]).axes[0].images[0]
    assert im2.get_cmap().name == "RdBu_r" and im2.get_clim() == pytest.approx((-3.0, 3.0))
    # the caller decides: a signed difference that happens to be all positive, or a sequential signed grid
    im3 = heatmap(signed.abs(), [0, 1], ["a", "b"], center=0).axes[0].images[0]
    assert im3.get_cmap().name == "RdBu_r" and im3.get_clim() == pytest.approx((-3.0, 3.0))
    im4 = heatmap(signed, [0, 1], ["a", "b"], center=None, cmap="magma").axes[0].images[0]
    assert im4.get_cmap().name == "magma" and im4.get_clim() == pytest.approx((-1.0, 3.0))
    plt.close("all")
    for bad, match in (
        ({"center": "middle"}, "center must be 'auto', None or a finite number; got 'middle'"),
        ({"center": float("nan")}, "center must be"),
        ({"figsize": (0, 2)}, r"figsize must be two positive numbers"),
        ({"dpi": 0}, "dpi must be a positive integer; got 0"),
        ({"cmap": 3}, "cmap must be a matplotlib colour map or its name"),
    ):
        with pytest.raises(ConfigError, match=match):
            heatmap(signed, [0, 1], ["a", "b"], **bad)


def test_the_default_png_is_a_readable_size(tmp_path):
    """SmolLM2's 30 layers × a 40-token chat prompt: the default PNG stays within 1400 × 900 pixels
    (it was 2760 × 1080), and a small grid is not blown up."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from reftlens.analysis.plots import heatmap

    heatmap(torch.randn(30, 40), range(30), [f"t{i}" for i in range(40)], path=tmp_path / "big.png")
    heatmap(torch.randn(4, 8), range(4), [f"t{i}" for i in range(8)], path=tmp_path / "small.png")
    plt.close("all")
    width, height = Image.open(tmp_path / "big.png").size
    assert width <= 1400 and height <= 900, (width, height)
    small = Image.open(tmp_path / "small.png").size
    assert small[0] <= width and small[1] <= height and small[0] >= 500, small


# ---- progress bars ---------------------------------------------------------------------------


def _analysis(model, which):
    from reftlens.analysis import causal_trace, patch_heads

    return {
        "patch_sweep": lambda **kw: patch_sweep(model, CLEAN, CORRUPT, logit_diff, batch_size=8, **kw),
        "patch_heads": lambda **kw: patch_heads(model, CLEAN, CORRUPT, logit_diff, batch_size=8, **kw),
        "causal_trace": lambda **kw: causal_trace(model, PROMPT, SUBJECT, samples=2, batch_size=8, **kw),
    }[which]


@pytest.mark.parametrize("which", ["patch_sweep", "patch_heads", "causal_trace"])
def test_long_analyses_show_a_progress_bar_unless_told_not_to(model, which, capfd):
    run = _analysis(model, which)
    capfd.readouterr()
    quiet = run(progress=False)
    assert capfd.readouterr() == ("", "")
    loud = run()
    err = capfd.readouterr().err
    n = quiet.values.numel() if which != "causal_trace" else model.cfg.n_layers * (len(quiet.tokens) - quiet.subject[0])
    assert which in err and f"{n}/{n}" in err, err
    torch.testing.assert_close(loud.values, quiet.values, atol=0, rtol=0)
    with pytest.raises(ConfigError, match=rf"{which}: progress must be True .* or False .*; got 'yes'\."):
        run(progress="yes")


@pytest.mark.parametrize("strategy", ["batch", "replay"])
def test_a_sweeps_progress_moves_chunk_by_chunk(model, strategy, monkeypatch):
    """The bar counts the variants and moves after every chunk, so a long sweep shows it going."""
    from reftlens.runtime import sweep as sweep_module

    events = []

    class Bar:
        def __init__(self, total, *, desc, enabled, unit):
            events.append(("open", total, desc, enabled))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(("close",))

        def update(self, k):
            events.append(("update", k))

    monkeypatch.setattr(sweep_module, "progress_bar", Bar)
    sweep = sweep_module.Sweep(model, CORRUPT, sources=CLEAN, strategy=strategy, batch_size=5)
    variants = [[restoration(layer, pos)] for layer in range(model.cfg.n_layers) for pos in (1, 3, 6)]
    sweep.run(variants, lambda indices, logits: events.append(("chunk", len(indices))), progress=True, desc="mine")
    chunks = [e[1] for e in events if e[0] == "chunk"]
    assert len(chunks) >= 3 and sum(chunks) == len(variants)
    steps = [e for k in chunks for e in (("chunk", k), ("update", k))]
    assert events == [("open", len(variants), "mine", True), *steps, ("close",)]
    with pytest.raises(ConfigError, match="Sweep.run: progress must be True"):
        sweep.run(variants, lambda indices, logits: None, progress=None)
    with pytest.raises(ConfigError, match="Sweep.run: desc .* must be a string; got 3"):
        sweep.run(variants, lambda indices, logits: None, desc=3)


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
    torch.testing.assert_close(
        trace.values[:, :start], torch.full((model.cfg.n_layers, start), trace.corrupted), atol=1e-6, rtol=0
    )
    assert trace.corrupted != pytest.approx(trace.clean, abs=1e-7)


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_trace_equals_the_pieces_run_as_ordinary_interventions(model, kind):
    res = causal_trace(model, PROMPT, SUBJECT, samples=3, seed=1, hook=kind, window=2)
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
    with pytest.raises(
        AnalysisError, match=r"causal_trace restores 'resid_post', 'mlp_out' or 'attn_out'.*hook='heads'"
    ):
        causal_trace(model, PROMPT, SUBJECT, hook="heads")
    with pytest.raises(AnalysisError, match=r"got hook='mlp_ot'. Did you mean 'mlp_out'\?"):
        causal_trace(model, PROMPT, SUBJECT, hook="mlp_ot")
    trace.plot(tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000


# ---- heads, and composition with trained ReFTs --------------------------------------------------

from reftlens import Interchange, Intervention, LoReFT  # noqa: E402
from reftlens.analysis import patch_heads  # noqa: E402


def test_head_patching_equals_transformer_lens(model):
    ours = patch_heads(model, CLEAN, CORRUPT, logit_diff, batch_size=5)
    _, cache = model.run_with_cache(CLEAN)
    ref = patching.get_act_patch_attn_head_out_all_pos(model, CORRUPT, cache, logit_diff)
    assert ours.values.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(ours.values, ref.float().cpu(), atol=1e-5, rtol=1e-5)


def edited(model, layer=1):
    torch.manual_seed(0)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W.bias.mul_(20)
    return ReftModel(model, Intervention(phi, layers=layer, positions="l1"))


def test_sweep_locates_a_trained_refts_edit(model):
    """Patch the ReFT run's states into a plain run of the same tokens: only the edited site
    (and what it feeds) carries the ReFT's effect."""
    reft = edited(model, layer=1)
    res = patch_sweep(model, CLEAN, CLEAN, logit_diff, hook="resid_post", clean_with=reft)
    with torch.no_grad():
        plain, with_reft = logit_diff(model(CLEAN)).item(), logit_diff(reft(CLEAN)).item()
    assert res.clean == pytest.approx(with_reft, abs=1e-5) and res.corrupted == pytest.approx(plain, abs=1e-5)
    assert abs(with_reft - plain) > 1e-3
    assert res.values[1, -1] == pytest.approx(with_reft, abs=1e-4)  # the edited site carries it all
    torch.testing.assert_close(res.values[0], torch.full((CLEAN.shape[1],), plain), atol=1e-5, rtol=0)  # below the edit
    torch.testing.assert_close(res.values[1, :-1], torch.full((CLEAN.shape[1] - 1,), plain), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strategy", ["batch", "replay"])
def test_a_non_finite_clean_activation_is_refused_not_patched_in(model, strategy):
    steer = Steer(torch.zeros(model.cfg.d_model))
    with (
        torch.no_grad()
    ):  # Steer refuses a NaN vector when built; a NaN reached later (a diverged run) is what this plants
        steer.vector[3] = float("nan")
    nan_at_2 = ReftModel(
        model, Intervention(steer, layers=0, positions=[2])
    )  # clean run: NaN from layer 0, position 2 on
    with pytest.raises(
        NonFiniteError,
        match=r"intervention 'patch' at blocks.1.hook_in: the source run's activation for "
        r"example 0 at position 2 holds NaN.*pass check_finite=False",
    ):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, layers=[0, 1], clean_with=nan_at_2, strategy=strategy)
    res = patch_sweep(
        model, CLEAN, CORRUPT, logit_diff, layers=[0, 1], clean_with=nan_at_2, strategy=strategy, check_finite=False
    )  # (layer 1, position 2) is the one NaN clean state among these cells
    assert res.values[1, 2].isnan() and res.values.isnan().sum() == 1


def test_sweep_with_a_reft_active_in_the_corrupted_run(model):
    reft = edited(model, layer=2)
    res = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_pre", corrupted_with=reft)
    ref_plain = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook="resid_pre")
    assert not torch.allclose(res.values, ref_plain.values)
    assert res.corrupted != pytest.approx(ref_plain.corrupted, abs=1e-4)
    # layer 3's resid_pre at the last position comes after the layer-2 edit there: the patch overrides it
    assert float(res.values[3, -1]) == pytest.approx(float(ref_plain.values[3, -1]), abs=1e-4)


def test_stacked_interventions_apply_in_the_declared_order(model):
    d = model.cfg.d_model
    torch.manual_seed(0)
    lo = LoReFT(d, 4, init="random")
    base, source = ["the quick brown fox"], ["a lazy dog sat"]
    with pytest.raises(Exception, match="stack="):
        ReftModel(
            model, [Intervention(lo, layers=1, positions="l1"), Intervention(Interchange(), layers=1, positions="l1")]
        )
    patch_on_top = ReftModel(
        model,
        [
            Intervention(lo, layers=1, positions="l1", stack=0),
            Intervention(Interchange(), layers=1, positions="l1", stack=1),
        ],
    )
    patch_below = ReftModel(
        model,
        [
            Intervention(lo, layers=1, positions="l1", stack=1),
            Intervention(Interchange(), layers=1, positions="l1", stack=0),
        ],
    )
    only_patch = ReftModel(model, Intervention(Interchange(), layers=1, positions="l1"))
    with torch.no_grad():
        top, below, patch = (
            patch_on_top(base, sources=source),
            patch_below(base, sources=source),
            only_patch(base, sources=source),
        )
        # LoReFT applied to the source's state, by hand
        toks, _ = only_patch.tokenize(source)
        _, cache = model.run_with_cache(toks, names_filter="blocks.1.hook_resid_post")
        expect_state = lo(cache["blocks.1.hook_resid_post"][0, -1])
        hand = ReftModel(model, Intervention(lambda h: expect_state.expand_as(h), layers=1, positions="l1"))(base)
    torch.testing.assert_close(top, patch, atol=1e-5, rtol=0)  # the patch overwrites the LoReFT's edit
    torch.testing.assert_close(below, hand, atol=1e-5, rtol=0)  # LoReFT edits the patched state
    assert (top - below).abs().max() > 1e-3


@pytest.mark.parametrize("strategy", ["batch", "replay"])
@pytest.mark.parametrize("hook", sorted(REFERENCE))
def test_both_sweep_strategies_equal_transformer_lens(model, strategy, hook):
    ours = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=hook, strategy=strategy, batch_size=7)
    _, cache = model.run_with_cache(CLEAN)
    ref = REFERENCE[hook](model, CORRUPT, cache, logit_diff)
    torch.testing.assert_close(ours.values, ref.float().cpu(), atol=1e-5, rtol=1e-5)
    assert (ours.values.abs() > 1e-4).any()


def test_replay_reads_only_the_logits_the_metric_needs(model):
    def spread(lg):  # reads every position: "auto" must notice and unembed them all
        return lg[:, :, 5].mean(-1) - lg[:, 2, 7]

    def two(lg):  # reads positions 2 and the last
        return lg[:, -1, 5] - lg[:, 2, 7]

    for metric, at in [(spread, "auto"), (two, [2, -1]), (two, "all"), (logit_diff_batched, -1)]:
        ref = patch_sweep(model, CLEAN, CORRUPT, metric, hook="resid_pre", strategy="batch", batched=True)
        ours = patch_sweep(
            model,
            CLEAN,
            CORRUPT,
            metric,
            hook="resid_pre",
            strategy="replay",
            batched=True,
            logits_at=at,
            layers=[3, 1],
            batch_size=1,
        )
        torch.testing.assert_close(ours.values, ref.values[[3, 1]], atol=1e-5, rtol=1e-5)
    with pytest.raises(AnalysisError, match=r"reads logits outside logits_at=\[-1\]"):
        patch_sweep(model, CLEAN, CORRUPT, two, strategy="replay", batched=True, logits_at=[-1])
    with pytest.raises(ConfigError, match="logits_at must be"):
        patch_sweep(model, CLEAN, CORRUPT, two, strategy="replay", batched=True, logits_at=[99])


def logit_diff_batched(lg):
    return lg[:, -1, 5] - lg[:, -1, 7]


def test_replay_refuses_a_model_it_cannot_reproduce(model, monkeypatch):
    """A hook on the whole model changes its forward in a way block replay cannot see: an explicit
    strategy='replay' is refused, and 'auto' falls back to whole forwards with the same numbers."""
    handle = model.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        with pytest.raises(
            AnalysisError, match=r"strategy='replay' is not available here \(replaying the blocks does not reproduce"
        ):
            patch_sweep(model, CLEAN, CORRUPT, logit_diff, strategy="replay")
        monkeypatch.setattr(patching_module, "REPLAY_MIN_PARAMS", 0)
        auto = patch_sweep(model, CLEAN, CORRUPT, logit_diff)
        ref = patch_sweep(model, CLEAN, CORRUPT, logit_diff, strategy="batch")
        torch.testing.assert_close(auto.values, ref.values, atol=0, rtol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("strategy", ["batch", "replay"])
def test_a_sweep_runs_its_source_once(model, strategy):
    """Variants at every layer read their clean states from one source run, not one run per hook."""
    from reftlens.runtime.sweep import Sweep

    sweep = Sweep(model, CORRUPT, sources=CLEAN, strategy=strategy)
    sweep.source_run()
    forwards = []
    handle = model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        variants = [
            [restoration(layer, 2, hook)] for hook in ("resid_post", "mlp_out") for layer in range(model.cfg.n_layers)
        ]
        sweep.run(variants, lambda indices, logits: None)
    finally:
        handle.remove()
    whole = 0 if strategy == "replay" else -(-len(variants) // sweep.batch_size)  # the batch strategy's own forwards
    assert len(forwards) == 1 + whole


@pytest.mark.parametrize("strategy", ["batch", "replay"])
def test_only_read_gives_the_read_positions_alone(model, strategy):
    from reftlens.runtime.sweep import Sweep

    sweep = Sweep(model, CORRUPT, sources=CLEAN, strategy=strategy, batch_size=5)
    variants = [[restoration(layer, pos)] for layer in range(model.cfg.n_layers) for pos in (1, 3, 6)]
    full, only = {}, {}
    sweep.run(variants, lambda indices, logits: full.update(zip(indices, logits)), read=[2, 7])
    sweep.run(variants, lambda indices, logits: only.update(zip(indices, logits)), read=[2, 7], only_read=True)
    assert sorted(only) == list(range(len(variants))) and only[0].shape == (2, model.cfg.d_vocab)
    for i in only:
        torch.testing.assert_close(only[i], full[i][[2, 7]], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="only_read=True needs read="):
        sweep.run(variants, lambda indices, logits: None, only_read=True)


def test_restoration_window_is_romes_at_both_edges():
    """ROME restores layers max(0, i − w/2) … min(L, i + w/2) − 1 around layer i."""
    assert _window(0, "mlp", 10, 30) == list(range(0, 5))
    assert _window(3, "attn", 10, 30) == list(range(0, 8))
    assert _window(15, "mlp", 10, 30) == list(range(10, 20))
    assert _window(29, "mlp", 10, 30) == list(range(24, 30))
    assert _window(27, "mlp", 10, 30) == list(range(22, 30))
    assert _window(5, "mlp", 3, 30) == [4, 5, 6]  # odd windows: ⌈w/2⌉ above
    assert _window(7, "resid", 10, 30) == [7]


@pytest.mark.parametrize("hook,edited", [("resid_pre", False), ("mlp_out", False), ("resid_pre", True)])
def test_attribution_equals_a_hand_written_gradient(model, hook, edited):
    """AtP: cell (l, p) = metric(corrupted) + (a_clean − a_corrupted)[l, p] · ∂metric/∂a[l, p]; the
    reference takes the gradient through zero perturbations added at each hook (TL hooks, no engine),
    after a ReFT's own edit at that hook when the runs carry one."""
    kw, steer = _steered(model, edited)
    ours = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=hook, method="attribution", **kw)
    names = [f"blocks.{l}.hook_{hook}" for l in range(model.cfg.n_layers)]
    _, cache = _cache(model, CLEAN, steer, names)
    deltas, acts = {}, {}

    def perturb(h, hook):
        acts[hook.name] = h.detach()
        deltas[hook.name] = torch.zeros_like(h, requires_grad=True)
        return h + deltas[hook.name]

    value = logit_diff(model.run_with_hooks(CORRUPT, fwd_hooks=steer + [(n, perturb) for n in names]))
    points = [model.hook_dict[n].name for n in names]
    grads = torch.autograd.grad(value, [deltas[p] for p in points])
    ref = torch.stack([((cache[p] - acts[p]) * g).sum(-1)[0] for p, g in zip(points, grads)]) + value.detach()
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-5, rtol=1e-5)
    assert ours.corrupted == pytest.approx(value.item(), abs=1e-5)
    exact = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=hook, **kw)
    assert (
        torch.corrcoef(torch.stack([ours.values.flatten(), exact.values.flatten()]))[0, 1] > 0.5
    )  # a real approximation


def test_attribution_needs_a_differentiable_metric(model):
    with pytest.raises(AnalysisError, match="does not depend on the logits"):
        patch_sweep(model, CLEAN, CORRUPT, lambda logits: float(logit_diff(logits)), method="attribution")
    with pytest.raises(AnalysisError, match="method must be 'exact', 'attribution' or 'attribution-ig'"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, method="gradient")
    with pytest.raises(ConfigError, match="ig_steps must be a positive integer"):
        patch_sweep(model, CLEAN, CORRUPT, logit_diff, method="attribution-ig", ig_steps=0)


def _steered(model, edited):
    """With ``edited``, a Steer at layers 0 and 1's resid_pre (every position) in both runs, as a
    ReftModel for reftlens and as the TL hooks that go first at those hook points for the reference."""
    if not edited:
        return {}, []
    from reftlens import Intervention, ReftModel

    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    reft = ReftModel(model, Intervention(Steer(v, alpha=0.5), layers=[0, 1], positions="all", hook="resid_pre"))
    return dict(clean_with=reft, corrupted_with=reft), [
        (f"blocks.{l}.hook_resid_pre", lambda h, hook: h + 0.5 * v) for l in (0, 1)
    ]


def _cache(model, tokens, steer, names):
    cache = {}

    def save(h, hook):
        cache[hook.name] = h.detach()

    logits = model.run_with_hooks(tokens, fwd_hooks=steer + [(n, save) for n in names])
    return logits, cache


@pytest.mark.parametrize("hook,edited", [("resid_pre", False), ("attn_out", False), ("resid_pre", True)])
def test_attribution_ig_equals_hand_written_integrated_gradients(model, hook, edited):
    """EAP-IG: cell (l, p) = metric(corrupted) + (a_clean − a_corrupted)[l, p] · ḡ[l, p], ḡ the mean
    gradient over k runs whose input embeddings sit at (j + ½)/k of the way from corrupted to clean;
    the reference interpolates with plain TL hooks and differentiates one run per point. With a
    ReFT that edits the swept hook (and the path's) in both runs, every read and the path's two
    ends are the activations as the ReFT leaves them."""
    k = 3
    kw, steer = _steered(model, edited)
    ours = patch_sweep(model, CLEAN, CORRUPT, logit_diff, hook=hook, method="attribution-ig", ig_steps=k, **kw)
    names = [f"blocks.{l}.hook_{hook}" for l in range(model.cfg.n_layers)] + ["blocks.0.hook_resid_pre"]
    points = [model.hook_dict[n].name for n in names[:-1]]
    embed_name = model.hook_dict["blocks.0.hook_resid_pre"].name
    _, clean_cache = _cache(model, CLEAN, steer, names)
    corrupt_value, corrupt_cache = _cache(model, CORRUPT, steer, names)
    grads = [torch.zeros_like(clean_cache[p]) for p in points]
    for j in range(k):
        alpha = (j + 0.5) / k
        deltas = {}

        def interpolate(h, hook, alpha=alpha):
            return h + alpha * (clean_cache[embed_name] - h)

        def perturb(h, hook):
            deltas[hook.name] = torch.zeros_like(h, requires_grad=True)
            return h + deltas[hook.name]

        hooks = steer + [("blocks.0.hook_resid_pre", interpolate)] + [(n, perturb) for n in names[:-1]]
        value = logit_diff(model.run_with_hooks(CORRUPT, fwd_hooks=hooks))
        for i, g in enumerate(torch.autograd.grad(value, [deltas[p] for p in points])):
            grads[i] += g / k
    base = logit_diff(corrupt_value).detach()
    ref = torch.stack([((clean_cache[p] - corrupt_cache[p]) * g).sum(-1)[0] for p, g in zip(points, grads)]) + base
    torch.testing.assert_close(ours.values, ref.float(), atol=1e-5, rtol=1e-4)
    assert ours.corrupted == pytest.approx(base.item(), abs=1e-5)
    if edited:  # the ReFT moved both runs: the reference above saw it too
        assert ours.corrupted != pytest.approx(
            patch_sweep(model, CLEAN, CORRUPT, logit_diff, method="attribution").corrupted
        )


def test_a_users_phi_sweeps_like_the_built_in_patching(model):
    """The engine takes any ⟨Φ, P, L⟩: a user-defined interchange Φ swept over layers × positions,
    replayed, equals the built-in patch_sweep."""
    from reftlens import Intervention
    from reftlens.runtime.sweep import Sweep

    class MyPatch(torch.nn.Module):
        takes_source = True

        def forward(self, base, source):
            return base + (source - base)

    phi, seq = MyPatch(), CLEAN.shape[1]
    with torch.no_grad():
        sweep = Sweep(model, CORRUPT, sources=CLEAN, strategy="replay")
        cells = [(l, p) for p in range(seq) for l in range(model.cfg.n_layers)]
        got = torch.empty(model.cfg.n_layers, seq)

        def consume(indices, logits):
            for i in indices:
                got[cells[i]] = logit_diff(logits[indices.index(i) : indices.index(i) + 1])

        sweep.run([[Intervention(phi, layers=l, positions=[p], hook="resid_pre")] for l, p in cells], consume)
    ref = patch_sweep(model, CLEAN, CORRUPT, logit_diff, strategy="batch")
    torch.testing.assert_close(got, ref.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sweep", ["patch_sweep", "patch_heads", "patch_sweep with clean_with"])
def test_the_clean_run_is_run_once(model, sweep):
    """The clean (source) run keeps every activation the variants read in its one forward, and with
    nothing active it is a row of the corrupted run's forward: with every cell in one batch, a sweep
    is two forwards, the two reference runs and then every cell."""
    rows = []
    handle = model.hook_dict["hook_embed"].add_hook(lambda h, hook: rows.append(h.shape[0]), dir="fwd")
    try:
        if sweep == "patch_heads":
            patch_heads(model, CLEAN, CORRUPT, logit_diff, strategy="batch", batch_size=512)
        else:
            kw, _ = _steered(model, sweep.endswith("clean_with"))
            patch_sweep(
                model, CLEAN, CORRUPT, logit_diff, strategy="batch", batch_size=512, clean_with=kw.get("clean_with")
            )
    finally:
        handle.hook.remove()
        model.hook_dict["hook_embed"].fwd_hooks.remove(handle)
    cells = model.cfg.n_layers * (model.cfg.n_heads if sweep == "patch_heads" else CLEAN.shape[1])
    assert rows == ([1, 1, cells] if sweep.endswith("clean_with") else [2, cells]), rows


def test_a_sweep_refuses_to_keep_a_hook_the_model_lacks(model):
    from reftlens.runtime.sweep import Sweep

    with pytest.raises(ConfigError, match=r"keep names hooks this model does not have: \['blocks.0.hook_nope'\]"):
        Sweep(model, CORRUPT, sources=CLEAN, keep=["blocks.0.hook_nope"])
