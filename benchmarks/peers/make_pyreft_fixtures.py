"""Build the pyreft interop fixtures (tests/fixtures/pyreft/) and check reftlens exports in pyreft.

Three subcommands, one script for both environments (nothing is imported at the top level
beyond the standard library, numpy and torch):

    # main environment (transformers 5.x): the tiny-llama HF folder, readable by transformers 4.45
    python3 benchmarks/peers/make_pyreft_fixtures.py model DIR

    # pyreft venv: build every fixture (calls `model` with the system python itself)
    .bench/venv-pyreft/bin/python benchmarks/peers/make_pyreft_fixtures.py build [--out tests/fixtures/pyreft]

    # pyreft venv: load reftlens save_pyreft folders with pyreft and print their logits' parity
    .bench/venv-pyreft/bin/python benchmarks/peers/make_pyreft_fixtures.py check --model-dir DIR --cases CASES.json

Each fixture folder <type>/ holds pyreft's own `ReftModel.save` output (config.json +
intkey_*.bin) for one intervention type, plus reference.json (token batch, positions, the
unit_locations given to pyvene, versions) and reference.npz (logits with and without the
interventions; the effective rotate_layer.weight pyreft computed for each intervention that has
one). The base model is reftlens' tiny-llama (seed 0): 800 KB, so it is not committed; model.json
records the SHA-256 of its state dict, which the tests recompute from `tiny_hf_model`.
Every intervention gets random weights from a fixed seed plus perturbations (including the
orthogonal parametrisation's `original`, so the householder path is exercised), so none is
near the identity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
D_MODEL, SEQ = 64, 9
TOKENS = [[1, 17, 45, 203, 88, 310, 12, 77, 150], [1, 260, 33, 91, 6, 144, 399, 58, 21]]

# name → (pyreft class, layers as pyreft's config lists them, positions, untied?, extras)
CASES = {
    # pyreft's untied first/last layout: layers [1, 3] duplicated, f2 on the first half, l2 on the second
    "loreft": dict(cls="LoreftIntervention", layers=[1, 3, 1, 3], positions="f2+l2", untied=True, rank=4),
    # one tied intervention on f2+l2, with add_bias=True (proj_layer.bias folded into b)
    "noreft": dict(cls="NoreftIntervention", layers=[2], positions="f2+l2", untied=False, rank=3, add_bias=True),
    # untied with unequal groups: f3 at layers 0 and 2, then l1 at layers 0 and 2
    "direft": dict(cls="DireftIntervention", layers=[0, 2, 0, 2], positions="f3+l1", untied=True, rank=2),
    # tied f2+l2 at two layers, add_bias=True (pyreft never uses proj_layer.bias here)
    "nodireft": dict(cls="NodireftIntervention", layers=[1, 3], positions="f2+l2", untied=False, rank=3, add_bias=True),
    # one intervention object at layers 1 and 2 (pyreft's way to share weights across layers; its
    # save writes one equal file per key), on the last 3 tokens. Not intervention_link_key: pyvene's
    # links feed the second intervention the first one's *edited activations*, not just its weights.
    "consreft": dict(cls="ConsreftIntervention", layers=[1, 2], positions="l3", untied=False, rank=2, shared=True),
    # untied at a single layer: [3, 3] → layer_3_…#0 (f2) and layer_3_…#1 (l2)
    "lobireft": dict(cls="LobireftIntervention", layers=[3, 3], positions="f2+l2", untied=True, rank=2),
}


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict, by sorted name (same in transformers 4.45 and 5.x)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def locations(spec: str, untied: bool, n: int, seq: int, batch: int) -> list[list[list[int]]]:
    """pyvene unit_locations for the n interventions (no padding, so no clamping applies)."""
    first = last = 0
    for part in spec.split("+"):
        if part.startswith("f"):
            first = int(part[1:])
        else:
            last = int(part[1:])
    f, l = list(range(first)), list(range(seq - last, seq))
    if untied:
        return [[f] * batch] * (n // 2) + [[l] * batch] * (n // 2)
    return [[f + l] * batch] * n


# --------------------------------------------------------------------------- main environment


def cmd_model(out: str) -> None:
    from reftlens.models import tiny_hf_model

    hf, _ = tiny_hf_model("tiny-llama", seed=0)
    hf.save_pretrained(out)
    cfg_path = Path(out) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 4.45 reads rope_theta at the top level (5.x writes rope_parameters) and
    # torch_dtype, not dtype (see /work/shared/OFFLINE.md)
    rope = cfg.get("rope_parameters") or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    print(json.dumps({"model_dir": out, "state_sha256": state_hash(hf)}))


# --------------------------------------------------------------------------- pyreft venv


def _load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _make_intervention(pyreft, case: dict, gen: torch.Generator):
    cls = getattr(pyreft, case["cls"])
    r = case["rank"]
    iv = cls(embed_dim=D_MODEL, low_rank_dimension=r, dtype=torch.float32, add_bias=case.get("add_bias", False))
    with torch.no_grad():
        for name, p in iv.named_parameters():
            if name.endswith("parametrizations.weight.original"):
                # move the householder reflectors off zero and make the diagonal exercise int()
                p.add_(0.4 * torch.randn(p.shape, generator=gen))
                diag = torch.tensor([-1.5, 1.7, -1.2, 1.1])[: min(p.shape)]
                p.diagonal().copy_(diag)
            else:
                p.mul_(3.0).add_(0.2 * torch.randn(p.shape, generator=gen))
    return iv.eval()


def cmd_build(out: str, system_python: str) -> None:
    import pyreft
    import transformers

    out_dir = Path(out)
    work = Path(tempfile.mkdtemp(prefix="pyreft-fixtures-"))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("VIRTUAL_ENV", None)
        res = subprocess.run(
            [system_python, __file__, "model", str(work / "tiny-llama")],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        made = json.loads(res.stdout.strip().splitlines()[-1])
        hf = _load_hf(str(work / "tiny-llama"))
        here = state_hash(hf)
        if here != made["state_sha256"]:
            raise SystemExit(
                f"transformers {transformers.__version__} reads different weights: {here} != {made['state_sha256']}"
            )
        tokens = torch.tensor(TOKENS)
        with torch.no_grad():
            base_logits = hf(input_ids=tokens).logits.float().numpy()

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "model.json").write_text(
            json.dumps(
                {
                    "model": "reftlens tiny-llama (reftlens.models.tiny_hf_model('tiny-llama', seed=0))",
                    "state_sha256": made["state_sha256"],
                    "transformers_pyreft_env": transformers.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        summary = {}
        for name, case in CASES.items():
            gen = torch.Generator().manual_seed(1000 + len(name))
            torch.manual_seed(1000 + len(name))  # pyreft's constructors draw from the global RNG
            shared = _make_intervention(pyreft, case, gen) if case.get("shared") else None
            reps = []
            for layer in case["layers"]:
                iv = shared if shared is not None else _make_intervention(pyreft, case, gen)
                reps.append(
                    {
                        "layer": layer,
                        "component": "block_output",
                        "low_rank_dimension": case["rank"],
                        "intervention": iv,
                    }
                )
            rm = pyreft.get_reft_model(hf, pyreft.ReftConfig(representations=reps), set_device=False)
            rm.eval()
            n = len(reps)
            locs = locations(case["positions"], case["untied"], n, SEQ, len(TOKENS))
            with torch.no_grad():
                _, cf = rm({"input_ids": tokens}, unit_locations={"sources->base": (None, locs)})
            logits = cf.logits.float().numpy()
            rotates = {}
            for i, (key, iv) in enumerate(rm.interventions.items()):  # noqa: B007
                if hasattr(iv, "rotate_layer"):
                    rotates[f"rotate_{i}"] = iv.rotate_layer.weight.detach().float().numpy()
            folder = out_dir / name
            if folder.exists():
                shutil.rmtree(folder)
            tmp = work / f"save-{name}"
            rm.save(str(tmp))
            shutil.copytree(tmp, folder)
            np.savez(folder / "reference.npz", tokens=tokens.numpy(), logits=logits, base_logits=base_logits, **rotates)
            effect = float(np.abs(logits - base_logits).max())
            (folder / "reference.json").write_text(
                json.dumps(
                    {
                        "pyreft_class": case["cls"],
                        "layers": case["layers"],
                        "positions": case["positions"],
                        "pyreft_untied_layout": case["untied"],
                        "rank": case["rank"],
                        "add_bias": case.get("add_bias", False),
                        "shared_object": bool(case.get("shared")),
                        "keys": list(rm.interventions.keys()),
                        "unit_locations": locs,
                        "tokens": TOKENS,
                        "max_abs_logit_change": effect,
                        "versions": {
                            "pyreft": _version("pyreft"),
                            "pyvene": _version("pyvene"),
                            "transformers": transformers.__version__,
                            "torch": torch.__version__,
                        },
                    },
                    indent=2,
                )
                + "\n"
            )
            summary[name] = {"keys": len(rm.interventions), "max_abs_logit_change": round(effect, 4)}
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def cmd_check(model_dir: str, cases_file: str) -> None:
    """For each case {"dir", "unit_locations", "logits_npy"}: load the folder with pyreft two ways.

    exact: build each intervention with dtype=float32 (and add_bias=False), then
    load_state_dict(torch.load(intkey)) — pyreft's own state-dict loading, exact weights.
    pyreft_load: pyreft.ReftModel.load(dir, model) as is; its result (or its error) is reported.
    """
    import pyreft

    hf = _load_hf(model_dir)
    cases = json.loads(Path(cases_file).read_text())
    tokens = torch.tensor(cases["tokens"])
    report = {}
    for case in cases["cases"]:
        folder = Path(case["dir"])
        cfg = json.loads((folder / "config.json").read_text())
        expect = np.load(case["logits_npy"])
        locs = case["unit_locations"]
        out = {}
        # exact path
        reps = []
        for rep, type_str, key in zip(cfg["representations"], cfg["intervention_types"], cfg["sorted_keys"]):
            if rep[9] is not None:
                raise SystemExit(f"{folder}: {key} has an intervention_link_key; reftlens never writes one")
            cls = getattr(pyreft, type_str.split(".")[-1].rstrip("'>"))
            iv = cls(embed_dim=hf.config.hidden_size, low_rank_dimension=rep[4], dtype=torch.float32, add_bias=False)
            iv.load_state_dict(torch.load(folder / f"intkey_{key}.bin", weights_only=True))
            reps.append({"layer": rep[0], "component": rep[1], "low_rank_dimension": rep[4], "intervention": iv.eval()})
        rm = pyreft.get_reft_model(hf, pyreft.ReftConfig(representations=reps), set_device=False)
        rm.eval()
        if list(rm.interventions.keys()) != cfg["sorted_keys"]:
            raise SystemExit(f"{folder}: pyvene keys {list(rm.interventions.keys())} != {cfg['sorted_keys']}")
        with torch.no_grad():
            _, cf = rm({"input_ids": tokens}, unit_locations={"sources->base": (None, locs)})
        out["exact_max_abs_diff"] = float(np.abs(cf.logits.float().numpy() - expect).max())
        # pyreft's own loader
        try:
            loaded = pyreft.ReftModel.load(str(folder), hf)
            dtypes = sorted({str(p.dtype) for iv in loaded.interventions.values() for p in iv.parameters()})
            out["pyreft_load"] = f"loaded ({', '.join(dtypes)})"
            for iv in loaded.interventions.values():
                iv.float()
            loaded.eval()
            with torch.no_grad():
                _, cf = loaded({"input_ids": tokens}, unit_locations={"sources->base": (None, locs)})
            out["pyreft_load_max_abs_diff_after_float"] = float(np.abs(cf.logits.float().numpy() - expect).max())
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            out["pyreft_load"] = f"{type(e).__name__}: {e}"
        report[folder.name] = out
    print(json.dumps(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("out")
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "pyreft"))
    b.add_argument("--system-python", default="python3")
    c = sub.add_parser("check")
    c.add_argument("--model-dir", required=True)
    c.add_argument("--cases", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.cmd == "model":
        cmd_model(args.out)
    elif args.cmd == "build":
        cmd_build(args.out, args.system_python)
    else:
        cmd_check(args.model_dir, args.cases)


if __name__ == "__main__":
    main()
