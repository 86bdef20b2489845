"""A bank of named intervention sets, a different one per example: every example computes what its
own set computes alone, in forward, generation, export and training."""

import pytest
import torch

from reftlens import (
    CollisionError,
    ConfigError,
    DiReFT,
    Intervention,
    LoReFT,
    NodiReFT,
    NoReFT,
    ReftModel,
    Steer,
    ZeroAblation,
    load_hf,
    save_hf,
    to_hf,
)
from reftlens.interventions.base import bank_key
from reftlens.runtime.kernel import site_hook

PROMPTS = [
    "the quick brown fox",
    "a b",
    "over the river and through the wood",
    "hello there",
    "x y z w",
    "one two three",
]
ADAPTERS = ["emoji", "sport", None, "formal", "emoji", "sport"]


def strong(phi):
    with torch.no_grad():  # a strong edit, so each set's generations differ from the base model's
        (phi.W.bias if hasattr(phi, "W") else phi.W1.bias).mul_(20)
    return phi


def make_sets(d, seed=0):
    torch.manual_seed(seed)
    return {
        "emoji": [Intervention(strong(LoReFT(d, 4, init="random")), layers=[1, 3], positions="f2+l2")],
        "sport": Intervention(strong(LoReFT(d, 4, init="random")), layers=[1, 2], positions="l3"),
        "formal": [
            Intervention(strong(DiReFT(d, 2, init="random")), layers=1, positions="l2"),
            Intervention(ZeroAblation(d), layers=2, positions=[0]),
        ],  # no bank key: one call per set
    }


@pytest.fixture
def sets(model):
    return make_sets(model.cfg.d_model)


@pytest.fixture
def bank(model, sets):
    return ReftModel(model, sets)


def solo_logits(model, sets, name, tokens, mask):
    with torch.no_grad():
        if name is None:
            return model(tokens, attention_mask=mask)
        return ReftModel(model, sets[name])(tokens, attention_mask=mask)


# ---- the batched Φ protocol -------------------------------------------------------------------


@pytest.mark.parametrize("cls", [LoReFT, NoReFT, DiReFT, NodiReFT])
def test_forward_many_is_each_rows_own_phi(cls):
    torch.manual_seed(0)
    phis = [cls(16, 3, init="random") for _ in range(3)]
    h, which = torch.randn(12, 16), torch.tensor([0, 1, 2, 2, 0, 1, 1, 1, 0, 2, 2, 0])
    expected = torch.stack([phis[w](h[i]) for i, w in enumerate(which.tolist())])
    torch.testing.assert_close(cls.forward_many(phis, h, which), expected, rtol=0, atol=1e-5)
    assert bank_key(phis[0]) == bank_key(phis[1]) != bank_key(cls(16, 2))  # one shape, one key


