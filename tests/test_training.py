"""Training: only Φ learns, the loss is on completion tokens, and runs are reproducible."""

import math
import warnings

import pytest
import torch

import reftlens
from reftlens import Intervention, LoReFT, ReftModel, Steer
from reftlens.training import EmulatedBF16Warning, TrainingError, collate, encode, precision
from reftlens.training.forward import token_losses

WORDS = ["quick", "lazy", "brown", "red", "old", "new", "big", "small", "dark", "cold", "warm", "slow"]
DATA = [{"prompt": f"the {w} fox", "completion": f" jumps over the {w} dog"} for w in WORDS]


def fresh(model, seed=0, rank=8, layers=(1, 2), positions="f2+l2"):
    torch.manual_seed(seed)
    return ReftModel(model, Intervention(LoReFT(model.cfg.d_model, rank), layers=list(layers), positions=positions))


def weights(reft):
    return [p.detach().clone() for p in reft.parameters()]


def test_training_lowers_the_loss_and_only_phi_changes(model):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    reft = fresh(model)
    history = reftlens.train(reft, DATA, max_steps=40, batch_size=4, lr=3e-2, progress=False)
    assert history.losses[-1] < history.losses[0] - 0.05
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert not reft.training and len(history.steps) == 40


def test_identity_init_starts_from_the_base_models_loss(model):
    reft = fresh(model)
    examples = encode(model, DATA[:4])
    batch = collate(examples, reft.pad_token_id)
    with torch.no_grad():
        plain = (
            token_losses(model(batch.tokens, attention_mask=batch.attention_mask), batch.labels) / batch.n_target_tokens
        )
    history = reftlens.train(reft, DATA[:4], max_steps=1, batch_size=4, lr=0.0, progress=False, group_by_length=False)
    assert history.losses[0] == pytest.approx(plain.item(), abs=1e-5)


def test_loss_is_on_completion_tokens_only(model):
    examples = encode(model, DATA[:2])
    batch = collate(examples, 0)
    for i, e in enumerate(examples):
        targets = batch.labels[i][batch.labels[i] != -100].tolist()
        assert targets == list(e.completion)
        assert targets[-1] == model.tokenizer.eos_token_id
        assert batch.prompt_mask[i].sum() == len(e.prompt)


