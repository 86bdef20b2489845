"""The GPU suite: parity and speed of reftlens on SmolLM2 and a ~1B model in bf16, in one run.

For each model (SmolLM2-135M-Instruct, or a random model of its shape where its weights are not on
the machine, and a random Llama-3.2-1B-shaped model from ``reftlens.models.random_model``):

- parity (max |Δlogit| over the real tokens, relative to max |logit|, within the dtype's tolerance):
  a LoReFT set's logits through the hooked path vs ``to_hf``; a mergeable set vs ``merge``; one
  row of a two-set bank vs that set alone; KV-cached generation vs recomputation (equal tokens);
- speed, as ratios measured in this run: a training step (``reftlens.train``) vs the plain floor
  (the transformers model + a zero vector at the same layers, forward + backward + AdamW);
  ``reft.generate`` vs transformers' ``generate``; ``patch_sweep`` vs ``transformer_lens.patching``;
  a bank of 256 sets (a different set per prompt) vs one set, forward and generation;
- peak GPU memory of the training step vs the floor's (above what was allocated before).

Exit status 1 when a parity check fails. Without CUDA (and ``--device cuda``, the default) it
prints a 'skipped' line and exits 0. ``--device cpu --tiny`` runs everything at tiny size in
float32 (the test suite does, so the script cannot rot). Target: under 8 minutes on one H100/H200.

First step: when TransformerLens or reftlens cannot be imported (the GPU machine has torch,
transformers and peft only, and no network), it installs the wheels in ``benchmarks/gpu_wheels/``
(built by ``bash benchmarks/make_gpu_bundle.sh``; see benchmarks/README.md).

    python benchmarks/gpu_suite.py                       # CUDA, bf16, SmolLM2 + llama-1b
    python benchmarks/gpu_suite.py --device cpu --tiny   # the CPU smoke run of the tests
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching bars: one line per sweep is noise here
HERE = Path(__file__).resolve().parent
WHEELS = HERE / "gpu_wheels"
if (HERE.parent / "reftlens" / "__init__.py").is_file():  # run from a checkout: test the source tree
    sys.path.insert(0, str(HERE.parent))
NEEDED = ("einops", "jaxtyping", "transformer_lens", "reftlens")
TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}  # max |Δlogit| / max |logit|


def bootstrap(wheels: Path = WHEELS) -> None:
    """Install the bundled wheels when a module the suite needs is missing (no network needed)."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if not missing:
        return
    found = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        raise SystemExit(
            f"gpu_suite: cannot import {', '.join(missing)} and {wheels} holds no wheels; build it on a "
            "machine with PyPI access: bash benchmarks/make_gpu_bundle.sh (see benchmarks/README.md)"
        )
    new = [w for w in found if not _installed(Path(w).name.split("-")[0])]  # never replace the image's own
    print(f"gpu_suite: installing {len(new)} wheels from {wheels} (missing: {', '.join(missing)})", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", *new])
    importlib.invalidate_caches()
    still = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("datasets") is None:
        stub_datasets()
    if still:
        raise SystemExit(f"gpu_suite: still cannot import {', '.join(still)} after installing {wheels}")


def stub_datasets() -> None:
    """TransformerLens 4.3 imports three names from ``datasets`` when it loads (for its dataset
    utilities, which neither reftlens nor this suite calls); ``datasets`` needs pyarrow (55 MB),
    which would not fit the 64 MiB bundle. Without ``datasets``, this process (only) gets
    placeholders under those names; calling them raises."""
    import types

    def unavailable(*args, **kwargs):
        raise RuntimeError("the `datasets` package is not installed here (gpu_suite placeholder)")

    root = types.ModuleType("datasets")
    for sub, names in {"arrow_dataset": ("Dataset",), "iterable_dataset": ("IterableDataset",), "load": ()}.items():
        mod = types.ModuleType(f"datasets.{sub}")
        for name in names:
            setattr(mod, name, type(name, (), {"__init__": unavailable}))
        setattr(root, sub, mod)
        sys.modules[f"datasets.{sub}"] = mod
    root.load.load_dataset = root.load_dataset = unavailable
    root.Dataset, root.IterableDataset = root.arrow_dataset.Dataset, root.iterable_dataset.IterableDataset
    sys.modules["datasets"] = root
    print("gpu_suite: `datasets` is not installed; TransformerLens gets placeholders for its dataset utilities")


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- helpers


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_diff(a, b, mask) -> float:
    real = mask.bool()
    a, b = a[real].float(), b[real].float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def hf_logits(hf, tokens, mask):
    import torch

    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as TransformerLens numbers left-padded positions
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits


def spread_layers(n: int) -> list[int]:
    return [3, 9, 18, 24] if n >= 25 else sorted({max(0, round(n * f) - 1) for f in (0.125, 0.375, 0.625, 0.875)})


def load_models(args):
    """[(label, bridge)]: SmolLM2 (real if its weights are here, else random of its shape) and llama-1b."""
    import torch

    import reftlens
    from reftlens.models import random_model

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        small = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        return [
            ("tiny-llama (stands in for SmolLM2)", reftlens.load_model("tiny-llama", device=args.device, dtype=dtype)),
            (
                "random llama-1b shape, scaled down (4 layers, d 128)",
                random_model(
                    "llama-1b", dtype=dtype, device=args.device, num_hidden_layers=4, vocab_size=4096, **small
                ),
            ),
        ]
    try:
        smol = ("SmolLM2-135M-Instruct", reftlens.load_model("smollm2-135m", device=args.device, dtype=dtype))
    except ImportError as e:  # the GGUF package is not on this machine: same shape, random weights
        print(f"# SmolLM2 weights unavailable ({str(e)[:80]}...): using random_model('smollm2-135m')")
        smol = ("random SmolLM2-135M shape", random_model("smollm2-135m", dtype=dtype, device=args.device))
    big = ("random Llama-3.2-1B shape", random_model("llama-1b", dtype=dtype, device=args.device))
    return [smol, big]


# --------------------------------------------------------------------------- parity


def parity(model, args) -> dict:
    import torch

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel

    dtype, d, layers = getattr(torch, args.dtype), model.cfg.d_model, spread_layers(model.cfg.n_layers)
    tol = TOL[args.dtype]

    def lo(seed, **kw):
        torch.manual_seed(seed)
        return LoReFT(d, 4, init="random", **kw).to(device=args.device, dtype=dtype)

    prompts = ["The capital of France is", "Once upon a time there was a", "Water boils at"]
    out: dict = {"tolerance": tol}
    reft = ReftModel(model, Intervention(lo(0), layers=layers[:2], positions="f2+l2")).eval()
    tokens, mask = reft.tokenize(prompts)
    tokens, mask = tokens.to(args.device), mask.to(args.device)
    with torch.no_grad():
        hooked, plain = reft(tokens, attention_mask=mask), model(tokens, attention_mask=mask)
    out["set edits the logits (rel)"] = rel_diff(hooked, plain, mask)
    # the two engines' own difference on the plain model (TransformerLens's eager attention vs the
    # exported model's fused kernel): in bf16 through many layers it can exceed the fixed tolerance,
    # so a comparison passes within max(tolerance, 2 × this floor)
    from reftlens.runtime.compat import fast_attention
    from reftlens.runtime.hf_backend import pristine_hf

    bare = pristine_hf(model, share=True)
    fast_attention(bare)
    out["engine floor: plain model, hooked vs transformers"] = rel_diff(hf_logits(bare, tokens, mask), plain, mask)
    tol = out["tolerance used"] = max(tol, 2 * out["engine floor: plain model, hooked vs transformers"])
    out["to_hf vs hooked"] = rel_diff(hf_logits(reftlens.to_hf(reft), tokens, mask), hooked, mask)

    mergeable = ReftModel(model, Intervention(lo(1), layers=layers[1:3], hook="mlp_out")).eval()
    with torch.no_grad():
        ref = mergeable(tokens, attention_mask=mask)
    out["merge vs hooked"] = rel_diff(hf_logits(reftlens.merge(mergeable), tokens, mask), ref, mask)

    other = Intervention(lo(2), layers=layers[:2], positions="f2+l2")
    bank = ReftModel(model, {"a": Intervention(lo(0), layers=layers[:2], positions="f2+l2"), "b": other}).eval()
    with torch.no_grad():
        rows = bank(tokens, attention_mask=mask, adapters=["a", "b", "a"])
    out["bank row vs the set alone"] = rel_diff(rows[[0, 2]], hooked[[0, 2]], mask[[0, 2]])

    kw = dict(attention_mask=mask, eos_token_id=None)
    cached = reft.generate(tokens, args.new_tokens, use_cache=True, **kw)
    fresh = reft.generate(tokens, args.new_tokens, use_cache=False, **kw)
    n = tokens.shape[1]
    out["KV cache == recomputation (tokens)"] = float((cached[:, n:] == fresh[:, n:]).float().mean())
    out["KV cache == recomputation (first new token)"] = bool(torch.equal(cached[:, n], fresh[:, n]))
    # float32: every token equal; bf16/fp16: the cached keys and values were computed in another shape,
    # so greedy decoding may part at a near-tie after the first new token (docs/concepts.md)
    cache_ok = out["KV cache == recomputation (first new token)"] and (
        args.dtype != "float32" or out["KV cache == recomputation (tokens)"] == 1.0
    )
    checks = [k for k in out if k.endswith("hooked") or k.startswith("bank")]
    out["pass"] = all(out[k] <= tol for k in checks) and cache_ok
    out["pass"] = out["pass"] and out["set edits the logits (rel)"] > tol  # a check that could not fail is no check
    return out


# --------------------------------------------------------------------------- speed and memory


def speed(model, args) -> dict:
    import torch
    from floor import add_zero_vectors, floor_step  # benchmarks/floor.py (HERE is on sys.path)
    from transformer_lens import patching

    import reftlens
    from reftlens import Intervention, LoReFT, ReftModel
    from reftlens.analysis import patch_sweep
    from reftlens.runtime.compat import fast_attention
    from reftlens.runtime.hf_backend import pristine_hf

    dev, dtype, d = args.device, getattr(torch, args.dtype), model.cfg.d_model
    layers = spread_layers(model.cfg.n_layers)
    cuda = torch.device(dev).type == "cuda"
    out: dict = {}

    def make(seed):
        torch.manual_seed(seed)
        return Intervention(LoReFT(d, 4, init="random").to(device=dev, dtype=dtype), layers=layers, positions="f5+l5")

    words = ["river", "garden", "planet", "violin", "harbour", "lantern", "meadow", "engine"]
    data = [
        {"prompt": f"Write about the {words[i % 8]} number {i}:", "completion": " " + " ".join(words[(i + 3) % 8 :])}
        for i in range(args.batch * 4)
    ]

    # training step: reftlens.train vs the plain floor (same model, zero vector at the same layers)
    reft = ReftModel(model, make(0))
    step_times: list[float] = []
    marks: list[float] = []

    def tick(record):
        sync(dev)
        marks.append(time.perf_counter())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    reftlens.train(
        reft, data, max_steps=args.steps + 1, batch_size=args.batch, lr=1e-3, progress=False, callback=tick, seed=0
    )
    steps = [b - a for a, b in zip(marks, marks[1:])]
    step_times = steps[-args.steps :] if steps else [float("nan")]
    if cuda:
        reft_peak = torch.cuda.max_memory_allocated() - before
    hf = pristine_hf(model, share=True)
    fast_attention(hf)
    for p in hf.parameters():
        p.requires_grad_(False)
    vecs, handles = add_zero_vectors(hf, layers)  # the floor shared with train_vs_pyreft.py and scale.py
    texts = [r["prompt"] + r["completion"] for r in data[: args.batch]]
    tokens, mask = reft.tokenize(texts)
    tokens, mask = tokens.to(dev), mask.to(dev)
    step = floor_step(hf, vecs, lr=1e-3)
    floor_batch = dict(input_ids=tokens, attention_mask=mask, labels=tokens.masked_fill(mask == 0, -100))

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    floor = timed(lambda: step(floor_batch), dev, args.steps)
    if cuda:
        floor_peak = torch.cuda.max_memory_allocated() - before
        out["peak training memory vs floor"] = reft_peak / max(floor_peak, 1)
        out["peak training memory (MiB): reftlens / floor"] = f"{reft_peak / 2**20:.0f} / {floor_peak / 2**20:.0f}"
    for h in handles:
        h.remove()
    out["training step vs floor"] = statistics.median(step_times) / floor
    out["training step (s): reftlens / floor"] = f"{statistics.median(step_times):.4f} / {floor:.4f}"

    # generation: reft.generate vs transformers' generate (greedy, KV cache, same prompts)
    prompts, pmask = reft.tokenize([r["prompt"] for r in data[: args.batch]])
    prompts, pmask = prompts.to(dev), pmask.to(dev)
    n = args.new_tokens
    ours = timed(lambda: reft.generate(prompts, n, attention_mask=pmask, eos_token_id=None), dev, args.reps)
    pad = reft.pad_token_id
    theirs = timed(
        lambda: hf.generate(
            input_ids=prompts,
            attention_mask=pmask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        ),
        dev,
        args.reps,
    )
    out["generation vs transformers generate"] = ours / theirs

    # patch_sweep vs transformer_lens.patching (resid_pre, every layer x position)
    clean = model.to_tokens("The Eiffel Tower is located in the city of").to(dev)
    corrupt = model.to_tokens("The Colosseum is located in the city of").to(dev)
    if clean.shape != corrupt.shape:
        corrupt = clean.flip(-1)
    target = int(model.to_tokens(" Paris", prepend_bos=False)[0, 0])

    def metric(logits):  # reftlens, batched: one value per variant
        return logits[..., -1, target]

    def tl_metric(logits):  # TransformerLens: a scalar per patched run
        return logits[0, -1, target]

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        t_ours = timed(lambda: patch_sweep(model, clean, corrupt, metric, batched=True), dev, args.reps)
        t_tl = timed(lambda: patching.get_act_patch_resid_pre(model, corrupt, cache, tl_metric), dev, 1)
    out["patch_sweep speed-up over transformer_lens.patching"] = t_tl / t_ours

    # a bank of N sets, a different set per prompt, vs one set on the same prompts
    sets = {f"s{k}": make(k) for k in range(args.sets)}
    bank = ReftModel(model, sets)
    one = ReftModel(model, make(0))
    btexts = [f"Write about the {words[i % 8]} number {i}:" for i in range(args.sets)]
    btok, bmask = bank.tokenize(btexts)
    btok, bmask = btok.to(dev), bmask.to(dev)
    adapters = list(sets)
    with torch.no_grad():
        t_bank = timed(lambda: bank(btok, attention_mask=bmask, adapters=adapters), dev, args.reps)
        t_one = timed(lambda: one(btok, attention_mask=bmask), dev, args.reps)
    out[f"bank of {args.sets} forward vs one set"] = t_bank / t_one
    g_bank = timed(
        lambda: bank.generate(btok, n, attention_mask=bmask, adapters=adapters, eos_token_id=None), dev, args.reps
    )
    g_one = timed(lambda: one.generate(btok, n, attention_mask=bmask, eos_token_id=None), dev, args.reps)
    out[f"bank of {args.sets} generation vs one set"] = g_bank / g_one
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default; skipped without CUDA) or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models, small batches, float32: the CPU smoke run")
    ap.add_argument("--dtype", choices=sorted(TOL), default=None, help="bfloat16 (default), or float32 with --tiny")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.batch, args.steps, args.reps, args.new_tokens, args.sets = (
        (4, 2, 1, 4, 4) if args.tiny else (16, 5, 3, 32, 256)
    )

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: skipped (no CUDA device here; run it on a GPU, or with --device cpu --tiny)")
        return 0
    bootstrap()
    sys.path.insert(0, str(HERE))
    from common import environment_line

    print(environment_line())
    print(f"# device {args.device}, dtype {args.dtype}, tiny={args.tiny}")
    t0 = time.perf_counter()
    results, ok = {}, True
    for label, model in load_models(args):
        t1 = time.perf_counter()
        res = {"parity": parity(model, args), "speed": speed(model, args)}
        res["seconds"] = round(time.perf_counter() - t1, 1)
        results[label] = res
        ok = ok and res["parity"]["pass"]
        print(f"\n## {label} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {res['seconds']} s)")
        for part in ("parity", "speed"):
            for k, v in res[part].items():
                print(f"  {part:6} {k:55} {v:.4g}" if isinstance(v, float) else f"  {part:6} {k:55} {v}")
        del model
    print(f"\nparity: {'all pass' if ok else 'FAILED'}; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