def test_steer_forward_many_is_exact():
    phis = [Steer(torch.randn(8), scale=s) for s in (1.0, -2.0)]
    h, which = torch.randn(5, 8), torch.tensor([1, 0, 0, 1, 1])
    assert torch.equal(
        Steer.forward_many(phis, h, which), torch.stack([phis[w](h[i]) for i, w in enumerate(which.tolist())])
    )


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_each_example_equals_its_single_set_run(model, sets, bank, side):
    tokens, mask = bank.tokenize(PROMPTS, padding_side=side)
    with torch.no_grad():
        mixed = bank(tokens, attention_mask=mask, adapters=ADAPTERS)
    for i, name in enumerate(ADAPTERS):
        real = mask[i].bool()
        alone = solo_logits(model, sets, name, tokens[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(mixed[i][real], alone[0][real], rtol=0, atol=1e-5)
    base = solo_logits(model, sets, None, tokens, mask)  # a None row is the base model, bit for bit
    assert torch.equal(mixed[2][mask[2].bool()], base[2][mask[2].bool()])


def test_rows_of_one_phi_shape_run_as_one_call(bank):
    plan = bank.plan(PROMPTS, adapters=ADAPTERS)
    at_layer1 = [p for p in plan.sites if p.site.layer == 1]
    # emoji and sport (LoReFT rank 4) merge into one group at layer 1; formal's DiReFT runs on its own
    groups = [p for p in at_layer1 if p.phis is not None]
    assert len(groups) == 1 and {m.unit.adapter for m in groups[0].members} == {"emoji", "sport"}
    assert len(at_layer1) == 2


def test_a_set_absent_from_the_batch_adds_no_hook(bank):
    plan = bank.plan(PROMPTS[:2], adapters=["sport", None])
    assert {m.unit.adapter for p in plan.sites for m in (p.members or [p.site])} == {"sport"}


def test_one_name_for_every_example(model, sets, bank):
    tokens, mask = bank.tokenize(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(
            bank(tokens, attention_mask=mask, adapters="sport"),
            solo_logits(model, sets, "sport", tokens, mask),
            rtol=0,
            atol=1e-5,
        )


def test_gradients_reach_only_the_sets_in_the_batch(bank):
    bank(PROMPTS, adapters=["emoji", None, "emoji", None, None, None]).sum().backward()
    grads = {name: [p.grad for iv in ivs for p in iv.phi.parameters()] for name, ivs in bank.bank.items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["emoji"])
    assert all(g is None for g in grads["sport"] + grads["formal"])


def test_disjointness_is_checked_within_each_set_per_example(model):
    d = model.cfg.d_model
    tied = {
        "a": [
            Intervention(LoReFT(d, 2), layers=1, positions="f3"),
            Intervention(LoReFT(d, 2), layers=1, positions="l3"),
        ],
        "b": Intervention(LoReFT(d, 2), layers=1, positions="all"),
    }  # b shares every site with a, never a row
    bank = ReftModel(model, tied)
    long, short = "over the river and through the wood", "x"
    bank([short, long, short], adapters=["b", "a", "b"])  # b's "all" on short inputs never meets a's rows
    with pytest.raises(
        CollisionError,
        match=r"'a/loreft\(rank=2\)' \(f3\) and 'a/loreft\(rank=2\)' \(l3\) both edit "
        r"blocks.1.* at example 1",
    ):
        bank([long, short], adapters=["b", "a"])  # f3 and l3 meet on the short input of set a


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_adapter_names_the_name_and_the_sets(bank):
    with pytest.raises(
        ConfigError,
        match=r"adapters\[1\] is 'sprot', which is not a set of this bank; the sets are "
        r"'emoji', 'sport', 'formal'.*add_adapter",
    ):
        bank(PROMPTS[:2], adapters=["emoji", "sprot"])


def test_adapter_list_must_match_the_batch(bank):
    with pytest.raises(ConfigError, match=r"adapters= names 2 sets but the batch has 3 examples"):
        bank(PROMPTS[:3], adapters=["emoji", "sport"])
    with pytest.raises(ConfigError, match=r"holds a bank of 3 sets .*pass adapters="):
        bank(PROMPTS[:3])


def test_adapters_on_a_plain_set_is_an_error(model, sets):
    with pytest.raises(ConfigError, match=r"this ReftModel holds one set"):
        ReftModel(model, sets["sport"])(PROMPTS[:1], adapters=["sport"])


def test_sets_for_different_models_are_refused(model, sets):
    d = model.cfg.d_model
    with pytest.raises(
        ConfigError,
        match=rf"sets target different models: set 'other' has Φs of width \[{d + 8}\], "
        rf"but sets \['emoji', 'sport', 'formal'\] and this model have d_model={d}",
    ):
        ReftModel(model, {**sets, "other": Intervention(LoReFT(d + 8, 2), layers=1)})


# ---- a live bank ----------------------------------------------------------------------------------


def test_add_and_remove_a_set_on_a_live_bank(model, sets, bank):
    tokens, mask = bank.tokenize(PROMPTS)
    torch.manual_seed(3)
    extra = [Intervention(strong(NodiReFT(model.cfg.d_model, 3, init="random")), layers=[0, 2], positions="l2")]
    bank.add_adapter("pirate", extra)
    assert bank.adapters == ["emoji", "sport", "formal", "pirate"] and any(p is extra[0].phi for p in bank.phis)
    with torch.no_grad():
        mixed = bank(tokens, attention_mask=mask, adapters=["pirate", "emoji", None, "pirate", "formal", "sport"])
    torch.testing.assert_close(
        mixed[0], ReftModel(model, extra)(tokens[:1], attention_mask=mask[:1])[0], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        mixed[1], solo_logits(model, sets, "emoji", tokens[1:2], mask[1:2])[0], rtol=0, atol=1e-5
    )
    assert bank.remove_adapter("pirate") == extra
    assert all(p is not extra[0].phi for p in bank.phis)
    with pytest.raises(ConfigError, match="not a set of this bank"):
        bank(tokens[:1], attention_mask=mask[:1], adapters=["pirate"])


# ---- save / load ------------------------------------------------------------------------------------


def test_save_and_load_a_bank_and_one_set(model, sets, bank, tmp_path):
    tokens, mask = bank.tokenize(PROMPTS)
    bank.save(tmp_path / "bank")
    loaded = ReftModel.load(tmp_path / "bank", model)
    assert loaded.adapters == bank.adapters
    with torch.no_grad():
        assert torch.equal(
            loaded(tokens, attention_mask=mask, adapters=ADAPTERS), bank(tokens, attention_mask=mask, adapters=ADAPTERS)
        )
    one = ReftModel.load(tmp_path / "bank", model, adapter="sport")  # one set out of a saved bank
    bank.save(tmp_path / "sport", adapter="sport")  # one set saved as a plain save
    for alone in (one, ReftModel.load(tmp_path / "sport", model)):
        assert alone.bank is None
        with torch.no_grad():
            assert torch.equal(alone(tokens, attention_mask=mask), solo_logits(model, sets, "sport", tokens, mask))
    loaded.remove_adapter("sport")
    loaded.load_adapter("sport", tmp_path / "sport")
    with torch.no_grad():
        assert torch.equal(
            loaded(tokens, attention_mask=mask, adapters=ADAPTERS), bank(tokens, attention_mask=mask, adapters=ADAPTERS)
        )


# ---- generation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["hf", "bridge"])
@pytest.mark.parametrize("intervene_on", ["prompt", "all"])
def test_mixed_batch_generation_equals_each_prompt_alone_with_its_set(model, sets, bank, backend, intervene_on):
    kw = dict(eos_token_id=None, backend=backend, intervene_on=intervene_on)
    mixed = bank.generate(PROMPTS, 8, adapters=ADAPTERS, **kw)
    plain = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2), layers=0))  # identity: the base model
    alone = [(ReftModel(model, sets[n]) if n else plain).generate([p], 8, **kw)[0] for p, n in zip(PROMPTS, ADAPTERS)]
    assert mixed == alone
    base = plain.generate(PROMPTS, 8, **kw)
    assert all((m == b) == (n is None) for m, b, n in zip(mixed, base, ADAPTERS))  # every set changes its rows


