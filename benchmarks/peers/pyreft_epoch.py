"""pyreft 0.1.0 side of ``benchmarks/epoch_bbc.py``: one training epoch with pyreft's default data
pipeline. Runs INSIDE the pyreft venv; ``epoch_bbc.py`` calls it.

    .bench/venv-pyreft/bin/python benchmarks/peers/pyreft_epoch.py --model-dir DIR_445 \\
        --examples EXAMPLES.json --out OUT.json --init-weights INIT.pt

EXAMPLES.json (written by epoch_bbc.py in the main environment, so both sides train on the very
same token ids): ``{"examples": [{"idx": int, "input_ids": [int], "prompt_length": int}, ...],
"pad_token_id": 16}``; the loss is on ``input_ids[prompt_length:]`` (topic word + EOS).

The pipeline is what ``pyreft.make_multiple_position_supervised_data_module`` builds and
``pyreft.ReftTrainerForCausalLM`` iterates, fed with ids instead of text (pyreft's text path
would tokenize and truncate on its own): a ``datasets.Dataset`` of input_ids / labels (-100 on
the prompt) / intervention_locations from ``pyreft.dataset.get_intervention_locations`` (f5+l5,
``share_weights=True``: each of the four per-layer interventions sees all ten positions), the
collator ``ReftDataCollator(DataCollatorForSeq2Seq(padding="longest", label_pad_token_id=-100))``
with the tokenizer right padded (as pyreft's examples set it), and
``pyreft.reft_trainer.make_dataloader(..., shuffle=True)``: random batches padded to the longest
example. Each step is ``ReftTrainer.compute_loss`` (the intervened forward with labels),
backward and an AdamW step; lr 0 so the weights stay at their seed-0 init and the per-example
losses can be compared with reftlens's. The epoch time covers the data loader too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

LAYERS = [3, 9, 18, 24]
RANK = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init-weights", required=True, help="pyreft's seed-0 init is saved here for reftlens to load")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup-batches", type=int, default=1, help="untimed steps on the first batch before the epoch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import datasets
    import pyreft
    import transformers
    from pyreft.dataset import ReftDataCollator, get_intervention_locations
    from pyreft.reft_trainer import make_dataloader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.load(open(args.examples))
    exs = spec["examples"]
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    tok.padding_side = "right"
    assert tok.pad_token_id == spec["pad_token_id"], (tok.pad_token_id, spec["pad_token_id"])

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)  # the same init as peers/pyreft_bench.py
    reps = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": RANK,
            "intervention": pyreft.LoreftIntervention(
                embed_dim=model.config.hidden_size, low_rank_dimension=RANK, dtype=torch.float32
            ),
        }
        for layer in LAYERS
    ]
    reft = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
    torch.save(
        {
            layer: dict(
                R=iv.rotate_layer.weight.detach().clone(),
                W=iv.learned_source.weight.detach().clone(),
                b=iv.learned_source.bias.detach().clone(),
            )
            for layer, iv in zip(LAYERS, reft.interventions.values())
        },
        args.init_weights,
    )

    # --- pyreft's data module (make_multiple_position_supervised_data_module), from ids
    ids, locs, labels, idxs = [], [], [], []
    for e in exs:
        x, n = e["input_ids"], e["prompt_length"]
        ids.append(x)
        labels.append([-100] * n + x[n:])
        locs.append(
            get_intervention_locations(
                last_position=n, first_n=5, last_n=5, pad_mode="last", num_interventions=len(LAYERS), share_weights=True
            )
        )
        idxs.append(e["idx"])
    dataset = datasets.Dataset.from_dict(
        {"input_ids": ids, "intervention_locations": locs, "labels": labels, "idx": idxs}
    )
    collator = ReftDataCollator(
        data_collator=transformers.DataCollatorForSeq2Seq(
            tokenizer=tok, model=model, label_pad_token_id=-100, padding="longest"
        )
    )

    opt = torch.optim.AdamW(reft.get_trainable_parameters(), lr=args.lr, weight_decay=0.0)

    def step(inputs) -> tuple[float, torch.Tensor]:
        # ReftTrainer.compute_loss
        unit_locations = {"sources->base": (None, inputs["intervention_locations"].permute(1, 0, 2).tolist())}
        _, cf = reft(
            {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
            unit_locations=unit_locations,
            labels=inputs["labels"],
        )
        cf.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lg, lb = cf.logits[:, :-1].detach().float(), inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=-100, reduction="none")
        m = (lb != -100).float()
        return cf.loss.item(), (nll * m).sum(1) / m.sum(1)

    warm = collator([dataset[i] for i in range(min(args.batch, len(dataset)))])
    for _ in range(args.warmup_batches):
        step(warm)

    torch.manual_seed(args.seed)  # DataLoader(shuffle=True) draws its order from torch's RNG
    loader = make_dataloader(dataset, args.batch, collator, shuffle=True)  # = ReftTrainerForCausalLM's loader
    per_example, step_s, widths, losses = {}, [], [], []
    t_epoch = time.perf_counter()
    t = time.perf_counter()
    for inputs in loader:
        loss, pe = step(inputs)
        step_s.append(time.perf_counter() - t)  # includes fetching + collating this batch
        t = time.perf_counter()
        losses.append(loss)
        widths.append(int(inputs["input_ids"].shape[1]))
        for i, l in zip(inputs["idx"].tolist(), pe.tolist()):
            per_example[str(i)] = l
    epoch_s = time.perf_counter() - t_epoch

    from importlib.metadata import version

    out = dict(
        epoch_s=epoch_s,
        step_s=step_s,
        step_s_median=statistics.median(step_s),
        batch_widths=widths,
        padded_tokens=sum(
            w * b
            for w, b in zip(widths, [args.batch] * (len(widths) - 1) + [len(exs) - args.batch * (len(widths) - 1)])
        ),
        real_tokens=sum(len(x) for x in ids),
        losses=losses,
        per_example=per_example,
        n_batches=len(widths),
        versions={p: version(p) for p in ("torch", "transformers", "pyreft", "pyvene")},
        n_trainable=sum(p.numel() for p in reft.get_trainable_parameters()),
    )
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