def test_logits_are_computed_only_where_the_loss_reads_them(model):
    """forward() unembeds only positions with a target in some row: same logits there, same
    loss and same gradient as unembedding every position."""
    from reftlens.training.forward import forward

    reft = fresh(model, positions="l1")
    torch.nn.init.normal_(reft.interventions[0].phi.W.weight, std=0.1)
    examples = encode(model, [{"prompt": d["prompt"] + " and the", "completion": " end"} for d in DATA[:3]] + [DATA[4]])
    batch = collate(examples, reft.pad_token_id)
    logits, labels = forward(reft, batch)
    keep = (batch.labels != -100).any(0)
    assert logits.shape[1] == int(keep.sum()) < batch.tokens.shape[1]
    loss = token_losses(logits, labels)
    loss.backward()
    grad = [p.grad.clone() for p in reft.parameters() if p.requires_grad]
    reft.zero_grad()
    full = reft(batch.tokens, attention_mask=batch.attention_mask, prompt_mask=batch.prompt_mask)
    torch.testing.assert_close(logits, full[:, keep], atol=1e-6, rtol=1e-6)
    ref = token_losses(full, batch.labels)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, p in zip(grad, [p for p in reft.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_positions_follow_the_prompt_not_the_completion(model):
    """'l1' during training is the last prompt token, whatever the completion."""
    from reftlens import Collect

    collect = Collect()
    reft = ReftModel(model, Intervention(collect, layers=1, positions="l1"))
    ex = encode(model, DATA[:2])
    batch = collate(ex, reft.pad_token_id)
    reft(batch.tokens, attention_mask=batch.attention_mask, prompt_mask=batch.prompt_mask)
    _, cache = model.run_with_cache(
        batch.tokens, attention_mask=batch.attention_mask, names_filter="blocks.1.hook_resid_post"
    )
    last_prompt = [len(e.prompt) - 1 for e in ex]
    expected = torch.stack([cache["blocks.1.hook_resid_post"][i, p] for i, p in enumerate(last_prompt)])
    torch.testing.assert_close(collect.activations[0], expected, atol=1e-5, rtol=0)


def test_same_seed_same_run(model):
    a, b = fresh(model), fresh(model)
    ha = reftlens.train(a, DATA, max_steps=6, batch_size=4, seed=3, progress=False)
    hb = reftlens.train(b, DATA, max_steps=6, batch_size=4, seed=3, progress=False)
    assert ha.losses == hb.losses
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def test_gradient_accumulation_equals_one_big_batch(model):
    a, b = fresh(model), fresh(model)
    kw = dict(max_steps=3, lr=1e-2, progress=False, group_by_length=False, seed=1)
    ha = reftlens.train(a, DATA, batch_size=8, grad_accum=1, **kw)
    hb = reftlens.train(b, DATA, batch_size=4, grad_accum=2, **kw)
    assert ha.losses == pytest.approx(hb.losses, abs=1e-5)
    for x, y in zip(weights(a), weights(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_one_big_batch_grouped_by_length_and_with_a_penalty(model):
    """``grad_accum`` changes nothing also where batches are grouped by length (the default) and
    where a Φ adds a penalty (ReFT-r1's L1) over micro-batches of unequal size (the last step's
    6 examples: 4 + 2), each weighted by its share of the step's examples."""
    from reftlens import ReFTr1

    rows = [{"prompt": "the " + " ".join(WORDS[: 1 + i % 6]) + " fox", "completion": " jumps"} for i in range(14)]

    def run(**kw):
        torch.manual_seed(0)
        reft = ReftModel(model, Intervention(ReFTr1(model.cfg.d_model, k=1, l1=1.0), layers=1, positions="f2+l2"))
        return reftlens.train(reft, rows, epochs=1, lr=2e-2, seed=1, progress=False, **kw), weights(reft)

    (ha, wa), (hb, wb) = run(batch_size=8), run(batch_size=4, grad_accum=2)
    assert [s["penalty"] for s in ha.steps] == pytest.approx([s["penalty"] for s in hb.steps], abs=1e-6)
    assert ha.losses == pytest.approx(hb.losses, abs=1e-5)
    for x, y in zip(wa, wb):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    a, b = fresh(model), fresh(model)
    kw = dict(max_steps=3, lr=1e-2, progress=False, group_by_length=True, seed=1)
    ha, hb = reftlens.train(a, DATA, batch_size=8, **kw), reftlens.train(b, DATA, batch_size=4, grad_accum=2, **kw)
    assert [s["tokens"] for s in ha.steps] == [s["tokens"] for s in hb.steps]  # the same examples in each step
    assert ha.losses == pytest.approx(hb.losses, abs=1e-5)
    for x, y in zip(weights(a), weights(b)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_resuming_with_other_options_or_other_sets_is_refused(model, tmp_path):
    """A resume keeps every option that shapes the run (it would otherwise be partly honoured: the
    optimizer's lr comes back from the checkpoint); how long it runs may change. A bank's
    checkpoint resumes only on data for the sets it trained."""
    kw = dict(batch_size=4, lr=1e-2, progress=False, checkpoint_dir=tmp_path / "ck")
    reftlens.train(fresh(model), DATA, max_steps=2, checkpoint_every=1, **kw)
    for option, value, said in (("lr", 0.0, "lr: 0.01 there, 0.0 now"), ("batch_size", 2, "batch_size: 4 there")):
        with pytest.raises(TrainingError, match=f"other options \\({said}"):
            reftlens.train(fresh(model), DATA, max_steps=4, resume=True, **{**kw, option: value})
    history = reftlens.train(fresh(model), DATA, max_steps=4, resume=True, eval_every=1, eval_data=DATA[:2], **kw)
    assert [s["step"] for s in history.steps] == [1, 2, 3, 4]  # max_steps and eval_every may change

    def bank():
        torch.manual_seed(0)
        d = model.cfg.d_model
        return ReftModel(model, {n: Intervention(LoReFT(d, 4), layers=1, positions="l2") for n in ("a", "b")})

    kw["checkpoint_dir"] = tmp_path / "bank"
    reftlens.train(bank(), [{**r, "adapter": "a"} for r in DATA], max_steps=2, checkpoint_every=1, **kw)
    with pytest.raises(TrainingError, match=r"trained the sets \['a'\], but this run trains \['b'\]"):
        reftlens.train(bank(), [{**r, "adapter": "b"} for r in DATA], max_steps=4, resume=True, **kw)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(model, tmp_path):
    kw = dict(max_steps=6, batch_size=4, lr=1e-2, progress=False, seed=2, schedule="cosine", warmup_steps=2)
    straight = fresh(model, rank=4)
    reftlens.train(straight, DATA, **kw)

    class Crash(Exception):
        pass

    def crash_at_4(record):
        if record.get("step") == 4:
            raise Crash

    interrupted = fresh(model, rank=4)
    with pytest.raises(Crash):
        reftlens.train(
            interrupted, DATA, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=3, callback=crash_at_4, **kw
        )
    resumed = fresh(model, seed=99, rank=4)  # different init: everything must come from the checkpoint
    history = reftlens.train(resumed, DATA, checkpoint_dir=tmp_path / "ckpt", resume=True, **kw)
    assert [s["step"] for s in history.steps] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(weights(straight), weights(resumed)):
        assert torch.equal(x, y)


def test_checkpoints_replace_only_an_earlier_checkpoint(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    kw = dict(max_steps=2, batch_size=4, progress=False, checkpoint_every=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n")
    fresh(model).save(tmp_path / "reft")  # a ReftModel.save folder is not a checkpoint
    steps = []
    for target, words in [
        (notes, "it is a file"),
        (work, r"it has no trainer_state.json"),
        (tmp_path / "reft", r"it has no trainer_state.json"),
    ]:
        before = target.read_bytes() if target.is_file() else {p.name: p.read_bytes() for p in target.iterdir()}
        with pytest.raises(reftlens.SaveError, match=words):  # refused before the first step, not after it
            reftlens.train(fresh(model), DATA, checkpoint_dir=target, callback=steps.append, **kw)
        assert steps == []
        assert before == (
            target.read_bytes() if target.is_file() else {p.name: p.read_bytes() for p in target.iterdir()}
        )
    ckpt = tmp_path / "ckpt"
    reftlens.train(fresh(model), DATA, checkpoint_dir=ckpt, **kw)
    first = (ckpt / "trainer_state.json").read_text()
    reftlens.train(fresh(model), DATA, checkpoint_dir=ckpt, seed=5, **kw)  # its own earlier checkpoint: replaced
    assert (ckpt / "trainer_state.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes.txt", "reft", "work"]


def test_a_nan_loss_names_the_step_and_the_intervention(model):
    d = model.cfg.d_model
    bad = Steer(torch.zeros(d))
    reft = ReftModel(
        model,
        [
            Intervention(LoReFT(d, 2), layers=1, positions="l1", name="good"),
            Intervention(bad, layers=2, positions="l1", name="exploding"),
        ],
    )

    def poison(record):
        if record["step"] == 2:
            with torch.no_grad():
                bad.vector.fill_(float("nan"))

    with pytest.raises(
        TrainingError, match=r"loss is nan at step 3 \(epoch 0\): intervention 'exploding' has non-finite parameters"
    ):
        reftlens.train(reft, DATA, max_steps=5, batch_size=4, progress=False, callback=poison)


def test_classification_reports_label_accuracy(model):
    data = [{"prompt": f"the {w} fox is", "label": "good" if i % 2 else "bad"} for i, w in enumerate(WORDS)]
    reft = fresh(model, positions="l1")
    history = reftlens.train(
        reft, data, eval_data=data, task="classification", max_steps=30, batch_size=6, lr=3e-2, progress=False
    )
    ev = history.evals[-1]
    assert set(ev) == {"step", "loss", "accuracy"} and 0.0 <= ev["accuracy"] <= 1.0
    assert ev["accuracy"] > 0.5  # 12 examples, 2 classes: the edit learns the prompt → label map


def test_classification_accuracy_scores_with_the_edit_where_it_trains(model):
    """Accuracy ranks the labels with the set applied as it trains (``intervene_on``): edited on
    a one-token label's own position only ("generated"), the edit cannot move the label's score,
    so the accuracy is the base model's; edited on the prompt, it is the set's."""
    from reftlens.training import evaluate
    from reftlens.training.evaluate import _label_scores, _label_tokens

    data = [{"prompt": f"the {w} fox is", "label": "a" if i % 2 else "b"} for i, w in enumerate(WORDS)]
    reft = fresh(model, positions="all")
    torch.nn.init.normal_(reft.interventions[0].phi.W.weight, std=2.0)
    names = ["a", "b"]  # one token each
    examples = encode(model, data, label_names=names)
    base = ReftModel(model, Intervention(Steer(model.cfg.d_model), layers=1))  # v = 0: the base model
    cands, pad = _label_tokens(reft, names)[None], reft.pad_token_id
    assert [len(c) for c in cands] == [1, 1]
    with torch.no_grad():
        unedited = _label_scores(base, examples, cands, pad, "prompt")
        torch.testing.assert_close(_label_scores(reft, examples, cands, pad, "generated"), unedited, atol=1e-5, rtol=0)
        assert (
            _label_scores(reft, examples, cands, pad, "prompt") - unedited
        ).abs().max() > 1e-2  # the edit moves them
    accuracy = evaluate(reft, examples, task="classification", label_names=names, intervene_on="generated")["accuracy"]
    assert accuracy == evaluate(base, examples, task="classification", label_names=names)["accuracy"]


def test_a_banks_classification_sets_each_pick_among_their_own_labels(model):
    """Sets of a bank with different labels: each set's accuracy equals its run alone (its rows
    are ranked among its own labels, not every set's), at each of the evaluations its run alone
    makes (the smaller set's run ends first: 2 steps against 3)."""
    data = {
        "yes": [{"prompt": f"is the {w} fox fast?", "label": ["yes", "no"][i % 2]} for i, w in enumerate(WORDS[:6])],
        "colour": [{"prompt": f"a {w} ball?", "label": ["red", "blue", "green"][i % 3]} for i, w in enumerate(WORDS)],
    }
    kw = dict(epochs=1, lr=2e-2, batch_size=4, task="classification", progress=False, eval_every=1)

    def sets():
        torch.manual_seed(0)
        d = model.cfg.d_model
        return {n: Intervention(LoReFT(d, 4), layers=[1], positions="l1") for n in data}

    rows = [{**r, "adapter": n} for n, rs in data.items() for r in rs]
    bank = reftlens.train(ReftModel(model, sets()), rows, eval_data=rows, **kw)
    for name, mine in data.items():
        alone = reftlens.train(ReftModel(model, sets()[name]), mine, eval_data=mine, **kw)
        mine = bank.adapter(name).evals
        assert [e["step"] for e in mine] == [e["step"] for e in alone.evals] == list(range(1, len(mine) + 1))
        assert [e["accuracy"] for e in mine] == [e["accuracy"] for e in alone.evals]
        assert [e["loss"] for e in mine] == pytest.approx([e["loss"] for e in alone.evals], abs=1e-5)
    with pytest.raises(TrainingError, match="label_names names sets \\['other'\\]"):
        reftlens.train(ReftModel(model, sets()), rows, label_names={"other": ["x"]}, **kw)
    with pytest.raises(TrainingError, match="this ReftModel holds one set; give one list"):
        reftlens.train(fresh(model), data["yes"], label_names={"yes": ["yes", "no"]}, **kw)


def test_one_token_labels_are_scored_in_one_forward(model):
    """Classification eval: with one-token labels, one forward scores every label, equal to
    scoring each label in a forward of its own."""
    from reftlens.training.evaluate import _score, _score_first_tokens

    reft = fresh(model, positions="l1")
    torch.nn.init.normal_(reft.interventions[0].phi.W.weight, std=0.1)
    chunk = encode(model, [{"prompt": d["prompt"] + " x" * i, "completion": " y"} for i, d in enumerate(DATA[:5])])
    cands, pad = [(5,), (7,), (11,)], reft.pad_token_id
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            one = _score_first_tokens(reft, chunk, cands, pad, "prompt")
            assert len(calls) == 1
            each = torch.stack([_score(reft, chunk, c, pad, "prompt") for c in cands], 1)
    finally:
        handle.remove()
    assert one.shape == (5, 3)
    torch.testing.assert_close(one, each, atol=1e-5, rtol=1e-5)


def test_options_and_errors(model):
    reft = fresh(model)
    with pytest.raises(TrainingError, match="schedule must be"):
        reftlens.train(reft, DATA, max_steps=1, schedule="step", progress=False)
    with pytest.raises(TrainingError) as err:
        reftlens.train(reft, DATA, max_steps=1, precision="fp8", progress=False)
    assert str(err.value) == "precision must be 'fp32', 'bf16' or 'bf16-force'; got 'fp8'."
    with pytest.raises(KeyError, match="each needs 'prompt' and 'completion'"):
        reftlens.train(reft, [{"text": "x"}], max_steps=1, progress=False)
    with pytest.raises(ValueError, match="no chat template"):
        reftlens.train(reft, DATA, max_steps=1, chat_template=True, progress=False)
    records = []
    h = reftlens.train(
        reft,
        DATA,
        max_steps=2,
        precision="bf16",
        max_grad_norm=1.0,
        weight_decay=0.01,
        eval_data=DATA[:4],
        eval_every=1,
        callback=records.append,
        progress=False,
    )
    assert all(math.isfinite(x) for x in h.losses) and len(h.evals) == 2
    assert [r.get("eval", False) for r in records] == [False, True, False, True]


def test_a_datasets_dataset_works(model):
    datasets = pytest.importorskip("datasets")
    reft = fresh(model)
    h = reftlens.train(reft, datasets.Dataset.from_list(DATA), max_steps=2, progress=False)
    assert len(h.losses) == 2


def test_bf16_autocast_keeps_left_padded_rows_finite(model):
    """TL 4.3 overflows the fp32 mask sentinel to -inf under bf16 autocast, so a left pad's fully
    masked attention row would softmax to NaN and reach real tokens; reft(...) guards it."""
    torch.manual_seed(0)
    reft = ReftModel(model, Intervention(LoReFT(model.cfg.d_model, 2, init="random"), layers=[1], positions="l1"))
    tokens, mask = reft.tokenize(["the quick brown fox jumps over", "a dog"])  # left padded
    assert not mask.bool().all()
    real = mask.bool()
    with torch.no_grad():
        ref = reft(tokens, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = reft(tokens, attention_mask=mask)
    assert torch.isfinite(low[real]).all()
    torch.testing.assert_close(low[real].float(), ref[real], atol=0.1 * float(ref.abs().max()), rtol=0)


def test_train_step_is_the_step_of_train(model):
    """The recipe's pieces, run by hand as a notebook would, reproduce train(): same losses, same Φs."""
    from reftlens.training import TrainConfig, train_step
    from reftlens.training.loop import _count_steps, _setup_optimizer, _step_batches

    kw = dict(
        max_steps=4, batch_size=4, grad_accum=2, lr=1e-2, seed=5, schedule="cosine", warmup_steps=1, max_grad_norm=1.0
    )
    a, b = fresh(model), fresh(model)
    history = reftlens.train(a, DATA, progress=False, **kw)
    cfg = TrainConfig(**kw)
    examples = encode(model, DATA)
    steps_per_epoch, total = _count_steps(len(examples), cfg, world=1)
    assert (steps_per_epoch, total) == (2, 4)  # 12 examples, 3 micro-batches of 4, 2 per step
    torch.manual_seed(cfg.seed)
    optimizer, scheduler = _setup_optimizer(b, cfg, total)
    b.train()
    records = []
    for step in range(total):
        epoch, group = _step_batches(examples, cfg, 1, step, steps_per_epoch)
        records.append(
            train_step(
                b, optimizer, scheduler, examples, group, step=step, epoch=epoch, max_grad_norm=cfg.max_grad_norm
            )
        )
    b.eval()
    assert records == history.steps
    assert sum(r["tokens"] for r in records) == 2 * sum(
        len(e.completion) for e in examples
    )  # two epochs, each example once
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def test_training_on_nothing_is_an_error(model):
    reft = fresh(model)
    before = weights(reft)
    for kw in ({}, {"max_steps": 5}, {"epochs": 3, "task": "classification"}):
        with pytest.raises(TrainingError) as err:
            reftlens.train(reft, [], progress=False, **kw)
        assert str(err.value).startswith(
            "data is empty: there is nothing to train on. Pass a list of {'prompt': ..., 'completion': ...} dicts"
        )
        assert "datasets.Dataset" in str(err.value)
    datasets = pytest.importorskip("datasets")
    with pytest.raises(TrainingError, match="^data is empty"):
        reftlens.train(reft, datasets.Dataset.from_list([]), max_steps=2, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(reft)))  # nothing ran


def test_evaluating_on_nothing_is_an_error(model):
    from reftlens.training import evaluate

    reft = fresh(model)
    with pytest.raises(TrainingError) as err:
        reftlens.train(reft, DATA, eval_data=[], max_steps=1, progress=False)
    assert str(err.value) == (
        "eval_data is empty: there is nothing to evaluate on. Pass examples of the same "
        "form as data, or leave eval_data=None to skip evaluation."
    )
    with pytest.raises(TrainingError) as err:
        evaluate(reft, [])
    assert str(err.value) == "evaluate got no examples: pass at least one encoded example."


# ---- bf16 on CPUs without native bfloat16 ----------------------------------------------------------

NO_BF16 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
AVX512_BF16 = {**NO_BF16, "avx512_f": True, "avx512_bf16": True}


@pytest.fixture
def fake_cpu(monkeypatch):
    """Pretend to be a CPU with the given torch capability and flags; reset the warn-once flag."""

    def fake(capability, flags):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)

    monkeypatch.setattr(precision, "_warned_bf16", False)
    return fake


def logits_dtypes(model, reft, **kw):
    """The dtypes of the base model's outputs during train(..., **kw), and the warnings raised."""
    seen = []
    handle = model.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reftlens.train(reft, DATA[:4], max_steps=1, batch_size=4, progress=False, **kw)
    finally:
        handle.remove()
    return set(seen), [w for w in caught if issubclass(w.category, EmulatedBF16Warning)]


def test_cpu_bf16_support_reads_torch_capabilities(fake_cpu, monkeypatch):
    fake_cpu("AVX2", NO_BF16)
    assert precision.cpu_bf16_support() == (False, "AVX2")
    fake_cpu("AVX512", AVX512_BF16)
    assert precision.cpu_bf16_support() == (True, "AVX512")
    fake_cpu("AVX512", {**NO_BF16, "avx512_f": True, "amx_tile": True, "amx_bf16": True})
    assert precision.cpu_bf16_support() == (True, "AVX512")
    fake_cpu("DEFAULT", {"architecture": "arm64", "neon": True, "bf16": True})
    assert precision.cpu_bf16_support() == (True, "DEFAULT")
    fake_cpu("DEFAULT", {"architecture": "arm64", "neon": True, "bf16": False})
    assert precision.cpu_bf16_support() == (False, "DEFAULT")
    # a torch without get_capabilities: the x86 probes answer
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_support() == (False, "DEFAULT")


def test_bf16_on_a_cpu_with_native_bf16_uses_autocast(model, fake_cpu):
    fake_cpu("AVX512", AVX512_BF16)
    dtypes, warned = logits_dtypes(model, fresh(model), precision="bf16")
    assert dtypes == {torch.bfloat16} and warned == []
    dtypes, warned = logits_dtypes(model, fresh(model), precision="fp32")
    assert dtypes == {torch.float32} and warned == []


def test_bf16_on_a_cpu_without_native_bf16_runs_fp32_and_warns_once(model, fake_cpu):
    fake_cpu("AVX2", NO_BF16)
    a = fresh(model)
    dtypes, warned = logits_dtypes(model, a, precision="bf16")
    assert dtypes == {torch.float32} and len(warned) == 1
    assert str(warned[0].message) == (
        "precision='bf16', but this CPU (torch capability 'AVX2') has no native bfloat16 (no AVX512-BF16 or "
        "AMX-BF16): bf16 would be emulated, up to tens of times slower than fp32, so training runs in fp32. "
        "Pass precision='bf16-force' to use bf16 autocast anyway."
    )
    assert issubclass(EmulatedBF16Warning, UserWarning)
    dtypes, warned = logits_dtypes(model, fresh(model), precision="bf16")  # once per process
    assert dtypes == {torch.float32} and warned == []
    # the fallback is plain fp32: the same run as precision="fp32"
    b = fresh(model)
    reftlens.train(b, DATA[:4], max_steps=1, batch_size=4, progress=False, precision="fp32")
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))
    dtypes, warned = logits_dtypes(model, fresh(model), precision="bf16-force")
    assert dtypes == {torch.bfloat16} and warned == []


# ---- the options: one TrainConfig, checked when built --------------------------------------------

BAD_OPTIONS = [
    ("epochs", 0),
    ("epochs", 1.5),
    ("epochs", True),
    ("max_steps", 0),
    ("max_steps", "10"),
    ("batch_size", -1),
    ("grad_accum", 0),
    ("lr", float("nan")),
    ("lr", -1e-3),
    ("lr", "1e-3"),
    ("weight_decay", float("inf")),
    ("schedule", "step"),
    ("warmup_steps", -1),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", float("nan")),
    ("max_length", 1),
    ("seed", -3),
    ("seed", 2.0),
    ("precision", "fp16"),
    ("group_by_length", "yes"),
    ("chat_template", 1),
    ("prepend_bos", "no"),
    ("task", "regression"),
    ("label_names", "yes"),
    ("label_names", ["a", "a"]),
    ("label_names", []),
    ("label_names", {"a": []}),
    ("label_names", {1: ["x"]}),
    ("intervene_on", "completion"),
    ("eval_every", 0),
    ("progress", None),
    ("checkpoint_dir", 3),
    ("checkpoint_every", 0),
    ("resume", "true"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_every_option_is_checked_and_named(name, value):
    from reftlens.training import TrainConfig

    with pytest.raises(TrainingError) as err:
        TrainConfig(**{name: value})
    assert str(err.value).startswith(f"{name} must be ")
    assert repr(value) in str(err.value)


def test_bad_options_are_refused_before_any_work(model):
    reft = fresh(model)
    before = weights(reft)
    with pytest.raises(TrainingError, match=r"^lr must be a finite number >= 0.0; got nan\."):
        reftlens.train(reft, DATA, max_steps=1, lr=float("nan"), progress=False)
    with pytest.raises(TrainingError, match=r"no option 'learning_rate'.*TrainConfig: epochs, max_steps"):
        reftlens.train(reft, DATA, max_steps=1, learning_rate=1e-3, progress=False)
    with pytest.raises(TrainingError, match=r"no option 'max_step' \(did you mean 'max_steps'\?\)"):
        reftlens.train(reft, DATA, max_step=1, progress=False)
    with pytest.raises(TrainingError, match="config must be a TrainConfig"):
        reftlens.train(reft, DATA, {"max_steps": 1})
    assert all(torch.equal(x, y) for x, y in zip(before, weights(reft)))


def test_a_config_and_keywords_are_the_same_run(model):
    """train(reft, data, TrainConfig(...)) == train(reft, data, **options); keywords override a config."""
    import inspect
    from dataclasses import fields

    from reftlens.training import TrainConfig

    kw = dict(max_steps=3, batch_size=4, lr=1e-2, seed=4, progress=False)
    a, b, c = fresh(model), fresh(model), fresh(model)
    by_keywords = reftlens.train(a, DATA, **kw)
    by_config = reftlens.train(b, DATA, TrainConfig(**kw))
    overridden = reftlens.train(c, DATA, TrainConfig(**{**kw, "lr": 5.0, "max_steps": 9}), lr=1e-2, max_steps=3)
    assert by_keywords.steps == by_config.steps == overridden.steps
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(weights(a), weights(b), weights(c)))
    # the options are written once (TrainConfig) and shown in train's signature from there
    shown = inspect.signature(reftlens.train).parameters
    for f in fields(TrainConfig):
        assert shown[f.name].default == f.default and shown[f.name].kind is inspect.Parameter.KEYWORD_ONLY


# ---- checkpoints: damaged files and another set are refused, naming the file or the difference -----


def checkpoint(model, folder):
    kw = dict(max_steps=2, batch_size=4, lr=1e-2, progress=False)
    reftlens.train(fresh(model), DATA, checkpoint_dir=folder, checkpoint_every=2, **kw)
    return folder


@pytest.mark.parametrize("name", ["optimizer.safetensors", "trainer_state.json"])
def test_a_truncated_checkpoint_file_is_named(model, tmp_path, name):
    from reftlens import LoadError

    ckpt = checkpoint(model, tmp_path / "ckpt")
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    reft = fresh(model, seed=7)
    before = weights(reft)
    with pytest.raises(LoadError) as err:
        reftlens.train(reft, DATA, max_steps=4, batch_size=4, checkpoint_dir=ckpt, resume=True, progress=False)
    assert f"checkpoint file {ckpt / name} is damaged" in str(err.value)
    assert "resume=False" in str(err.value)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(reft)))  # nothing half-loaded


@pytest.mark.parametrize(
    "other,words",
    [
        (dict(layers=(1, 3)), r"has layers \[1, 2\] in the checkpoint but \[1, 3\] here"),
        (dict(positions="f1+l1"), r"has positions 'f2\+l2' in the checkpoint but 'f1\+l1' here"),
        (dict(rank=4), r"has Φ configuration \{.*'rank': 8.*\} in the checkpoint but \{.*'rank': 4.*\} here"),
        (dict(phi="direft"), r"has Φ type 'loreft' in the checkpoint but 'direft' here"),
    ],
)
def test_resuming_another_set_is_refused_naming_the_difference(model, tmp_path, other, words):
    from reftlens import DiReFT

    ckpt = checkpoint(model, tmp_path / "ckpt")
    if other.get("phi") == "direft":
        torch.manual_seed(7)
        reft = ReftModel(model, Intervention(DiReFT(model.cfg.d_model, 8), layers=[1, 2], positions="f2+l2"))
    else:
        reft = fresh(model, seed=7, **other)
    before = weights(reft)
    with pytest.raises(TrainingError, match=words) as err:
        reftlens.train(reft, DATA, max_steps=4, batch_size=4, checkpoint_dir=ckpt, resume=True, progress=False)
    assert str(ckpt) in str(err.value) and "new checkpoint_dir" in str(err.value)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(reft)))


def test_train_takes_encoded_examples(model):
    """Examples already encoded (what DAS passes, with sources) train exactly as the dicts they came from."""
    kw = dict(max_steps=3, batch_size=4, lr=1e-2, seed=1, progress=False)
    a, b = fresh(model), fresh(model)
    from_dicts = reftlens.train(a, DATA, **kw)
    from_examples = reftlens.train(b, encode(model, DATA), **kw)
    assert from_dicts.steps == from_examples.steps
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))