def test_cached_bank_generation_equals_no_cache_recomputation(bank):
    tokens, mask = bank.tokenize(PROMPTS)
    kw = dict(attention_mask=mask, eos_token_id=None, adapters=ADAPTERS, intervene_on="all")
    assert torch.equal(bank.generate(tokens, 8, **kw), bank.generate(tokens, 8, use_cache=False, **kw))


# ---- export --------------------------------------------------------------------------------------------


def test_exported_bank_takes_reft_adapters(model, bank, tmp_path):
    tok = model.tokenizer
    hf = to_hf(bank)
    tokens, mask = bank.tokenize(PROMPTS, padding_side="right")
    with torch.no_grad():
        ours = bank(tokens, attention_mask=mask, adapters=ADAPTERS)
        theirs = hf(input_ids=tokens, attention_mask=mask, reft_adapters=ADAPTERS).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-5)
    left, left_mask = bank.tokenize(PROMPTS)
    out = hf.generate(
        input_ids=left,
        attention_mask=left_mask,
        reft_adapters=ADAPTERS,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=bank.pad_token_id,
    )
    expected = bank.generate(left, 8, attention_mask=left_mask, adapters=ADAPTERS, eos_token_id=None)
    assert torch.equal(out, expected)
    with pytest.raises(ConfigError, match=r"holds a bank of 3 sets"):
        hf(input_ids=tokens, attention_mask=mask)
    save_hf(hf, tmp_path / "export", tokenizer=tok)
    again = load_hf(tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=tokens, attention_mask=mask, reft_adapters=ADAPTERS).logits, theirs, rtol=0, atol=1e-5
        )


def test_group_errors_name_every_set(model):
    class Broken(LoReFT):
        @classmethod
        def forward_many(cls, phis, h, which):
            return h[:, :-1]

    d = model.cfg.d_model
    bank = ReftModel(model, {"a": Intervention(Broken(d, 2), layers=1), "b": Intervention(Broken(d, 2), layers=1)})
    with pytest.raises(ConfigError, match=r"2 sets' .* at blocks.1.* \('a', 'b'\): Φ returned shape"):
        bank(PROMPTS[:2], adapters=["a", "b"])
    assert site_hook  # the kernel both backends call


# ---- training many sets in one run ---------------------------------------------------------------------

