"""Write the token-id batches that both sides of the pyreft comparison run on.

Runs in the main environment (system python) with SmolLM2's tokenizer from reftlens'
``smollm2_dir()``; the output is plain token ids, so pyreft's venv needs no tokenizer of its own
and both sides see identical inputs. Format: see the docstring of ``pyreft_bench.py``.

    python3 benchmarks/peers/make_batches.py OUT.json [--batch 8] [--seq 128] [--seed 0]

Prompts are the model's chat template (its default system line + one user turn + the assistant
header), ~45-60 tokens, preceded by ``<|endoftext|>`` (id 0), the start token reftlens' SmolLM2
tokenizer prepends. Responses end with ``<|im_end|>``. Batches are left padded with id 16.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoTokenizer

# Made-up instruction/response pairs: short, varied lengths, so padding actually occurs.
PAIRS = [
    ("Give me a synonym for happy.", "Joyful."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    (
        "Write a haiku about autumn leaves.",
        "Red leaves drift and fall,\nwhispering to the cold ground,\nsummer says goodbye.",
    ),
    ("Translate 'good morning' into French.", "Bonjour."),
    ("Name the largest planet in our solar system.", "Jupiter is the largest planet in the solar system."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Suggest a name for a pet goldfish.", "How about Bubbles?"),
    (
        "Explain in one sentence what photosynthesis is.",
        "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    ),
    ("What is 12 times 11?", "12 times 11 is 132."),
    ("List three primary colours.", "Red, blue and yellow."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Give me a tip for sleeping better.", "Keep a regular bedtime and avoid screens for an hour before sleep."),
    ("What is the opposite of ancient?", "Modern."),
    ("Describe the colour of the sky on a clear day.", "On a clear day the sky is a bright, pale blue."),
    ("Convert 5 kilometres to metres.", "5 kilometres is 5000 metres."),
    ("What do bees make?", "Bees make honey and beeswax."),
    (
        "Write a short greeting for a birthday card.",
        "Happy birthday! Wishing you a year full of laughter and good friends.",
    ),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest."),
    ("What is the capital of Japan?", "Tokyo."),
    ("Recommend a simple breakfast.", "Porridge with sliced banana and a spoon of honey."),
    (
        "Why do we have seasons?",
        "Because Earth's axis is tilted, so each hemisphere gets more or less direct sunlight during the year.",
    ),
    ("Spell the word 'necessary' backwards.", "yrassecen"),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("Give an example of a mammal that can fly.", "A bat."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Finish the sentence: The early bird...", "...catches the worm."),
    ("Name a fruit that is yellow.", "A banana."),
    ("What instrument has 88 keys?", "The piano has 88 keys."),
    (
        "Summarise the story of Cinderella in one line.",
        "A mistreated girl goes to a royal ball with a fairy's help and marries the prince.",
    ),
    ("How do you say thank you in Spanish?", "Gracias."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees Fahrenheit."),
    ("Tell me a fun fact about octopuses.", "An octopus has three hearts and blue blood."),
]
GEN_PROMPTS = [
    "What is 2+3?",
    "Name three animals that live in the sea.",
    "Write one sentence about the moon.",
    "What colour is grass?",
    "Give me a word that rhymes with cat.",
    "How many hours are in a day?",
    "What is the capital of Italy?",
    "Tell me something about elephants.",
]


def f5l5(pad: int, n: int) -> list[int]:
    """Absolute positions of the first 5 and last 5 of n real tokens after `pad` pad tokens."""
    return [pad + i for i in range(5)] + [pad + n - 5 + i for i in range(5)]


def prompt_ids(tok, instruction: str) -> list[int]:
    text = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, add_special_tokens=True)["input_ids"]  # adds the <|endoftext|> start token


def left_pad(seqs: list[list[int]], pad_id: int, fill: int) -> list[list[int]]:
    width = max(map(len, seqs))
    return [[fill] * (width - len(s)) + s for s in seqs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model-dir", default=None, help="default: reftlens' smollm2_dir()")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="length of the forward batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        from reftlens.models import smollm2_dir

        model_dir = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id

    train = []
    for b in range(0, len(PAIRS) - args.batch + 1, args.batch):
        ids, labels, plens = [], [], []
        for instruction, response in PAIRS[b : b + args.batch]:
            p = prompt_ids(tok, instruction)
            r = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)  # loss on the response (and its end marker) only
            plens.append(len(p))
        width = max(map(len, ids))
        pads = [width - len(s) for s in ids]
        train.append(
            dict(
                input_ids=left_pad(ids, pad_id, pad_id),
                attention_mask=left_pad([[1] * len(s) for s in ids], pad_id, 0),
                labels=left_pad(labels, pad_id, -100),
                intervention_locations=[[f5l5(pad, n)] for pad, n in zip(pads, plens)],
                prompt_lengths=plens,
            )
        )

    g = torch.Generator().manual_seed(args.seed)
    # Random ids above the special tokens (ids < 17 are markers such as <|im_start|>); no padding.
    fwd = torch.randint(17, len(tok), (args.batch, args.seq), generator=g).tolist()
    forward = dict(
        input_ids=fwd,
        attention_mask=[[1] * args.seq for _ in fwd],
        intervention_locations=[[f5l5(0, args.seq)] for _ in fwd],
    )

    gen_ids = [prompt_ids(tok, q) for q in GEN_PROMPTS[: args.batch]]
    width = max(map(len, gen_ids))
    generate = dict(
        input_ids=left_pad(gen_ids, pad_id, pad_id),
        attention_mask=left_pad([[1] * len(s) for s in gen_ids], pad_id, 0),
        intervention_locations=[[f5l5(width - len(s), len(s))] for s in gen_ids],
        prompts=GEN_PROMPTS[: args.batch],
    )

    meta = dict(
        model_dir=model_dir,
        pad_token_id=pad_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        start_token_id=0,
        padding="left",
        positions="f5+l5 of the prompt tokens (start token included)",
        seed=args.seed,
    )
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, train=train, forward=forward, generate=generate), f)
    lens = [len(r) for t in train for r in t["input_ids"]]
    print(
        f"wrote {args.out}: {len(train)} train batches of {args.batch} (padded widths {sorted(set(lens))}), "
        f"prompt lengths {min(min(t['prompt_lengths']) for t in train)}-{max(max(t['prompt_lengths']) for t in train)}, "
        f"forward {args.batch}x{args.seq}, generate {args.batch}x{width}"
    )


if __name__ == "__main__":
    main()
