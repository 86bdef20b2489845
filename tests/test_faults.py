"""Faults: a writer killed at each step of its write, two writers on one folder, and random
numeric arguments to the public functions.

Each kill runs in a forked child that SIGKILLs itself at one named step of
:func:`reftlens.saving.atomic_dir` (``saving._step_hook``) or halfway through writing its files; the
parent then checks that the destination loads as the earlier save or the new one, and that the
next write (or load) recovers what the dead writer left.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import reftlens
from reftlens import Intervention, LoReFT, ReftModel, saving
from reftlens.errors import SaveError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault tests fork")


# --------------------------------------------------------------------------- writers


def _set(model, seed, hook="resid_post", positions="l1"):
    torch.manual_seed(seed)
    d = model.cfg.d_model
    return ReftModel(model, Intervention(LoReFT(d, 2, init="random"), layers=1, hook=hook, positions=positions))


def _bank(model, seed):
    torch.manual_seed(seed)
    d = model.cfg.d_model
    return ReftModel(
        model,
        {
            "a": Intervention(LoReFT(d, 2, init="random"), layers=0, positions="l1"),
            "b": Intervention(LoReFT(d, 2, init="random"), layers=1, positions="l1"),
        },
    )


def _load_hf(path, model):
    return reftlens.load_hf(path)


def _load_peft(path, model):
    """peft reads the folder, not reftlens: where the two renames are used (no exchange), a folder
    caught between them is restored by the next reftlens write or by saving.recover."""
    from safetensors.torch import load_file

    path = saving.recover(path)
    load_file(str(Path(path) / "adapter_model.safetensors"))
    assert (Path(path) / "adapter_config.json").is_file()


def _train_checkpoint(seed, path):
    """A training run of one step that checkpoints into ``path`` (its set built afresh from ``seed``)."""
    model = seed[1]
    reftlens.train(
        _set(model, seed[0]),
        [{"prompt": "a b", "completion": " c"}] * 2,
        max_steps=1,
        batch_size=2,
        progress=False,
        checkpoint_dir=path,
        checkpoint_every=1,
    )


def _load_checkpoint(path, model):
    """What a resume reads (training's own resume is the training module's; where the two renames
    are used, saving.recover first restores a checkpoint caught between them)."""
    path = saving.recover(path)
    assert (path / "trainer_state.json").is_file()
    ReftModel.load(path / "reft", model)


# name: (build the object to write from the model and a seed, write it, load the destination, the file
# whose bytes tell old from new)
WRITERS = {
    "set": (_set, lambda obj, p: obj.save(p), ReftModel.load, "reft_weights.safetensors"),
    "bank": (_bank, lambda obj, p: obj.save(p), ReftModel.load, "sets/0001/reft_weights.safetensors"),
    "hf": (
        lambda m, s: reftlens.to_hf(_set(m, s)),
        lambda obj, p: reftlens.save_hf(obj, p),
        _load_hf,
        "reft/reft_weights.safetensors",
    ),
    "peft": (
        lambda m, s: _set(m, s, hook="mlp_out", positions="all"),
        lambda obj, p: reftlens.save_peft(obj, p),
        _load_peft,
        "adapter_model.safetensors",
    ),
    "checkpoint": (
        lambda m, s: (s, m),
        _train_checkpoint,
        _load_checkpoint,
        "reft/reft_weights.safetensors",
    ),
    "pyreft": (
        _set,
        lambda obj, p: reftlens.save_pyreft(obj, p),
        lambda p, m: reftlens.load_pyreft(p, m),
        None,  # the one intkey_*.bin
    ),
}


def _digest(path: Path, file: str | None) -> str:
    f = path / file if file else next(path.glob("intkey_*.bin"))
    return hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, in this module's tests and so in their forked children: GNU OpenMP's
    thread pool does not survive a fork (a child's first parallel region waits forever on the
    parent's workers), and reference saves must be computed with the children's threads to have
    their bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _in_child(target, *, kill_at: str | None = None, mid_write: bool = False) -> int:
    """Run ``target()`` in a forked child; it SIGKILLs itself at step ``kill_at`` of atomic_dir, or
    after its first data file with ``mid_write``. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:

            def die(step=None):
                if step is None or step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            saving._step_hook = die
            if mid_write:
                import safetensors.torch

                real_save_file, real_torch_save = safetensors.torch.save_file, torch.save

                def save_file(*a, **k):
                    real_save_file(*a, **k)
                    die()

                def torch_save(*a, **k):
                    real_torch_save(*a, **k)
                    die()

                safetensors.torch.save_file, torch.save = save_file, torch_save
            target()
            os._exit(0)
        except SaveError:
            os._exit(3)
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
    return _wait(pid)