WORDS = ["red", "green", "blue", "quick", "lazy", "tall", "small", "old"]
TRAIN = {  # sets of different sizes: different epochs, schedules and numbers of steps
    "emoji": [{"prompt": f"the {w} fox", "completion": f" jumps over the {w} dog"} for w in WORDS[:6]],
    "sport": [{"prompt": f"a {w} ball", "completion": " is kicked"} for w in WORDS[:3]],
    "formal": [{"prompt": f"dear {w} sir", "completion": f" yours {w}ly"} for w in WORDS[3:8]],
}


def trainable_sets(d, seed=0):
    torch.manual_seed(seed)
    return {
        "emoji": [Intervention(LoReFT(d, 4, init="random"), layers=[1, 2], positions="f2+l2")],
        "sport": Intervention(DiReFT(d, 2, init="random"), layers=1, positions="l2"),
        "formal": [Intervention(NoReFT(d, 2, init="random"), layers=[0, 3], positions="f1+l1", untied="layers")],
    }


def test_joint_training_equals_separate_runs(model, tmp_path):
    import reftlens

    d = model.cfg.d_model
    kw = dict(
        epochs=2,
        batch_size=2,
        grad_accum=2,
        lr=2e-2,
        schedule="linear",
        warmup_steps=1,
        max_grad_norm=0.5,
        seed=3,
        progress=False,
    )
    bank = ReftModel(model, trainable_sets(d))
    data = [dict(r, adapter=name) for name, rows in TRAIN.items() for r in rows]
    history = reftlens.train(bank, data, eval_data=data, **kw)
    separate = trainable_sets(d)
    assert len(history.steps) == 4  # emoji and formal: 2 steps an epoch; sport: 1
    for name, rows in TRAIN.items():
        alone = ReftModel(model, separate[name])
        solo = reftlens.train(alone, rows, eval_data=rows, **kw)
        for a, b in zip(
            alone.parameters(), [p for ivs in [bank.bank[name]] for iv in ivs for p in iv.phi.parameters()]
        ):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        mine = history.adapter(name)
        assert [r["step"] for r in mine.steps] == [r["step"] for r in solo.steps]
        assert [r["lr"] for r in mine.steps] == [r["lr"] for r in solo.steps]
        assert [r["tokens"] for r in mine.steps] == [r["tokens"] for r in solo.steps]
        torch.testing.assert_close(mine.losses, solo.losses, rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.evals[-1]["loss"], solo.evals[-1]["loss"], rtol=0, atol=1e-5)


def assert_bank_trains_each_set_as_alone(model, sets, data, **kw):
    """Train ``sets(d)`` as one bank on ``data`` (each set's rows), and each set alone on its own rows:
    the same Φs, losses, learning rates and evaluations, set by set."""
    import reftlens

    d = model.cfg.d_model
    kw = dict(dict(epochs=2, batch_size=2, grad_accum=2, lr=2e-2, warmup_steps=1, max_grad_norm=0.5, seed=3), **kw)
    bank = ReftModel(model, sets(d))
    rows = [dict(r, adapter=name) for name, mine in data.items() for r in mine]
    history = reftlens.train(bank, rows, eval_data=rows, progress=False, **kw)
    separate = sets(d)
    for name, mine in data.items():
        alone = ReftModel(model, separate[name])
        solo = reftlens.train(alone, mine, eval_data=mine, progress=False, **kw)
        for a, b in zip(alone.parameters(), [p for iv in bank.bank[name] for p in iv.phi.parameters()]):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert any(not torch.equal(a, b) for a, b in zip(alone.parameters(), sets(d)[name].phi.parameters()))
        got = history.adapter(name)
        assert [(r["step"], r["epoch"], r["lr"], r["tokens"]) for r in got.steps] == [
            (r["step"], r["epoch"], r["lr"], r["tokens"]) for r in solo.steps
        ]
        torch.testing.assert_close(got.losses, solo.losses, rtol=0, atol=1e-5)
        # every evaluation its run alone makes, at the same steps (a set's stop where its run ends)
        assert [e["step"] for e in got.evals] == [e["step"] for e in solo.evals]
        torch.testing.assert_close(
            [[e["loss"], e["accuracy"]] for e in got.evals],
            [[e["loss"], e["accuracy"]] for e in solo.evals],
            rtol=0,
            atol=1e-5,
        )
    return history


def steering_sets(d, seed=0):
    """Two sets that take no source (the preference objective scales their edits)."""
    from reftlens import ReFTr1

    torch.manual_seed(seed)
    return {
        "emoji": Intervention(LoReFT(d, 2, init="random"), layers=[1, 2], positions="l2"),
        "sport": Intervention(ReFTr1(d, k=2, l1=0.05), layers=1, positions="all"),  # with an L1 penalty
    }


