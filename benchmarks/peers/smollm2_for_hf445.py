"""Write a copy of reftlens' SmolLM2-135M-Instruct folder that transformers 4.45.1 reads correctly.

pyreft 0.1.0 pins transformers==4.45.1, which misreads a folder saved by transformers 5.x
(see shared/OFFLINE.md): it ignores ``rope_parameters`` and silently falls back to rope_theta
10000 (logits move by up to ~10), does not know the ``TokenizersBackend`` class, does not read
``chat_template.jinja``, and passes ``token_type_ids`` to Llama unless told the input names.

    python3 benchmarks/peers/smollm2_for_hf445.py OUT_DIR [--src SRC_DIR]

Runs with the system python (it only edits JSON). Without ``--src`` it asks reftlens for the
folder (``reftlens.models.smollm2_dir()``, built from the GGUF on first use). The 517 MB
safetensors file is hard-linked when possible, else copied.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path


def convert(src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)

    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    # 4.45 reads only a top-level rope_theta; its default (10000) is wrong for SmolLM2.
    cfg["rope_theta"] = float(rope.get("rope_theta", cfg.get("rope_theta", 100000.0)))
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"unexpected rope type {rope!r}: only plain RoPE is converted")
    cfg["rope_scaling"] = None
    cfg.pop("dtype", None)  # the 5.x name; 4.45 reads torch_dtype
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    tok = json.loads((src / "tokenizer_config.json").read_text())
    for key in ("backend", "is_local", "local_files_only"):
        tok.pop(key, None)
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"  # 5.x writes TokenizersBackend
    template = src / "chat_template.jinja"
    if template.is_file():  # 4.45 only reads the template from tokenizer_config.json
        tok["chat_template"] = template.read_text()
    tok["model_input_names"] = ["input_ids", "attention_mask"]  # else token_type_ids reach Llama
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")

    for name in ("tokenizer.json", "generation_config.json", "reftlens.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)

    weights = out / "model.safetensors"
    if weights.exists():
        weights.unlink()
    try:
        os.link(src / "model.safetensors", weights)
    except OSError:  # other filesystem
        shutil.copyfile(src / "model.safetensors", weights)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--src", type=Path, default=None, help="reftlens' SmolLM2 folder (default: smollm2_dir())")
    args = ap.parse_args()
    src = args.src
    if src is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from reftlens.models import smollm2_dir

        src = smollm2_dir()
    print(convert(Path(src), args.out))


if __name__ == "__main__":
    main()