def _wait(pid: int, timeout: float = 300.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung")


def _leftovers(parent: Path, keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


# the steps a write goes through, and which content the destination holds after a kill there
BEFORE = ["locked", "recovered", "tmp-created", "mid-write", "written", "synced"]
AFTER = ["swapped", "moved-in", "cleaned"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_killed_at_any_step_leaves_the_old_or_the_new_save(
    tiny_models, tmp_path, monkeypatch, writer, exchange
):
    if writer == "peft":
        pytest.importorskip("peft")
    if not exchange:
        monkeypatch.setenv("REFTLENS_NO_EXCHANGE", "1")
    model = tiny_models["tiny-llama"]
    build, write, load, file = WRITERS[writer]
    old, new = build(model, 0), build(model, 1)
    ref_old, ref_new = tmp_path / "ref-old", tmp_path / "ref-new"
    write(old, ref_old)
    write(new, ref_new)
    want_old, want_new = _digest(ref_old, file), _digest(ref_new, file)
    assert want_old != want_new
    steps = BEFORE + (["swapped"] if exchange else ["moved-aside", "moved-in"]) + ["cleaned"]
    for step in steps:
        parent = tmp_path / step
        dest = parent / "save"
        write(old, dest)
        status = _in_child(lambda: write(new, dest), kill_at=step, mid_write=step == "mid-write")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (step, status)
        # a load right after the kill finds the old or the new save (after "moved-aside" it restores the old one)
        load(dest, model)
        assert _digest(dest, file) == (want_new if step in AFTER else want_old), step
        # the next write recovers and cleans everything the dead writer left
        write(new, dest)
        assert _digest(dest, file) == want_new
        assert _leftovers(parent, "save") == [], step


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_write(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("REFTLENS_NO_EXCHANGE", "1")
    model = tiny_models["tiny-llama"]
    dest = tmp_path / "save"
    _set(model, 0).save(dest)
    want_old = _digest(dest, "reft_weights.safetensors")
    status = _in_child(lambda: _set(model, 1).save(dest), kill_at="moved-aside")
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert not dest.exists()  # the window the two renames leave: the earlier save is moved aside
    moved = [p.name for p in tmp_path.iterdir()]
    assert any(n.startswith(".save.old-") for n in moved) and any(n.startswith(".save.tmp-") for n in moved)
    # the next write of another kind to that folder sees the restored earlier save, not an empty path
    with pytest.raises(SaveError, match="not an earlier save"):
        reftlens.save_peft(_set(model, 2, hook="mlp_out", positions="all"), dest)
    assert _digest(dest, "reft_weights.safetensors") == want_old
    assert _leftovers(tmp_path, "save") == []


# --------------------------------------------------------------------------- concurrent writers


def test_a_second_writer_while_one_is_writing_gets_a_save_error(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    dest = tmp_path / "save"
    first, second = _set(model, 0), _set(model, 1)
    second.save(tmp_path / "ref")
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:

            def pause(step):
                if step == "written":  # the first writer holds the lock, its files are written
                    os.write(ready_w, b"1")
                    os.read(go_r, 1)

            saving._step_hook = pause
            second.save(dest)
            os._exit(0)
        except BaseException:
            os._exit(1)
    assert os.read(ready_r, 1) == b"1"
    with pytest.raises(SaveError, match=rf"cannot save to {dest}: another process \(pid {pid}\) is writing to it"):
        first.save(dest)
    os.write(go_w, b"1")
    assert os.WEXITSTATUS(_wait(pid)) == 0
    assert _digest(dest, "reft_weights.safetensors") == _digest(tmp_path / "ref", "reft_weights.safetensors")
    ReftModel.load(dest, model)
    assert _leftovers(tmp_path, "save") == ["ref"]
    first.save(dest)  # the lock went with the writer: the folder can be saved to again


def test_two_racing_writers_one_wins_whole(tiny_models, tmp_path):
    model = tiny_models["tiny-llama"]
    dest = tmp_path / "save"
    sets = [_set(model, 0), _set(model, 1)]
    digests = set()
    for i, s in enumerate(sets):
        s.save(tmp_path / f"ref{i}")
        digests.add(_digest(tmp_path / f"ref{i}", "reft_weights.safetensors"))
    for _ in range(3):
        pids = []
        for s in sets:
            pid = os.fork()
            if pid == 0:
                try:
                    s.save(dest)
                    os._exit(0)
                except SaveError as e:
                    os._exit(3 if str(dest) in str(e) and "another process" in str(e) else 1)
                except BaseException:
                    os._exit(1)
            pids.append(pid)
        codes = sorted(os.WEXITSTATUS(_wait(p)) for p in pids)
        assert codes in ([0, 0], [0, 3]), codes  # both in turn, or one wins and the other is told
        assert _digest(dest, "reft_weights.safetensors") in digests
        ReftModel.load(dest, model)
        assert _leftovers(tmp_path, "save") == ["ref0", "ref1"]


# --------------------------------------------------------------------------- numeric arguments (property-based)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from reftlens import ReftError, Steer  # noqa: E402
from reftlens.errors import PositionError  # noqa: E402
from reftlens.positions import parse_positions  # noqa: E402
from reftlens.steering import alpha_sweep  # noqa: E402

#: non-finite, negative, zero, fractional and wrong-typed values
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 0.5, 2.5]),
    st.integers(-3, 6),
    st.booleans(),
    st.none(),
    st.sampled_from(["4", "", "nan"]),
)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _finite(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _refused(call, words: str) -> None:
    with pytest.raises(ReftError, match=words):
        call()


@pytest.fixture(scope="module")
def steer(tiny_models):
    model = tiny_models["tiny-llama"]
    return ReftModel(model, Intervention(Steer(torch.ones(model.cfg.d_model)), layers=1, positions="all"))


@FAST
@given(v=ANY_VALUE)
def test_steer_alpha_and_scaled_take_finite_numbers_only(steer, v):
    d = steer.model.cfg.d_model
    if _finite(v):
        h = torch.zeros(1, d)
        assert torch.allclose(Steer(torch.ones(d), alpha=v)(h), torch.full((1, d), float(v)))
        steer.scaled(v)
    else:
        _refused(lambda: Steer(torch.ones(d), alpha=v), "Steer: alpha must be a finite number")
        _refused(lambda: steer.scaled(v), "alpha must be a finite number")
        _refused(lambda: alpha_sweep(steer, ["a"], [1.0, v], 1), r"alphas\[1\] must be a finite number")


@FAST
@given(v=ANY_VALUE)
def test_generate_counts_and_sampling_arguments(steer, v):
    tokens = steer.tokenize(["a b"])[0]
    run = dict(eos_token_id=None, seed=0)
    if _count(v):
        assert steer.generate(tokens, v, **run).shape == (1, tokens.shape[1] + v)
    else:
        _refused(lambda: steer.generate(tokens, v, **run), "max_new_tokens must be a positive integer")
    if _finite(v) and v > 0:
        steer.generate(tokens, 1, do_sample=True, temperature=v, **run)
    else:
        _refused(lambda: steer.generate(tokens, 1, do_sample=True, temperature=v, **run), "temperature must be")
    if v is None or _count(v):
        steer.generate(tokens, 1, do_sample=True, top_k=v, **run)
    else:
        _refused(lambda: steer.generate(tokens, 1, do_sample=True, top_k=v, **run), "top_k must be None or an integer")
    if v is None or (_finite(v) and 0 < v <= 1):
        steer.generate(tokens, 1, do_sample=True, top_p=v, **run)
    else:
        _refused(lambda: steer.generate(tokens, 1, do_sample=True, top_p=v, **run), "top_p must be None or a number")


@FAST
@given(v=ANY_VALUE)
def test_loreft_rank(v):
    if _count(v) and v <= 16:
        assert LoReFT(16, v).rank == v
    else:
        _refused(lambda: LoReFT(16, v), "rank")


@FAST
@given(first=st.integers(-3, 4), last=st.integers(-3, 4))
def test_first_last_position_counts(first, last):
    spec = f"f{first}+l{last}"
    if first >= 0 and last >= 0 and first + last > 0:
        parsed = parse_positions(spec)
        assert (parsed.first, parsed.last) == (first, last)
    else:
        with pytest.raises(PositionError, match=re.escape(spec)):
            parse_positions(spec)