PREFER = {
    "emoji": [{"prompt": f"the {w} fox", "completion": " jumps :)", "rejected": f" sleeps {w}"} for w in WORDS[:5]],
    "sport": [{"prompt": f"a {w} ball", "completion": " is kicked", "rejected": " is red"} for w in WORDS[:3]],
}


def test_a_bank_trains_with_the_preference_objective_each_set_as_alone(model):
    history = assert_bank_trains_each_set_as_alone(model, steering_sets, PREFER, objective="preference")
    assert any("penalty" in r for r in history.adapter("sport").steps)  # ReFT-r1's L1, on its own set


def test_a_bank_trains_a_classification_task_each_set_as_alone(model):
    labels = ["no", "yes", "maybe"]
    data = {
        "emoji": [{"prompt": f"is the {w} fox fast?", "label": labels[i % 3]} for i, w in enumerate(WORDS[:6])],
        "sport": [{"prompt": f"a {w} ball?", "label": labels[i % 2]} for i, w in enumerate(WORDS[:3])],
    }
    history = assert_bank_trains_each_set_as_alone(
        model, steering_sets, data, task="classification", label_names=labels
    )
    assert {name for e in history.evals for name in e["sets"]} == {"emoji", "sport"}
    assert 0 <= history.adapter("sport").evals[-1]["accuracy"] <= 1


@pytest.mark.parametrize("intervene_on", ["all", "generated"])
def test_a_bank_trains_with_intervene_on_each_set_as_alone(model, intervene_on):
    data = {name: TRAIN[name] for name in ("emoji", "sport")}
    assert_bank_trains_each_set_as_alone(model, steering_sets, data, intervene_on=intervene_on)


def test_a_custom_objective_with_only_loss_trains_each_set_of_a_bank_as_alone(model):
    """An Objective that gives a set's summed loss (``loss``), not each example's: the step calls it
    once per set present in a micro-batch, so a bank still trains each set exactly as alone."""
    from reftlens.training import Objective, collate
    from reftlens.training.forward import forward, token_losses

    class SummedLM(Objective):
        name = "summed-lm"
        calls = []

        def count(self, example):
            return len(example.completion)

        def loss(self, module, examples, pad, device, intervene_on="prompt"):
            SummedLM.calls.append({e.adapter for e in examples})
            logits, labels = forward(module, collate(examples, pad).to(device), intervene_on)
            return token_losses(logits, labels)

    data = {name: TRAIN[name] for name in ("emoji", "sport")}
    assert_bank_trains_each_set_as_alone(model, steering_sets, data, objective=SummedLM())
    assert all(len(sets) == 1 for sets in SummedLM.calls)  # one set per call


def test_untied_units_of_a_set_train_together(model):
    import reftlens

    bank = ReftModel(model, trainable_sets(model.cfg.d_model))
    before = [p.detach().clone() for p in bank.parameters()]
    reftlens.train(
        bank, [dict(r, adapter="formal") for r in TRAIN["formal"]], max_steps=2, batch_size=4, progress=False
    )
    changed = [not torch.equal(a, b) for a, b in zip(before, bank.parameters())]
    formal = {id(p) for u in bank.units if u.adapter == "formal" for p in u.phi.parameters()}
    assert changed == [id(p) in formal for p in bank.parameters()]  # only the set with examples moved


