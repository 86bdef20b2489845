"""P: position specs resolve against real tokens; padding never changes a result."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reftlens import Collect, Intervention, LoReFT, PositionError, ReftModel, parse_positions
from reftlens.positions import FirstLast, RealTokens, after, from_json

SPECS = ["all", "f2+l2", "f1", "l3", "f3+l1", [0], [-1], [0, -2], slice(1, None), slice(0, 3), slice(None, None, 2)]


def real_from_lengths(lengths, side):
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = True
        else:
            mask[i, :n] = True
    return RealTokens.from_mask(mask)


def selected(spec, lengths, side):
    real = real_from_lengths(lengths, side)
    m = parse_positions(spec).site_mask(real)
    return [(m[i] & real.mask[i]).nonzero().squeeze(1).sub(int(real.starts[i])).tolist() for i in range(len(lengths))]


@pytest.mark.parametrize(
    "spec, length, expected",
    [
        ("all", 4, [0, 1, 2, 3]),
        ("f2+l2", 6, [0, 1, 4, 5]),
        ("f5+l5", 6, [0, 1, 2, 3, 4, 5]),  # one Φ: overlap on a short input merges
        ("f3", 2, [0, 1]),
        ("l1", 5, [4]),
        ([0, -1], 5, [0, 4]),
        (slice(1, -1), 5, [1, 2, 3]),
        (slice(None, None, 2), 5, [0, 2, 4]),
        (FirstLast(5, 0, clamp_half=True), 6, [0, 1, 2]),
        (FirstLast(0, 5, clamp_half=True), 6, [3, 4, 5]),
    ],
)
def test_spec_semantics(spec, length, expected):
    for side in ("left", "right"):
        assert selected(spec, [length, length + 3], side)[0] == expected


@pytest.mark.parametrize("spec", ["l0", "f0", "f0+l0", "f00", "f0l0", " f0 + l0 "])
def test_specs_that_select_nothing_are_refused(spec):
    # like an empty index list: refused at parse time, not silently a no-op on every input
    with pytest.raises(PositionError, match=r"selects no position.*counts are all zero.*e\.g\. 'l1'"):
        parse_positions(spec)
    with pytest.raises(PositionError, match="selects no position"):
        Intervention(LoReFT(8, 2), layers=0, positions=spec)
    with pytest.raises(PositionError, match="selects no position"):
        from_json({"first": 0, "last": 0})
    with pytest.raises(PositionError, match="empty list of positions selects nothing"):
        parse_positions([])


@pytest.mark.parametrize(
    "spec, expected", [("f0+l2", FirstLast(0, 2)), ("f3+l0", FirstLast(3, 0)), ("l1", FirstLast(0, 1))]
)
def test_a_zero_count_beside_a_nonzero_one_is_fine(spec, expected):
    assert parse_positions(spec) == expected


@pytest.mark.parametrize(
    "data, message",
    [
        ({"first": "2", "last": 0}, r"must be \{'first': N, 'last': M, 'clamp_half': bool\} with counts N, M >= 0"),
        ({"first": 2}, r"must be \{'first': N, 'last': M"),
        ({"first": -1, "last": 2}, r"counts N, M >= 0"),
        ({"indices": [0, "1"]}, r"must be \{'indices': \[...\]\}, a non-empty list of ints"),
        ({"slice": [0, 2]}, r"must be \{'slice': \[start, stop, step\]\}: ints or null, and a step > 0"),
        ({"slice": [0, 2, 0]}, r"a step > 0"),
        ("middle", r"cannot read saved positions 'middle'; expected 'all' or an object"),
    ],
)
def test_malformed_saved_positions_are_position_errors(data, message):
    with pytest.raises(PositionError, match=message):
        from_json(data)


def test_saved_positions_round_trip():
    for spec in ["all", "f2+l3", "l1", FirstLast(2, 2, clamp_half=True), [0, -1], slice(1, None), slice(0, 4, 2)]:
        p = parse_positions(spec)
        assert from_json(p.to_json()) == p


def test_per_example_and_predicate_specs():
    assert selected([[0, 2], [1]], [3, 4], "left") == [[0, 2], [1]]
    assert selected(torch.tensor([[0, -1], [1, 2]]), [3, 4], "right") == [[0, 2], [1, 2]]
    real = real_from_lengths([3, 2], "left")
    tokens = torch.tensor([[5, 7, 5], [0, 5, 9]])
    real = RealTokens(real.mask, real.lengths, real.starts, tokens)
    m = parse_positions(lambda t: t == 5).site_mask(real)
    assert m.tolist() == [[True, False, True], [False, True, False]]


@pytest.fixture(scope="module")
def padded_setup(tiny_models):
    out = {}
    for name, model in tiny_models.items():
        torch.manual_seed(0)
        words = "the quick brown fox jumps over a lazy dog and runs far away".split()
        out[name] = (model, words)
    return out


def run_three_ways(model, phi, spec, texts):
    """Outputs at real tokens for left padding, right padding and each example alone."""
    reft = ReftModel(model, Intervention(phi, layers=[0, 2], positions=spec))
    rows = [model.to_tokens(t)[0] for t in texts]
    results = {}
    for side in ("left", "right"):
        tokens, mask = reft.tokenize(texts, padding_side=side)
        with torch.no_grad():
            logits = reft(tokens, attention_mask=mask)
        results[side] = [logits[i][mask[i].bool()] for i in range(len(texts))]
    with torch.no_grad():
        results["none"] = [reft(r[None])[0] for r in rows]
    return results


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["tiny-gpt2", "tiny-llama"]),
    n_words=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    spec=st.sampled_from(SPECS),
    seed=st.integers(0, 10_000),
)
def test_left_right_and_no_padding_agree(padded_setup, name, n_words, spec, seed):
    model, words = padded_setup[name]
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(words[int(j)] for j in torch.randint(len(words), (n,), generator=g)) for n in n_words]
    torch.manual_seed(seed)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    res = run_three_ways(model, phi, spec, texts)
    for i in range(len(texts)):
        torch.testing.assert_close(res["left"][i], res["none"][i], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(res["right"][i], res["none"][i], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_positions_are_never_edited(model, side):
    torch.manual_seed(0)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    reft = ReftModel(model, Intervention(phi, layers=1, positions="all"))
    tokens, mask = reft.tokenize(["a", "the quick brown fox jumps"], padding_side=side)
    name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, before = model.run_with_cache(tokens, attention_mask=mask, names_filter=name)
        with reft.hooks(tokens, attention_mask=mask):
            _, after = model.run_with_cache(tokens, attention_mask=mask, names_filter=name)
    pads, real = ~mask.bool(), mask.bool()
    assert pads.any()
    torch.testing.assert_close(after[name][pads], before[name][pads], atol=0, rtol=0)
    assert (after[name][real] - before[name][real]).abs().max() > 1e-3


def test_rows_selected_match_the_real_token_count(model):
    collect = Collect()
    reft = ReftModel(model, Intervention(collect, layers=0, positions="f2+l2"))
    tokens, mask = reft.tokenize(["a b", "the quick brown fox jumps over"], padding_side="left")
    reft(tokens, attention_mask=mask)
    n = mask.sum(1)
    assert collect.activations[0].shape[0] == int(sum(min(int(k), 4) for k in n))


# ---- positions after a marker (e.g. the chat template's user header)

MARK = [7, 8]


def marked_batch(side):
    rows = [[1, 7, 8, 5, 7, 8, 20, 21, 22, 23], [1, 7, 8, 30, 31]]  # row 0 has the marker twice: the last counts
    width = max(map(len, rows))
    tokens = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        tokens[i, sl], mask[i, sl] = torch.tensor(r), True
    return RealTokens.from_mask(mask, tokens)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "spec, expected",
    [("all", [[6, 7, 8, 9], [3, 4]]), ("f1+l1", [[6, 9], [3, 4]]), ("f3", [[6, 7, 8], [3, 4]]), ([0], [[6], [3]])],
)
def test_positions_after_a_marker(side, spec, expected):
    real = marked_batch(side)
    m = after(MARK, spec).site_mask(real)
    got = [(m[i] & real.mask[i]).nonzero().squeeze(1).sub(int(real.starts[i])).tolist() for i in range(2)]
    assert got == expected


def test_after_errors_and_round_trip():
    real = marked_batch("left")
    with pytest.raises(PositionError, match=r"example 1 does not contain the marker tokens \[8, 5\]"):
        after([8, 5]).site_mask(real)
    ends_with_it = RealTokens.from_mask(torch.ones(1, 3, dtype=torch.bool), torch.tensor([[1, 7, 8]]))
    with pytest.raises(PositionError, match=r"example 0 has no real tokens after the marker"):
        after(MARK).site_mask(ends_with_it)
    with pytest.raises(PositionError, match=r"needs tokenizer= to turn the marker into tokens"):
        after("<|im_start|>user\n", "f5")
    with pytest.raises(PositionError, match=r"a marker string or a non-empty list of token ids"):
        after([])
    with pytest.raises(PositionError, match=r"takes 'all', 'fN\+lM', indices or a slice"):
        after(MARK, lambda t: t > 0)
    spec = after(MARK, "f5+l5")
    assert from_json(spec.to_json()) == spec and parse_positions(spec.to_json()) == spec
    assert [str(g) for g in spec.split(clamp=False)] == ["f5 after [7, 8]", "l5 after [7, 8]"]


def test_after_in_a_set_equals_explicit_indices_and_saves(model, tmp_path):
    tok = model.tokenizer
    marker = tok(" over", add_special_tokens=False)["input_ids"]
    prompts = ["the fox jumped over the lazy dog", "a cat sat over there"]
    phi = LoReFT(model.cfg.d_model, 2, init="random")
    ours = ReftModel(model, Intervention(phi, layers=1, positions=after(" over", "f2", tokenizer=tok)))
    tokens, mask = ours.tokenize(prompts)
    real = RealTokens.from_mask(mask, tokens)
    per_example = []
    for i in range(2):
        row = tokens[i, real.mask[i]].tolist()
        end = max(j + len(marker) for j in range(len(row)) if row[j : j + len(marker)] == marker)
        per_example.append([end, end + 1])
    theirs = ReftModel(model, Intervention(phi, layers=1, positions=per_example))
    with torch.no_grad():
        torch.testing.assert_close(ours(prompts), theirs(prompts), atol=0, rtol=0)
    ours.save(tmp_path / "s")
    loaded = ReftModel.load(tmp_path / "s", model)
    assert loaded.interventions[0].positions == ours.interventions[0].positions
    with torch.no_grad():
        torch.testing.assert_close(loaded(prompts), ours(prompts), atol=0, rtol=0)
