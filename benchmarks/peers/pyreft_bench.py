"""pyreft 0.1.0 side of the reftlens-vs-pyreft benchmarks. Runs INSIDE the pyreft venv.

    bash benchmarks/peers/setup_pyreft_env.sh
    python3 benchmarks/peers/smollm2_for_hf445.py /tmp/smollm2-hf445
    python3 benchmarks/peers/make_batches.py /tmp/batches.json
    .bench/venv-pyreft/bin/python benchmarks/peers/pyreft_bench.py \
        --model-dir /tmp/smollm2-hf445 --batches /tmp/batches.json --out /tmp/pyreft.json

Batches file (written by make_batches.py; token ids only, so both sides see identical inputs)::

    {"meta": {"pad_token_id": 16, "eos_token_id": 2, "padding": "left", ...},
     "train": [ {"input_ids":      [[int]*T]*B,       # left padded with pad_token_id
                 "attention_mask": [[0|1]*T]*B,
                 "labels":         [[int]*T]*B,       # -100 on pad and prompt tokens
                 "intervention_locations": [[[int]*10]]*B,  # [B][1][10]: f5+l5 of the prompt,
                                                            # absolute positions in the padded row
                 "prompt_lengths": [int]*B}, ...],
     "forward":  {"input_ids": [[int]*128]*B, "attention_mask": ..., "intervention_locations": [B][1][10]},
     "generate": {"input_ids": ..., "attention_mask": ..., "intervention_locations": [B][1][10],
                  "prompts": [str]*B}}

The middle axis of intervention_locations has one entry because f5+l5 is *tied*: one
intervention per layer sees all 10 positions (pyreft's share_weights=True). pyreft wants
unit_locations as [n_interventions][B][10], so it is repeated once per layer here.

Each measurement runs in a fresh child process (so peak RSS is its own), on 2 threads, fp32:
  train_pyreft  forward+backward+AdamW step (lr 4e-3, weight_decay 0: see below) of LoReFT r4 at
                layers 3;9;18;24 (block_output); all parts use the same seed-0 pyreft init,
                which --init-weights saves for reproducing pyreft_init_loss elsewhere
  train_floor   the same with a zero-initialised additive parameter per layer (identity edit):
                the cost of backprop through the frozen model, which any ReFT pays
  forward       pyreft forward 8x128 with the intervention vs plain HF forward (interleaved)
  generate      pyreft greedy 32 tokens with KV cache vs plain HF generate (interleaved);
                EOS does not stop it (eos_token_id=None), so every row makes exactly 32 tokens
  losses        base loss vs pyreft's random-init LoReFT loss on the first train batch
Peak memory: VmHWM from /proc/self/status, reset via /proc/self/clear_refs once the model is
loaded (after malloc_trim); delta = peak over warm-up + timed loop - RSS at the reset, i.e.
what training/forward adds on top of the loaded model (~520 MB of fp32 weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the harness
from common import compare, interleave, machine, reset_peak, rss_mb  # noqa: E402

LAYERS = [3, 9, 18, 24]
RANK = 4
LR = 4e-3
PARTS = ["losses", "train_pyreft", "train_floor", "forward", "generate"]


# ---------------------------------------------------------------- helpers


def tensors(batch: dict, keys=("input_ids", "attention_mask", "labels")) -> dict:
    return {k: torch.tensor(batch[k]) for k in keys if k in batch}


def unit_locations(batch: dict) -> dict:
    # [B][1][10] -> [n_layers][B][10]: pyreft has one intervention per layer; tied f5+l5
    # means each sees the same 10 positions. The first element (source locations) is None
    # because LoReFT is sourceless.
    locs = [row[0] for row in batch["intervention_locations"]]
    return {"sources->base": (None, [locs] * len(LAYERS))}


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()  # no dropout; pyreft's disable_model_gradients also calls eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # 4.45 leaves the weights mmap'ed from the safetensors file, paged in on first use; touch
    # them now so the first forward's page faults do not count as training memory (~500 MB).
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())
    return model


def reft_model_for(model):
    import pyreft

    torch.manual_seed(0)
    # dtype= is needed: without it LoreftIntervention builds learned_source in bf16.
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
    return reft


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    # Same shift and ignore-index as HF's causal LM loss, but averaged per row.
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb, ignore_index=-100, reduction="none")
    mask = (lb != -100).float()
    return ((nll * mask).sum(1) / mask.sum(1)).tolist()


# ---------------------------------------------------------------- parts (each in its own process)


def part_losses(model, data, args) -> dict:
    b = tensors(data["train"][0])
    with torch.no_grad():
        base = model(**b)
        reft = reft_model_for(model)
        _, cf = reft(
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
            unit_locations=unit_locations(data["train"][0]),
            labels=b["labels"],
        )
    if args.init_weights:
        # pyreft's random init, so another implementation can reproduce pyreft_init_loss exactly:
        # phi(h) = h + (h @ W.T + b - h @ R) @ R.T with R [d, r] orthonormal columns.
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
    return dict(
        base_loss=base.loss.item(),
        pyreft_init_loss=cf.loss.item(),
        base_per_example=per_example_loss(base.logits, b["labels"]),
        pyreft_init_per_example=per_example_loss(cf.logits, b["labels"]),
        n_trainable=sum(p.numel() for p in reft.get_trainable_parameters()),
    )


def train_loop(step_fn, data, args) -> dict:
    batches = data["train"]
    times, losses = [], []
    # Reset before the warm-up: malloc_trim hands memory back, so resetting right before the
    # timed loop would make its first step pay page faults. The warm-up peak is the same anyway.
    rss0 = reset_peak()
    for i in range(args.warmup):
        step_fn(batches[i % len(batches)])
    for i in range(args.steps):
        b = batches[(args.warmup + i) % len(batches)]
        t = time.perf_counter()
        losses.append(step_fn(b))
        times.append(time.perf_counter() - t)
    peak = rss_mb("VmHWM")
    return dict(
        step_s_median=statistics.median(times),
        step_s=times,
        losses=losses,
        rss_before_mb=rss0,
        peak_rss_mb=peak,
        peak_rss_delta_mb=peak - rss0,
    )


def part_train_pyreft(model, data, args) -> dict:
    reft = reft_model_for(model)
    # weight_decay=0 (HF Trainer's default, which pyreft's recipes use). torch's AdamW default
    # 0.01 silently kills LoReFT after one step: the orthogonal (householder) parametrization
    # keeps R's column signs as +-1 on the diagonal of `original` and reads them with .int(), so
    # decay to 0.99996 makes R == 0 and the intervention an identity from then on.
    opt = torch.optim.AdamW(reft.get_trainable_parameters(), lr=LR, weight_decay=0.0)

    def step(batch):
        b = tensors(batch)
        _, cf = reft(
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
            unit_locations=unit_locations(batch),
            labels=b["labels"],
        )
        cf.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return cf.loss.item()

    return train_loop(step, data, args)


def part_train_floor(model, data, args) -> dict:
    # Identity edit: h + p with p = 0 at every position of the chosen layers. Gradients must flow
    # from the loss back to layer 3, exactly as for LoReFT, but the edit itself costs ~nothing.
    params = [torch.nn.Parameter(torch.zeros(model.config.hidden_size)) for _ in LAYERS]

    def hook_for(p):
        def hook(module, inputs, output):  # 4.45 Llama layers return a tuple
            return (output[0] + p,) + tuple(output[1:])

        return hook

    for layer, p in zip(LAYERS, params):
        model.model.layers[layer].register_forward_hook(hook_for(p))
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step(batch):
        out = model(**tensors(batch))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return train_loop(step, data, args)


def part_forward(model, data, args) -> dict:
    reft = reft_model_for(model)
    batch = data["forward"]
    b = tensors(batch, ("input_ids", "attention_mask"))
    locs = unit_locations(batch)
    rss0 = reset_peak()
    with torch.no_grad():  # interleaved, so machine drift hits both alike
        r = interleave({"hf": lambda: model(**b), "pyreft": lambda: reft(b, unit_locations=locs)}, args.reps, warmup=2)
    plain, withreft = r.times["hf"], r.times["pyreft"]
    return dict(
        shape=list(b["input_ids"].shape),
        hf_s_median=statistics.median(plain),
        pyreft_s_median=statistics.median(withreft),
        hf_s=plain,
        pyreft_s=withreft,
        paired_ratio_median=compare(plain, withreft).paired,
        peak_rss_delta_mb=rss_mb("VmHWM") - rss0,
    )


def part_generate(model, data, args) -> dict:
    reft = reft_model_for(model)
    batch = data["generate"]
    b = tensors(batch, ("input_ids", "attention_mask"))
    n_prompt = b["input_ids"].shape[1]
    # eos_token_id=None: always 32 new tokens, so both sides time the same amount of work.
    kw = dict(
        max_new_tokens=args.new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=data["meta"]["pad_token_id"],
        eos_token_id=None,
    )
    arms = {
        "hf": lambda: model.generate(**b, **kw),
        # intervene_on_prompt=True: the f5+l5 positions index the prompt; the hook is then
        # a no-op on the cached one-token steps.
        "pyreft": lambda: reft.generate(b, unit_locations=unit_locations(batch), intervene_on_prompt=True, **kw)[1],
    }
    with torch.no_grad():
        r = interleave(arms, args.gen_reps, warmup=1, keep="last")
    plain, withreft = r.times["hf"], r.times["pyreft"]
    g_hf, g_reft = r.results["hf"][-1], r.results["pyreft"][-1]
    return dict(
        new_tokens=args.new_tokens,
        hf_s_median=statistics.median(plain),
        pyreft_s_median=statistics.median(withreft),
        hf_s=plain,
        pyreft_s=withreft,
        hf_ids=g_hf[:, n_prompt:].tolist(),
        pyreft_ids=g_reft[:, n_prompt:].tolist(),
    )


def run_part(part: str, args) -> dict:
    data = json.load(open(args.batches))
    model = load_model(args.model_dir)
    return globals()[f"part_{part}"](model, data, args)


# ---------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="folder from smollm2_for_hf445.py")
    ap.add_argument("--batches", required=True, help="JSON from make_batches.py")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10, help="timed forward repetitions")
    ap.add_argument("--gen-reps", type=int, default=3, help="timed generate repetitions (after 1 warm-up)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    ap.add_argument("--only", choices=PARTS, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--init-weights", default=None, help="save pyreft's initial LoReFT weights here (torch.save)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.only:
        print(json.dumps(run_part(args.only, args)))
        return

    import platform
    from importlib.metadata import version

    result = dict(
        versions={p: version(p) for p in ("torch", "transformers", "pyreft", "pyvene")}
        | {"python": platform.python_version()},
        machine=machine(),
        setup=dict(
            layers=LAYERS,
            component="block_output",
            rank=RANK,
            positions="f5+l5 tied",
            lr=LR,
            optimizer="AdamW",
            weight_decay=0.0,
            dtype="float32",
            steps=args.steps,
            warmup=args.warmup,
            reps=args.reps,
            gen_reps=args.gen_reps,
            memory="VmHWM-VmRSS via /proc/self/clear_refs, fresh process per part",
        ),
    )
    child = [
        sys.executable,
        os.path.abspath(__file__),
        "--model-dir",
        args.model_dir,
        "--batches",
        args.batches,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--reps",
        str(args.reps),
        "--gen-reps",
        str(args.gen_reps),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
    ]
    if args.init_weights:
        child += ["--init-weights", args.init_weights]
    result["loadavg_before"] = os.getloadavg()  # other work on the machine skews timings
    for part in args.parts:
        t = time.perf_counter()
        proc = subprocess.run(child + ["--only", part], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"part {part} failed")
        result[part] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"# {part}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    result["loadavg_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