def test_bank_checkpoints_resume_where_an_uninterrupted_run_ends(model, tmp_path):
    import reftlens

    d = model.cfg.d_model
    data = [dict(r, adapter=name) for name, rows in TRAIN.items() for r in rows]
    kw = dict(epochs=2, batch_size=2, lr=2e-2, seed=1, progress=False)
    whole = ReftModel(model, trainable_sets(d))
    full = reftlens.train(whole, data, **kw)

    class Crash(Exception):
        pass

    def crash_at_3(record):
        if record.get("step") == 3:
            raise Crash

    with pytest.raises(Crash):
        reftlens.train(
            ReftModel(model, trainable_sets(d)),
            data,
            checkpoint_dir=tmp_path / "ckpt",
            checkpoint_every=2,
            callback=crash_at_3,
            **kw,
        )
    resumed = ReftModel(model, trainable_sets(d, seed=9))  # other weights: all come from the checkpoint
    history = reftlens.train(resumed, data, checkpoint_dir=tmp_path / "ckpt", resume=True, **kw)
    assert history.steps == full.steps and history.adapter("sport").steps == full.adapter("sport").steps
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resuming_a_bank_checkpoint_with_other_sets_is_refused(model, tmp_path):
    import reftlens
    from reftlens import TrainingError

    d = model.cfg.d_model
    data = [dict(r, adapter=name) for name, rows in TRAIN.items() for r in rows]
    kw = dict(max_steps=2, batch_size=2, lr=2e-2, progress=False)
    ckpt = tmp_path / "ckpt"
    reftlens.train(ReftModel(model, trainable_sets(d)), data, checkpoint_dir=ckpt, checkpoint_every=2, **kw)
    moved = trainable_sets(d, seed=9)
    moved["sport"] = Intervention(DiReFT(d, 2, init="random"), layers=1, positions="l3")
    with pytest.raises(
        TrainingError, match=r"set 'sport': intervention .* has positions 'l2' in the checkpoint but 'l3'"
    ):
        reftlens.train(ReftModel(model, moved), data, checkpoint_dir=ckpt, resume=True, **kw)
    fewer = {k: v for k, v in trainable_sets(d).items() if k != "formal"}
    rows = [r for r in data if r["adapter"] != "formal"]
    with pytest.raises(
        TrainingError, match=r"holds the sets \['emoji', 'sport', 'formal'\] but this run trains the sets"
    ):
        reftlens.train(ReftModel(model, fewer), rows, checkpoint_dir=ckpt, resume=True, **kw)
    with pytest.raises(TrainingError, match=r"holds the sets .* but this run trains one set"):
        reftlens.train(
            ReftModel(model, trainable_sets(d)["sport"]), TRAIN["sport"], checkpoint_dir=ckpt, resume=True, **kw
        )


def test_bank_training_data_must_name_its_sets(model):
    import reftlens
    from reftlens import TrainingError

    bank = ReftModel(model, trainable_sets(model.cfg.d_model))
    with pytest.raises(TrainingError, match=r"data example 0 has adapter None, which is not a set of this bank"):
        reftlens.train(bank, TRAIN["sport"], max_steps=1, progress=False)
    with pytest.raises(TrainingError, match=r"data example 0 has adapter 'golf'"):
        reftlens.train(bank, [dict(TRAIN["sport"][0], adapter="golf")], max_steps=1, progress=False)
    plain = ReftModel(model, trainable_sets(model.cfg.d_model)["sport"])
    with pytest.raises(TrainingError, match=r"names the set 'sport' \('adapter'\), but this ReftModel holds one set"):
        reftlens.train(plain, [dict(TRAIN["sport"][0], adapter="sport")], max_steps=1, progress=False)


def test_the_gpu_benchmark_skips_cleanly_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run, not skip")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_bank.py"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gpu_bank: skipped (no CUDA device")


def test_pyreft_export_of_a_bank_is_refused(bank, tmp_path):
    from reftlens import ExportError, save_pyreft

    with pytest.raises(
        ExportError, match=r"pyreft holds one intervention set per model.*bank of 3 sets.*Export one set"
    ):
        save_pyreft(bank, tmp_path / "p")


def test_adding_a_set_reuses_the_generation_twin(model, bank):
    from reftlens.runtime.hf_backend import twin

    hf = twin(model, bank.units).hf
    bank.add_adapter("extra", Intervention(LoReFT(model.cfg.d_model, 2), layers=1, positions="l1"))
    again = twin(model, bank.units)
    assert again.hf is hf  # same weights-sharing model, only the interventions attached anew
    assert again.interventions.sets == ["emoji", "sport", "formal", "extra"]


# ---- settings travel with a set ----------------------------------------------------------------------

MIXED = ["sport", "emoji", None, "emoji", None, "sport"]


def mild(model):
    torch.manual_seed(1)
    phi = LoReFT(model.cfg.d_model, 4, init="random")
    with torch.no_grad():
        phi.W.bias.mul_(2)
    return Intervention(phi, layers=[1, 2], positions="l3")


def two_settings_bank(model, sets):
    """A bank of a set that edits the prompt and one that edits every token (as if trained so); the
    latter's edit is mild, so that editing the generated tokens too changes its rows' greedy tokens."""
    from reftlens import SetSettings

    sets["sport"] = mild(model)
    bank = ReftModel(model, {"emoji": sets["emoji"], "sport": sets["sport"]})
    bank.settings["sport"] = SetSettings(intervene_on="all")
    return bank


@pytest.mark.parametrize("backend", ["hf", "bridge"])
def test_a_bank_serves_a_prompt_set_and_an_all_set_each_as_alone(model, sets, backend):
    bank = two_settings_bank(model, sets)
    kw = dict(eos_token_id=None, backend=backend)
    mixed = bank.generate(PROMPTS, 8, adapters=MIXED, **kw)
    alone = {
        "emoji": ReftModel(model, sets["emoji"]).generate(PROMPTS, 8, intervene_on="prompt", **kw),
        "sport": ReftModel(model, sets["sport"]).generate(PROMPTS, 8, intervene_on="all", **kw),
        None: ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2), layers=0)).generate(PROMPTS, 8, **kw),
    }
    assert mixed == [alone[n][i] for i, n in enumerate(MIXED)]
    # the sport set's own setting is what made the difference: with "prompt" for all, its rows change
    everywhere_prompt = bank.generate(PROMPTS, 8, adapters=MIXED, intervene_on="prompt", **kw)
    assert [m != p for m, p in zip(mixed, everywhere_prompt)] == [n == "sport" for n in MIXED]


