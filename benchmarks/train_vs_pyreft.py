"""reftlens vs pyreft 0.1.0 vs a plain-transformers floor, side by side on SmolLM2-135M-Instruct.

One command runs everything and prints Markdown tables (and writes a JSON):

    python3 benchmarks/train_vs_pyreft.py                 # full run, ~5 min on 2 cores
    python3 benchmarks/train_vs_pyreft.py --quick         # smoke test, few steps

Needs the pyreft venv (``bash benchmarks/peers/setup_pyreft_env.sh``, default
``.bench/venv-pyreft`` in the repository). The 4.45-readable model folder and the batches file are made in
``--workdir`` when missing (``peers/smollm2_for_hf445.py``, ``peers/make_batches.py``).

Setup (both sides): LoReFT rank 4 at layers 3;9;18;24 (resid_post = pyreft's block_output), the
first and last five prompt tokens, fp32, AdamW(lr 4e-3, weight_decay 0), 2 torch threads, the
identical token-id batches of ``batches.json`` (8 chat prompts + responses, left padded, loss on
the response tokens).

Parts (each in a fresh child process of this script, so peak RSS is its own):
  pyreft    ``peers/pyreft_bench.py`` in its venv: pyreft train step, its 4.45 floor, generation,
            initial losses, and its seed-0 random init saved for the parity part
  time      reftlens step vs the plain-HF 5.24 floor (default attention = sdpa) vs the same floor
            with eager attention (what the TransformerLens bridge computes), interleaved with a
            rotating order so drift hits all arms; same batches, same optimizer
  mem_*     peak RSS delta (VmHWM - RSS after /proc/self/clear_refs, reset once the model is
            loaded) over warm-up + a few training steps: reftlens, floor, floor (eager)
  generate  greedy 32 new tokens with KV cache on 8 left-padded chat prompts (EOS does not stop):
            reftlens ``reft.generate`` vs plain HF ``model.generate``, interleaved
  parity    pyreft's random init loaded into four reftlens LoReFTs (one per layer, as pyreft is
            untied across layers): batch-0 loss, per-example losses and generated ids vs pyreft's
  bf16      reftlens step under ``torch.autocast("cpu", bfloat16)`` (= ``train(precision="bf16")``)
            vs fp32, interleaved, same init and batches; losses per step and after training

The floor is the cost any ReFT pays: a zero-initialised trainable vector added to the output of
the same four decoder layers (an identity edit), so the backward pass reaches layer 3 as with
LoReFT. Timings are medians; "paired" ratios are medians of per-iteration ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from common import (
    add_load_argument,
    compare,
    headline,
    interleave,
    load1,
    machine,
    machine_line,
    peak_rss,
    versions,
    wait_for_load,
)
from floor import add_zero_vectors, causal_lm_loss, hf_greedy, loss_step
from floor import floor_step as shared_floor_step
from floor import reft_step as shared_reft_step

REPO = Path(__file__).resolve().parent.parent  # defaults live inside the repository (.bench/ is git-ignored)

HERE = Path(__file__).resolve().parent
LAYERS = [3, 9, 18, 24]
RANK = 4
LR = 4e-3
D_MODEL = 576
PARTS = ["pyreft", "time", "mem_reftlens", "mem_floor", "mem_floor_eager", "generate", "parity", "bf16"]


# ---------------------------------------------------------------- helpers


def batch_tensors(batch: dict) -> dict:
    """Token-id batch from batches.json -> tensors, plus the prompt mask reftlens needs.

    Rows are left padded: row i has ``T - sum(mask_i)`` pads, then ``prompt_lengths[i]`` prompt
    tokens, then the response. ``prompt_mask`` is 1 on the prompt tokens, so "f5+l5" resolves
    to the same absolute positions as pyreft's ``intervention_locations`` (checked here).
    """
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    out = dict(input_ids=ids, attention_mask=mask)
    if "labels" in batch:
        out["labels"] = torch.tensor(batch["labels"])
    plens = batch.get("prompt_lengths")
    T = ids.shape[1]
    pm = torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        pad = T - int(mask[i].sum())
        assert bool(mask[i, pad:].all()), "batches must be left padded"
        n = plens[i] if plens is not None else T - pad
        pm[i, pad : pad + n] = 1
        want = list(range(pad, pad + 5)) + list(range(pad + n - 5, pad + n))
        assert batch["intervention_locations"][i][0] == want, (i, batch["intervention_locations"][i][0], want)
    out["prompt_mask"] = pm
    return out


def right_padded(b: dict) -> dict:
    """The same rows with the padding moved to the right (reftlens.training.collate's layout)."""
    order = torch.argsort(1 - b["attention_mask"], dim=1, stable=True)  # real tokens first, in order
    return {k: torch.gather(v, 1, order) for k, v in b.items()}


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(lg.transpose(1, 2), lb, ignore_index=-100, reduction="none")
    m = (lb != -100).float()
    return ((nll * m).sum(1) / m.sum(1)).tolist()


def touch(model: torch.nn.Module) -> None:
    """Page in every weight (they may be mmap'ed), so first-use faults are not training memory."""
    with torch.no_grad():
        sum(float(p.float().sum()) for p in model.parameters())


def load_bridge():
    import reftlens

    model = reftlens.load_model("smollm2-135m")
    touch(model)
    return model


def reft_tied(model):
    from reftlens import Intervention, LoReFT, ReftModel

    torch.manual_seed(0)
    return ReftModel(model, Intervention(LoReFT(D_MODEL, RANK), layers=LAYERS, positions="f5+l5"))


def load_floor(attn: str | None = None):
    """Plain transformers model (no TransformerLens) + a zero-initialised additive vector per layer."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import reftlens.models

    hf_logging.disable_progress_bar()
    kw = {"attn_implementation": attn} if attn else {}
    hf = AutoModelForCausalLM.from_pretrained(reftlens.models.smollm2_dir(), dtype=torch.float32, **kw)
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    touch(hf)
    params, _ = add_zero_vectors(hf, LAYERS)
    return hf, params


def bridge_floor():
    """The floor on the TransformerLens bridge itself: the same zero vectors added at
    blocks.L.hook_resid_post by plain torch forward hooks (no reftlens code in the step)."""
    bridge = load_bridge()
    for p in bridge.parameters():
        p.requires_grad_(False)
    params = [torch.nn.Parameter(torch.zeros(D_MODEL)) for _ in LAYERS]
    for layer, p in zip(LAYERS, params):
        bridge.blocks[layer].hook_resid_post.register_forward_hook(lambda m, i, o, p=p: o + p)
    return loss_step(lambda b: bridge(b["input_ids"], attention_mask=b["attention_mask"]), params, LR)


def reft_step(reft, autocast: bool = False):
    """reftlens.train's step (``floor.reft_step``) at this benchmark's learning rate."""
    return shared_reft_step(reft, LR, autocast)


def floor_step(hf, params):
    """The plain-transformers floor's step (``floor.floor_step``) at this benchmark's learning rate."""
    return shared_floor_step(hf, params, LR)


def paired(a: list[float], b: list[float]) -> float:
    return compare(a, b).paired


# ---------------------------------------------------------------- parts (fresh processes)


def part_time(data, args) -> dict:
    batches = [batch_tensors(b) for b in data["train"]]
    model = load_bridge()
    reft = reft_tied(model)
    arms = {"reftlens": reft_step(reft)}
    hf, params = load_floor()
    arms["floor"] = floor_step(hf, params)
    if not args.no_eager:
        hf_e, params_e = load_floor("eager")
        arms["floor_eager"] = floor_step(hf_e, params_e)
    if not args.no_bridge_floor:
        arms["floor_bridge"] = bridge_floor()
    r = interleave(arms, args.steps, warmup=args.warmup, inputs=batches, keep="all")  # the same batch each rep
    t = r.times
    out = dict(
        step_s_median={n: statistics.median(v) for n, v in t.items()},
        step_s=t,
        losses=r.results,
        n_trainable=reft.num_trainable_parameters(),
        floor_attn=hf.config._attn_implementation,
        paired_ratio_reftlens_over_floor=paired(t["floor"], t["reftlens"]),
    )
    if "floor_eager" in t:
        out["paired_ratio_reftlens_over_floor_eager"] = paired(t["floor_eager"], t["reftlens"])
        out["paired_ratio_floor_eager_over_floor"] = paired(t["floor"], t["floor_eager"])
    if "floor_bridge" in t:
        out["paired_ratio_floor_bridge_over_floor"] = paired(t["floor"], t["floor_bridge"])
        out["paired_ratio_reftlens_over_floor_bridge"] = paired(t["floor_bridge"], t["reftlens"])
    return out


def mem_loop(step, batches, args) -> dict:
    m = peak_rss(lambda: [step(batches[i % len(batches)]) for i in range(args.mem_steps)])  # warm-up included
    return dict(
        rss_before_mb=m["rss_before_mb"],
        peak_rss_mb=m["peak_rss_mb"],
        peak_rss_delta_mb=m["peak_rss_delta_mb"],
        steps=args.mem_steps,
        losses=m["result"],
    )


def part_mem_reftlens(data, args) -> dict:
    batches = [batch_tensors(b) for b in data["train"]]
    return mem_loop(reft_step(reft_tied(load_bridge())), batches, args)


def part_mem_floor(data, args) -> dict:
    batches = [batch_tensors(b) for b in data["train"]]
    return mem_loop(floor_step(*load_floor()), batches, args)


def part_mem_floor_eager(data, args) -> dict:
    batches = [batch_tensors(b) for b in data["train"]]
    return mem_loop(floor_step(*load_floor("eager")), batches, args)


def part_generate(data, args) -> dict:
    g = batch_tensors(data["generate"])
    ids, mask = g["input_ids"], g["attention_mask"]
    n = ids.shape[1]
    pad = data["meta"]["pad_token_id"]
    reft = reft_tied(load_bridge())
    hf, _ = load_floor()
    outs = {}

    def run_reft(k: int):
        outs[f"reftlens_{k}"] = reft.generate(ids, k, attention_mask=mask, eos_token_id=None)[:, n:]

    def run_hf(k: int):
        outs[f"hf_{k}"] = hf_greedy(hf, ids, mask, k, pad)  # EOS does not stop it: exactly k tokens

    k = args.new_tokens
    # 1-token runs (prefill + one argmax) split the time into prompt and per-token decode cost
    arms = {
        "reftlens": lambda _: run_reft(k),
        "hf": lambda _: run_hf(k),
        "reftlens_1": lambda _: run_reft(1),
        "hf_1": lambda _: run_hf(1),
    }
    r = interleave(arms, args.gen_reps, warmup=1, inputs=[None])
    t = r.times
    med = {a: statistics.median(v) for a, v in t.items()}
    assert outs[f"reftlens_{k}"].shape[1] == outs[f"hf_{k}"].shape[1] == k
    return dict(
        new_tokens=k,
        s_median=med,
        s=t,
        paired_ratio_reftlens_over_hf=paired(t["hf"], t["reftlens"]),
        decode_ms_per_token={a: 1e3 * (med[a] - med[f"{a}_1"]) / (k - 1) for a in ("reftlens", "hf")},
        reftlens_ids=outs[f"reftlens_{k}"].tolist(),
        hf_ids=outs[f"hf_{k}"].tolist(),
    )


def part_parity(data, args) -> dict:
    from reftlens import Intervention, LoReFT, ReftModel

    model = load_bridge()
    b = batch_tensors(data["train"][0])
    g = batch_tensors(data["generate"])
    n = g["input_ids"].shape[1]
    init = torch.load(args.init_weights, weights_only=True)
    ivs, r_err = [], 0.0
    for layer in LAYERS:
        w = init[layer] if layer in init else init[str(layer)]
        phi = LoReFT(D_MODEL, RANK, init="random")
        with torch.no_grad():
            phi.R.set_(w["R"].T.float())  # pyreft: R [d, r] with orthonormal columns; reftlens: rows [r, d]
            phi.W.weight.copy_(w["W"])
            phi.W.bias.copy_(w["b"])
        r_err = max(r_err, float((phi.R.weight.detach() - w["R"].T).abs().max()))
        ivs.append(Intervention(phi, layers=layer, positions="f5+l5"))
    loaded = ReftModel(model, ivs).eval()
    identity = reft_tied(model).eval()
    with torch.no_grad():
        kw = dict(attention_mask=b["attention_mask"], prompt_mask=b["prompt_mask"])
        lg_loaded = loaded(b["input_ids"], **kw)
        lg_ident = identity(b["input_ids"], **kw)
        lg_base = model(b["input_ids"], attention_mask=b["attention_mask"])
    gen = loaded.generate(g["input_ids"], args.new_tokens, attention_mask=g["attention_mask"], eos_token_id=None)[:, n:]
    return dict(
        R_max_abs_err=r_err,
        n_trainable=loaded.num_trainable_parameters(),
        loaded_loss=causal_lm_loss(lg_loaded, b["labels"]).item(),
        loaded_per_example=per_example_loss(lg_loaded, b["labels"]),
        identity_loss=causal_lm_loss(lg_ident, b["labels"]).item(),
        identity_per_example=per_example_loss(lg_ident, b["labels"]),
        base_loss=causal_lm_loss(lg_base, b["labels"]).item(),
        identity_vs_base_max_abs_logit=float((lg_ident - lg_base).abs().max()),
        loaded_ids=gen.tolist(),
    )


def part_bf16(data, args) -> dict:
    """fp32 vs bf16 autocast. Batches are right padded here, as reftlens.train pads them: under
    bf16 autocast TransformerLens 4.3's eager attention casts HF's fp32 mask sentinel
    (finfo(float32).min) to bf16, where it overflows to -inf, so the fully masked query rows of
    left padding softmax to NaN (recorded below as left_padded_bf16_loss)."""
    import copy

    left = [batch_tensors(b) for b in data["train"]]
    batches = [right_padded(b) for b in left]
    model = load_bridge()
    r32 = reft_tied(model)
    r16 = copy.deepcopy(r32)  # same initial Φ (identity init); the model is not a submodule

    def eval_loss(reft, bf16: bool, b=batches[0]) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            lg = reft(b["input_ids"], attention_mask=b["attention_mask"], prompt_mask=b["prompt_mask"])
        return causal_lm_loss(lg, b["labels"]).item()

    init = dict(fp32=eval_loss(r32, False), bf16=eval_loss(r32, True))
    left_nan = dict(fp32=eval_loss(r32, False, left[0]), bf16=eval_loss(r32, True, left[0]))
    r = interleave(
        {"fp32": reft_step(r32), "bf16": reft_step(r16, autocast=True)},
        args.bf16_steps,
        warmup=args.bf16_warmup,
        inputs=batches,
        keep="all",
    )
    t = r.times
    r32.eval(), r16.eval()
    after = dict(fp32_trained=eval_loss(r32, False), bf16_trained=eval_loss(r16, False))
    with torch.no_grad():
        dphi = max(float((a - c).abs().max()) for a, c in zip(r32.parameters(), r16.parameters()))
    return dict(
        s_median={k: statistics.median(v) for k, v in t.items()},
        s=t,
        paired_ratio_bf16_over_fp32=paired(t["fp32"], t["bf16"]),
        losses=r.results,
        max_abs_step_loss_diff=max(abs(x - y) for x, y in zip(r.results["fp32"], r.results["bf16"])),
        init_loss_batch0=init,
        after_loss_batch0_fp32_eval=after,
        max_abs_param_diff_after=dphi,
        left_padded_loss_batch0=left_nan,
        steps_total=args.bf16_warmup + args.bf16_steps,
        padding="right",
    )


# ---------------------------------------------------------------- driver


def ensure_inputs(args) -> None:
    wd = Path(args.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    if not (Path(args.model_dir_445) / "config.json").is_file():
        sys.path.insert(0, str(HERE / "peers"))
        from smollm2_for_hf445 import convert

        import reftlens.models

        convert(reftlens.models.smollm2_dir(), Path(args.model_dir_445))
    if not Path(args.batches).is_file():
        subprocess.run([sys.executable, str(HERE / "peers" / "make_batches.py"), args.batches], check=True)


def run_child(part: str, args, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", part]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"part {part} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_pyreft(args) -> dict:
    py = Path(args.pyreft_venv) / "bin" / "python"
    out = Path(args.workdir) / "train_vs_pyreft.pyreft.json"
    cmd = [
        str(py),
        str(HERE / "peers" / "pyreft_bench.py"),
        "--model-dir",
        args.model_dir_445,
        "--batches",
        args.batches,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--gen-reps",
        str(args.gen_reps),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--parts",
        "losses",
        "train_pyreft",
        "train_floor",
        "generate",
        "--init-weights",
        args.init_weights,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit("pyreft side failed")
    return json.loads(out.read_text())


def f3(x: float) -> str:
    return f"{x:.3f}"


def headlines(res: dict) -> None:
    """The headline ratios, one machine-readable line each (collected by report.py)."""
    name = "train_vs_pyreft"
    t, p, gd, bf = res.get("time"), res.get("pyreft"), res.get("generate"), res.get("bf16")
    if t:
        s = t["step_s_median"]
        r = s["reftlens"] / s["floor"]
        headline(
            name,
            "training step: reftlens / plain-HF floor (sdpa)",
            r,
            target="≤ 1.02×",
            met=r <= 1.02,
            peer="plain transformers + identity edit",
            note=f"paired {t['paired_ratio_reftlens_over_floor']:.3f}×",
        )
        if p:
            pt, pf = p["train_pyreft"]["step_s_median"], p["train_floor"]["step_s_median"]
            headline(name, "training step: pyreft / its floor (4.45)", pt / pf, peer="pyreft 0.1.0")
            headline(
                name,
                "training step: reftlens / pyreft",
                s["reftlens"] / pt,
                peer="pyreft 0.1.0",
                note="different processes and transformers versions",
            )
    fl = res.get("mem_floor", {}).get("peak_rss_delta_mb")
    if fl and "mem_reftlens" in res:
        r = res["mem_reftlens"]["peak_rss_delta_mb"] / fl
        headline(
            name,
            "peak training memory: reftlens / floor",
            r,
            target="≤ 1.05×",
            met=r <= 1.05,
            peer="plain transformers",
        )
    if gd:
        s = gd["s_median"]
        r = s["reftlens"] / s["hf"]
        headline(
            name,
            f"greedy generation ({gd['new_tokens']} tokens): reftlens / HF generate",
            r,
            target="≤ 1.02×",
            met=r <= 1.02,
            peer="transformers generate",
            note=f"ids identical: {gd['reftlens_ids'] == gd['hf_ids']}",
        )
    if bf:
        s = bf["s_median"]
        headline(
            name,
            "bf16 autocast / fp32 step time",
            s["bf16"] / s["fp32"],
            note=f"max |Δloss| {bf['max_abs_step_loss_diff']:.4f}",
        )


def report(res: dict) -> str:
    L = []
    m, v = res["machine"], res["versions"]
    L.append("# reftlens vs pyreft vs plain transformers: SmolLM2-135M-Instruct, LoReFT r4 @ 3;9;18;24, f5+l5, fp32")
    L.append(f"# command: {res['command']}")
    L.append(f"# machine: {machine_line(m)}")
    L.append("# main env: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if "pyreft" in res:
        pv = res["pyreft"]["versions"]
        L.append("# pyreft venv: " + ", ".join(f"{k} {x}" for k, x in pv.items()))
    L.append(
        "# load average (1 min) at the start of each part: "
        + ", ".join(f"{k} {x:.2f}" for k, x in res["load1_before_part"].items())
    )
    L.append(f"# quick: {res['quick']}; {res['setup']}")
    L.append("")

    t = res.get("time")
    p = res.get("pyreft")
    if t:
        s = t["step_s_median"]
        L.append("## Training step (forward + backward + AdamW), 8 chat examples per batch, same batches")
        L.append("")
        L.append(
            "| implementation | transformers | attention | trainable params | median s/step | vs its floor (median ratio) | vs its floor (paired) |"
        )
        L.append("|---|---|---|---|---|---|---|")
        L.append(
            f"| reftlens (TransformerLens bridge) | {res['versions']['transformers']} | eager (bridge) | {t['n_trainable']:,} | {f3(s['reftlens'])} | "
            f"{s['reftlens'] / s['floor']:.3f}× | {t['paired_ratio_reftlens_over_floor']:.3f}× |"
        )
        L.append(
            f"| floor: plain HF + zero vector | {res['versions']['transformers']} | {t['floor_attn']} | 2,304 | {f3(s['floor'])} | 1 | 1 |"
        )
        if "floor_eager" in s:
            L.append(
                f"| floor: plain HF + zero vector | {res['versions']['transformers']} | eager | 2,304 | {f3(s['floor_eager'])} | "
                f"{s['floor_eager'] / s['floor']:.3f}× | {t['paired_ratio_floor_eager_over_floor']:.3f}× |"
            )
        if "floor_bridge" in s:
            L.append(
                f"| floor on the TransformerLens bridge + zero vector | {res['versions']['transformers']} | eager (bridge) | 2,304 | "
                f"{f3(s['floor_bridge'])} | {s['floor_bridge'] / s['floor']:.3f}× | {t['paired_ratio_floor_bridge_over_floor']:.3f}× |"
            )
        if p:
            pt, pf = p["train_pyreft"]["step_s_median"], p["train_floor"]["step_s_median"]
            L.append(
                f"| pyreft 0.1.0 (pyvene 0.1.8) | 4.45.1 | sdpa | {p['losses']['n_trainable']:,} | {f3(pt)} | {pt / pf:.3f}× | |"
            )
            L.append(f"| floor: plain HF + zero vector | 4.45.1 | sdpa | 2,304 | {f3(pf)} | 1 | |")
        L.append("")
        L.append(
            f"reftlens / floor (5.24, sdpa): **{s['reftlens'] / s['floor']:.3f}×** (paired {t['paired_ratio_reftlens_over_floor']:.3f}×; target ≤ 1.02×)"
        )
        if "floor_eager" in s:
            L.append(
                f"reftlens / floor (5.24, eager): {s['reftlens'] / s['floor_eager']:.3f}× (paired {t['paired_ratio_reftlens_over_floor_eager']:.3f}×)"
            )
        if "floor_bridge" in s:
            L.append(
                f"reftlens / floor on the bridge: {s['reftlens'] / s['floor_bridge']:.3f}× (paired {t['paired_ratio_reftlens_over_floor_bridge']:.3f}×): "
                "the part of the gap that is reftlens's own"
            )
        if p:
            L.append(
                f"pyreft / floor (4.45): {pt / pf:.3f}×; reftlens / pyreft: **{s['reftlens'] / pt:.3f}×**"
                f" (different processes and transformers versions: compare the floor-relative ratios)"
            )
        L.append(f"measured steps per arm: {len(t['step_s']['reftlens'])} (after {res['setup']['warmup']} warm-up)")
        L.append("")

    if any(k in res for k in ("mem_reftlens", "mem_floor")):
        L.append(
            "## Peak memory during training (fresh process each; RSS peak over warm-up + steps, minus RSS after loading)"
        )
        L.append("")
        L.append("| implementation | steps | RSS after load (MB) | peak delta (MB) | vs its floor |")
        L.append("|---|---|---|---|---|")
        fl = res.get("mem_floor", {}).get("peak_rss_delta_mb")
        for key, name in (
            ("mem_reftlens", "reftlens"),
            ("mem_floor", "floor 5.24 (sdpa)"),
            ("mem_floor_eager", "floor 5.24 (eager)"),
        ):
            if key in res:
                r = res[key]
                ratio = f"{r['peak_rss_delta_mb'] / fl:.3f}×" if fl else ""
                L.append(
                    f"| {name} | {r['steps']} | {r['rss_before_mb']:.0f} | {r['peak_rss_delta_mb']:.0f} | {ratio} |"
                )
        if p:
            pt, pf = p["train_pyreft"], p["train_floor"]
            n = len(pt["step_s"]) + res["setup"]["warmup"]
            L.append(
                f"| pyreft 0.1.0 | {n} | {pt['rss_before_mb']:.0f} | {pt['peak_rss_delta_mb']:.0f} | "
                f"{pt['peak_rss_delta_mb'] / pf['peak_rss_delta_mb']:.3f}× |"
            )
            L.append(f"| floor 4.45 (sdpa) | {n} | {pf['rss_before_mb']:.0f} | {pf['peak_rss_delta_mb']:.0f} | 1 |")
        if fl and "mem_reftlens" in res:
            L.append("")
            L.append(f"reftlens / floor: **{res['mem_reftlens']['peak_rss_delta_mb'] / fl:.3f}×** (target ≤ 1.05×)")
        L.append("")

    gd = res.get("generate")
    if gd:
        s = gd["s_median"]
        L.append(f"## Greedy generation, {gd['new_tokens']} new tokens, KV cache, 8 left-padded chat prompts")
        L.append("")
        L.append("| implementation | median s | vs plain HF generate |")
        L.append("|---|---|---|")
        L.append(
            f"| reftlens `reft.generate` (identity LoReFT set) | {f3(s['reftlens'])} | {s['reftlens'] / s['hf']:.3f}× (paired {gd['paired_ratio_reftlens_over_hf']:.3f}×) |"
        )
        L.append(f"| plain HF 5.24 `model.generate` (sdpa) | {f3(s['hf'])} | 1 |")
        L.append(f"| reftlens, 1 new token (prefill) | {f3(s['reftlens_1'])} | {s['reftlens_1'] / s['hf_1']:.3f}× |")
        L.append(f"| plain HF 5.24, 1 new token (prefill) | {f3(s['hf_1'])} | 1 |")
        if p:
            pg = p["generate"]
            L.append(
                f"| pyreft 0.1.0 `reft.generate` (random LoReFT) | {f3(pg['pyreft_s_median'])} | {pg['pyreft_s_median'] / pg['hf_s_median']:.3f}× of 4.45 |"
            )
            L.append(f"| plain HF 4.45 `model.generate` (sdpa) | {f3(pg['hf_s_median'])} | 1 |")
        L.append("")
        L.append(
            f"reftlens / HF generate: **{s['reftlens'] / s['hf']:.3f}×** (target ≤ 1.02×); reps: {len(gd['s']['hf'])} after 1 warm-up"
        )
        dm = gd["decode_ms_per_token"]
        L.append(
            f"per decoded token (batch of 8, from the 32- and 1-token runs): reftlens {dm['reftlens']:.1f} ms, HF {dm['hf']:.1f} ms"
        )
        same = gd["reftlens_ids"] == gd["hf_ids"]
        L.append(
            f"reftlens identity-set ids == HF 5.24 ids: {same}"
            + (f"; == HF 4.45 ids (pyreft JSON): {gd['reftlens_ids'] == p['generate']['hf_ids']}" if p else "")
        )
        L.append("")

    par = res.get("parity")
    if par and p:
        pl = p["losses"]
        dl = abs(par["loaded_loss"] - pl["pyreft_init_loss"])
        dpe = max(abs(a - b) for a, b in zip(par["loaded_per_example"], pl["pyreft_init_per_example"]))
        ids_same = par["loaded_ids"] == p["generate"]["pyreft_ids"]
        n_rows_same = sum(a == b for a, b in zip(par["loaded_ids"], p["generate"]["pyreft_ids"]))
        L.append("## Parity: pyreft's random init loaded into reftlens (four LoReFTs, one per layer)")
        L.append("")
        L.append("| quantity | reftlens | pyreft | abs diff |")
        L.append("|---|---|---|---|")
        L.append(
            f"| batch-0 loss, pyreft's init | {par['loaded_loss']:.6f} | {pl['pyreft_init_loss']:.6f} | {dl:.1e} |"
        )
        L.append(f"| per-example loss (8), max diff | | | {dpe:.1e} |")
        L.append(
            f"| batch-0 loss, no intervention | {par['base_loss']:.6f} | {pl['base_loss']:.6f} | {abs(par['base_loss'] - pl['base_loss']):.1e} |"
        )
        L.append(f"| greedy ids (8 × {len(par['loaded_ids'][0])}), rows identical | {n_rows_same}/8 | | |")
        L.append(f"| trainable params | {par['n_trainable']:,} | {pl['n_trainable']:,} | |")
        L.append("")
        ok = dl < 1e-4 and dpe < 1e-4 and ids_same
        L.append(
            f"parity: **{'PASS' if ok else 'FAIL'}** (loss within 1e-4 and identical ids); R loaded to {par['R_max_abs_err']:.1e}"
        )
        L.append("")
        L.append("## Initial loss (batch 0)")
        L.append("")
        L.append("| init | loss |")
        L.append("|---|---|")
        L.append(f"| reftlens identity init (W = R, b = 0) | {par['identity_loss']:.6f} |")
        L.append(f"| no intervention (plain bridge) | {par['base_loss']:.6f} |")
        L.append(f"| pyreft 0.1.0 random init (seed 0) | {pl['pyreft_init_loss']:.6f} |")
        L.append("")
        L.append(f"identity set vs plain bridge: max |Δlogit| {par['identity_vs_base_max_abs_logit']:.1e}")
        L.append("")

    bf = res.get("bf16")
    if bf:
        s = bf["s_median"]
        L.append("## bf16 autocast vs fp32 (reftlens, same init, same batches, interleaved)")
        L.append("")
        L.append(
            "| precision | median s/step | loss at init (batch 0) | per-step losses | batch-0 loss after training (fp32 eval) |"
        )
        L.append("|---|---|---|---|---|")
        for k in ("fp32", "bf16"):
            L.append(
                f"| {k} | {f3(s[k])} | {bf['init_loss_batch0'][k]:.4f} | {', '.join(f'{x:.3f}' for x in bf['losses'][k])} | "
                f"{bf['after_loss_batch0_fp32_eval'][k + '_trained']:.4f} |"
            )
        L.append("")
        L.append(
            f"bf16 / fp32 step time: {s['bf16'] / s['fp32']:.3f}× (paired {bf['paired_ratio_bf16_over_fp32']:.3f}×); "
            f"max |Δloss| over measured steps {bf['max_abs_step_loss_diff']:.4f}; after {bf['steps_total']} steps "
            f"max |Δparam| {bf['max_abs_param_diff_after']:.1e}"
        )
        lp = bf["left_padded_loss_batch0"]
        L.append(
            f"batches right padded (as `reftlens.train` pads them). The same batch left padded: fp32 loss {lp['fp32']:.4f}, "
            f"bf16-autocast loss {lp['bf16']:.4f} (TransformerLens 4.3 casts the fp32 mask sentinel to bf16 = -inf: "
            "fully masked pad rows give NaN)"
        )
        L.append("")
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps: a smoke test, not numbers")
    ap.add_argument("--workdir", default=str(REPO / ".bench" / "work"))
    ap.add_argument("--out", default=None, help="JSON output (default WORKDIR/train_vs_pyreft.json)")
    ap.add_argument("--batches", default=None, help="default WORKDIR/batches.json (made when missing)")
    ap.add_argument("--model-dir-445", default=None, help="default WORKDIR/smollm2-hf445 (made when missing)")
    ap.add_argument("--pyreft-venv", default=os.environ.get("PYREFT_VENV", str(REPO / ".bench" / "venv-pyreft")))
    ap.add_argument("--pyreft-json", default=None, help="reuse a pyreft_bench.py JSON instead of running pyreft")
    ap.add_argument(
        "--init-weights", default=None, help="pyreft's init (default WORKDIR/train_vs_pyreft.pyreft_init.pt)"
    )
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    ap.add_argument("--steps", type=int, default=12, help="measured training steps per arm")
    ap.add_argument("--warmup", type=int, default=4, help="warm-up iterations (4 = every batch shape once)")
    ap.add_argument("--mem-steps", type=int, default=5, help="training steps in each memory process")
    ap.add_argument("--gen-reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bf16-steps", type=int, default=8)
    ap.add_argument("--bf16-warmup", type=int, default=4)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager-attention floor")
    ap.add_argument("--no-bridge-floor", action="store_true", help="skip the floor on the TransformerLens bridge")
    ap.add_argument("--threads", type=int, default=2)
    add_load_argument(ap)
    ap.add_argument("--only", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--report", default=None, help="print the tables of an earlier JSON and exit")
    args = ap.parse_args()
    wd = Path(args.workdir)
    args.batches = args.batches or str(wd / "batches.json")
    args.model_dir_445 = args.model_dir_445 or str(wd / "smollm2-hf445")
    args.init_weights = args.init_weights or str(wd / "train_vs_pyreft.pyreft_init.pt")
    args.out = args.out or str(wd / "train_vs_pyreft.json")
    if args.quick:
        args.steps, args.warmup, args.mem_steps, args.gen_reps, args.bf16_steps, args.bf16_warmup = 2, 1, 2, 1, 2, 1
    torch.set_num_threads(args.threads)

    if args.report:
        res = json.loads(Path(args.report).read_text())
        print(report(res))
        headlines(res)
        return
    if args.only:
        data = json.load(open(args.batches))
        print(json.dumps(globals()[f"part_{args.only}"](data, args)))
        return

    ensure_inputs(args)
    argv = (
        [
            "--workdir",
            args.workdir,
            "--batches",
            args.batches,
            "--init-weights",
            args.init_weights,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--mem-steps",
            str(args.mem_steps),
            "--gen-reps",
            str(args.gen_reps),
            "--new-tokens",
            str(args.new_tokens),
            "--bf16-steps",
            str(args.bf16_steps),
            "--bf16-warmup",
            str(args.bf16_warmup),
            "--threads",
            str(args.threads),
        ]
        + (["--no-eager"] if args.no_eager else [])
        + (["--no-bridge-floor"] if args.no_bridge_floor else [])
    )
    res = dict(
        command=" ".join(
            shlex.quote(a)
            for a in [os.path.relpath(sys.argv[0]) if not sys.argv[0].startswith("/") else sys.argv[0], *sys.argv[1:]]
        ),
        machine=machine(),
        versions=versions(),
        quick=args.quick,
        setup=dict(
            layers=LAYERS,
            rank=RANK,
            positions="f5+l5 (prompt)",
            lr=LR,
            weight_decay=0.0,
            dtype="float32",
            optimizer="AdamW",
            steps=args.steps,
            warmup=args.warmup,
            mem_steps=args.mem_steps,
            gen_reps=args.gen_reps,
            new_tokens=args.new_tokens,
            batches=args.batches,
        ),
        load1_before_part={},
        load_waits=[],
        part_wall_s={},
    )
    if "parity" in args.parts and "pyreft" not in args.parts and not args.pyreft_json:
        raise SystemExit("parity needs pyreft's init: include the pyreft part or pass --pyreft-json and --init-weights")
    if args.pyreft_json:
        res["pyreft"] = json.loads(Path(args.pyreft_json).read_text())
    # once, before the first part: later, the 1-min load average includes our own previous part
    wait_for_load(args.max_load, args.load_tries, log=res["load_waits"])
    for part in args.parts:
        res["load1_before_part"][part] = load1()
        t = time.perf_counter()
        res[part] = run_pyreft(args) if part == "pyreft" else run_child(part, args, argv)
        res["part_wall_s"][part] = round(time.perf_counter() - t, 1)
        print(
            f"# {part}: {res['part_wall_s'][part]:.0f} s (load before {res['load1_before_part'][part]:.2f})",
            file=sys.stderr,
            flush=True,
        )
    res["load1_after"] = load1()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")  # first, so a report bug loses nothing
    res["markdown"] = report(res)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(res["markdown"])
    headlines(res)
    print(f"\n(JSON: {args.out})")


if __name__ == "__main__":
    main()
