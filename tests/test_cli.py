"""The main job runs end to end (on the tiny model, a few steps, to stay quick); the CLI documents itself."""

import argparse
import subprocess
import sys

import pytest

from reftlens.cli import build_parser, busy_hint, demo_prompt, main


def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "reftlens",
            "demo",
            "--model",
            "tiny-llama",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "saved"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "before training" in out.stdout and "after training" in out.stdout
    assert "3 steps of 4" in out.stdout
    assert "reloaded: same generations = True" in out.stdout
    assert (tmp_path / "saved" / "reft_config.json").is_file()


def test_tour_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "reftlens", "tour", "--model", "tiny-gpt2"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "layer  3" in out.stdout


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_and_option_has_a_help_line(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"demo", "tour"}
    assert all(c.help for c in commands._choices_actions)
    for p in _parsers(parser):
        for action in p._actions:
            assert action.help, f"{p.prog} {action.option_strings or action.dest} has no help line"
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "demo" in shown and "tour" in shown and "activation patching" in shown


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--steps", "0"], "--steps: 0 must be at least 1"),
        (["demo", "--batch-size", "two"], "--batch-size: 'two' is not a whole number"),
        (["demo", "--lr", "nan"], "--lr: nan must be a finite number above 0"),
        (["demo", "--lr", "-1"], "--lr: -1 must be a finite number above 0"),
    ],
)
def test_demo_refuses_bad_options(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


class _ChatML:
    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        sys_turn = "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        return sys_turn + f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def test_demo_prompt_drops_the_default_system_turn():
    assert demo_prompt(_ChatML(), "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"

    class Plain:
        chat_template = None

    assert demo_prompt(Plain(), "Hi?") == "Hi?"


def test_a_busy_machine_gets_the_one_thread_hint():
    assert "OMP_NUM_THREADS=1" in busy_hint(9.5, 2, 2)
    assert busy_hint(1.0, 2, 2) is None  # quiet
    assert busy_hint(9.5, 2, 1) is None  # one thread already