def test_the_exported_bank_keeps_each_sets_setting(model, sets, tmp_path):
    bank = two_settings_bank(model, sets)
    left, left_mask = bank.tokenize(PROMPTS)
    expected = bank.generate(left, 8, attention_mask=left_mask, adapters=MIXED, eos_token_id=None)
    kw = dict(input_ids=left, attention_mask=left_mask, reft_adapters=MIXED, max_new_tokens=8, do_sample=False)
    hf = to_hf(bank)
    assert torch.equal(hf.generate(**kw, pad_token_id=bank.pad_token_id), expected)
    save_hf(hf, tmp_path / "export", tokenizer=model.tokenizer)
    again = load_hf(tmp_path / "export")
    assert torch.equal(again.generate(**kw, pad_token_id=bank.pad_token_id), expected)
    assert torch.equal(to_hf(bank, intervene_on="prompt").generate(**kw, pad_token_id=bank.pad_token_id),
                       bank.generate(left, 8, attention_mask=left_mask, adapters=MIXED, eos_token_id=None,
                                     intervene_on="prompt"))  # fmt: skip


def test_a_saved_bank_restores_each_sets_settings(model, sets, tmp_path):
    bank = two_settings_bank(model, sets)
    bank.save(tmp_path / "bank")
    loaded = ReftModel.load(tmp_path / "bank", model)
    assert loaded.settings == bank.settings and loaded.settings["sport"].intervene_on == "all"
    one = ReftModel.load(tmp_path / "bank", model, adapter="sport")  # one set of a bank, as a plain set
    assert one.adapters == [] and one.settings["default"].intervene_on == "all"
    extra = ReftModel(model, {"emoji": sets["emoji"]})
    extra.load_adapter("sport", tmp_path / "bank")
    assert extra.settings["sport"].intervene_on == "all"


def test_training_records_its_settings_on_the_sets_it_trained(model):
    import reftlens

    bank = ReftModel(model, trainable_sets(model.cfg.d_model))
    rows = [dict(r, adapter="sport") for r in TRAIN["sport"]]
    reftlens.train(bank, rows, max_steps=1, prepend_bos=False, progress=False)
    assert bank.settings["sport"] == reftlens.SetSettings(intervene_on="prompt", chat_template=False, prepend_bos=False)
    assert bank.settings["emoji"].intervene_on is None  # not trained: nothing recorded
    plain = ReftModel(model, trainable_sets(model.cfg.d_model)["sport"])
    reftlens.train(plain, TRAIN["sport"], max_steps=1, intervene_on="generated", chat_template=False, progress=False)
    assert plain.settings["default"] == reftlens.SetSettings(
        intervene_on="generated", chat_template=False, prepend_bos=None
    )


def test_set_settings_are_checked():
    from reftlens import SetSettings

    with pytest.raises(ConfigError, match=r"intervene_on must be null or one of \('prompt', 'all', 'generated'\)"):
        SetSettings(intervene_on="every")
    with pytest.raises(ConfigError, match=r"chat_template must be null, true or false; got 'yes'"):
        SetSettings(chat_template="yes")


def test_each_row_gets_the_start_token_its_set_was_trained_with(model, sets):
    from reftlens import SetSettings

    sets["sport"] = mild(model)
    bank = ReftModel(model, {"emoji": sets["emoji"], "sport": sets["sport"]})
    bank.settings["sport"] = SetSettings(prepend_bos=False)
    names = ["sport", "emoji", None, "sport"]
    prompts = PROMPTS[:4]
    mixed = bank.generate(prompts, 6, adapters=names, eos_token_id=None)
    sport = ReftModel(model, sets["sport"]).generate(prompts, 6, prepend_bos=False, eos_token_id=None)
    emoji = ReftModel(model, sets["emoji"]).generate(prompts, 6, eos_token_id=None)
    assert [mixed[0], mixed[1], mixed[3]] == [sport[0], emoji[1], sport[3]]
    assert (
        bank.generate(prompts, 6, adapters=names, prepend_bos=True, eos_token_id=None)[0] != mixed[0]
    )  # explicit wins


def test_a_call_writes_nothing_onto_the_exported_model(model, bank):
    import threading

    hf = to_hf(bank)
    module = hf.reft_interventions
    before = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    tokens, mask = bank.tokenize(PROMPTS)
    kw = dict(input_ids=tokens, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=bank.pad_token_id)
    hf.generate(**kw, reft_adapters=ADAPTERS)
    assert {k: v for k, v in vars(module).items() if not k.startswith("_")}.keys() == before.keys()
    assert all(vars(module)[k] is v for k, v in before.items())
    # two threads, two choices of sets at once: each gets what it asked for
    expected = {n: hf.generate(**kw, reft_adapters=[n] * len(PROMPTS)) for n in ("emoji", "sport")}
    got = {}
    threads = [
        threading.Thread(target=lambda n=n: got.setdefault(n, hf.generate(**kw, reft_adapters=[n] * len(PROMPTS))))
        for n in ("emoji", "sport")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert not torch.equal(expected["emoji"], expected["sport"])


CHAT = (
    "{{ bos_token }}{% for m in messages %}[user] {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %} [bot]{% endif %}"
)


def test_a_set_trained_on_chat_prompts_wraps_plain_prompts_in_generate(tiny_models, monkeypatch, tmp_path):
    """chat_template=True travels with the set: after save and load, generate wraps a plain prompt
    in the chat template as training did, never an already wrapped one, and chat_template=False
    (or a set trained without it) leaves the prompt as it is."""
    import reftlens
    from reftlens.generation import _encode_per_set
    from reftlens.inputs import chat_prompt, text_tokens
    from reftlens.runtime.bank import Call

    model = tiny_models["tiny-llama"]
    monkeypatch.setattr(model.tokenizer, "chat_template", CHAT, raising=False)
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2), layers=1, positions="l2"))
    data = [{"prompt": "the fox", "completion": " runs"}] * 2
    reftlens.train(reft, data, max_steps=1, batch_size=2, chat_template=True, progress=False)
    reft.save(tmp_path / "r")
    loaded = ReftModel.load(tmp_path / "r", model)
    assert loaded.settings["default"].chat_template is True

    question = "a cat sat"
    wrapped = chat_prompt(model.tokenizer, question)
    assert wrapped != question

    def encoded(prompts, chat_template=None):
        tokens, real = _encode_per_set(loaded, prompts, Call("default"), loaded.pad_token_id, None, chat_template)
        return [row[m].tolist() for row, m in zip(tokens, real.mask)]

    want = text_tokens(model, wrapped).tolist()
    assert encoded([question]) == [want]  # the recorded setting wraps it
    assert encoded([wrapped]) == [want]  # an already wrapped prompt is not wrapped twice
    assert encoded([question], chat_template=False) == [text_tokens(model, question).tolist()]
    assert loaded.generate([question], 4) == loaded.generate([wrapped], 4)
    with pytest.raises(ConfigError, match="chat_template must be None"):
        loaded.generate([question], 4, chat_template="yes")


def test_a_banks_scaled_view_keeps_its_sets(model):
    """reft.scaled(α) of a bank is a bank of the same sets: at α = 1 each row runs only its own set
    (equal to the bank), at α = 0 every row is the base model."""
    torch.manual_seed(0)
    d = model.cfg.d_model
    bank = ReftModel(
        model,
        {
            "a": Intervention(LoReFT(d, 2, init="random"), layers=0, positions="l1"),
            "b": Intervention(LoReFT(d, 2, init="random"), layers=0, positions="l1"),
        },
    )
    tokens = torch.randint(5, 100, (2, 6))
    rows = ["a", "b"]
    with torch.no_grad():
        view = bank.scaled(1.0)
        assert view.adapters == ["a", "b"]
        torch.testing.assert_close(view(tokens, adapters=rows), bank(tokens, adapters=rows), atol=1e-5, rtol=0)
        torch.testing.assert_close(bank.scaled(0.0)(tokens, adapters=rows), model(tokens), atol=1e-5, rtol=0)
