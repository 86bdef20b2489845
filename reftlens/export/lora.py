"""ReFT as a peft LoRA adapter: the folds of :mod:`reftlens.export.merge`, written as peft writes them.

Each edited projection gets ``lora_A`` = A (``[r, in]``) and ``lora_B`` = B (``[out, r]``) with
``lora_alpha = r`` (peft's scaling α/r = 1), so peft computes W x + b + B A x: the merged weights,
without touching the base. Every map gets the same rank (the largest; the others are padded with
zero rows and columns, which add nothing), since some LoRA servers (vLLM) read one rank per adapter.
The bias U(Db + c) goes to peft's ``lora_bias`` (a bias on ``lora_B``, peft ≥ 0.14); with an older
peft a non-zero bias is refused. The folder is what ``PeftModel.save_pretrained`` writes
(``adapter_config.json`` + ``adapter_model.safetensors``), loadable without reftlens.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from reftlens.errors import ExportError
from reftlens.export.merge import folds, set_units
from reftlens.runtime.hf_backend import pristine_hf

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PIP = "pip install 'peft>=0.14'"


def peft_supports_lora_bias() -> bool:
    """Whether the installed peft's ``LoraConfig`` has ``lora_bias`` (a bias on ``lora_B``; peft ≥ 0.14)."""
    from peft import LoraConfig

    return "lora_bias" in {f.name for f in dataclasses.fields(LoraConfig)}


def save_peft(
    reft: Any, path: str | os.PathLike, *, adapter: str | None = None, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``reft`` as a peft LoRA adapter folder that ``PeftModel.from_pretrained(base, path)``
    loads with peft and transformers alone; same logits as reftlens (fp32: 1e-4).

    The interventions must fold (see :func:`reftlens.merge`: ``attn_out`` / ``mlp_out``,
    ``positions="all"``, an affine Φ); the adapter's rank is the largest total rank on one
    projection. ``base_model_name_or_path`` goes into the adapter config, where peft and vLLM
    read which base to load: pass the hub id or folder your users have (e.g.
    ``"HuggingFaceTB/SmolLM2-135M-Instruct"``). The default is the base model's own
    ``name_or_path``, which for a model loaded from a local cache (``load_model("smollm2-135m")``)
    is a path on this machine. The write is atomic; an earlier adapter folder is replaced, a
    folder holding anything else is refused. A bank writes one of its sets, named by ``adapter``
    (required for a bank, refused for a plain set; see :func:`reftlens.merge`).

    >>> reftlens.save_peft(reft, "adapter")                               # doctest: +SKIP
    >>> model = peft.PeftModel.from_pretrained(base, "adapter")          # doctest: +SKIP
    """
    from reftlens.saving import atomic_dir

    if base_model_name_or_path is not None:
        if not isinstance(base_model_name_or_path, (str, os.PathLike)) or not str(base_model_name_or_path).strip():
            raise ExportError(
                "base_model_name_or_path must be a non-empty hub id or folder path (a str); "
                f"got {base_model_name_or_path!r}."
            )
        base_model_name_or_path = str(base_model_name_or_path)
    set_units(reft, adapter, "save_peft(reft, path, adapter=name)")  # a bank's set is named, or refused here
    try:
        from peft import LoraConfig
    except ImportError:
        raise ExportError(
            f"reftlens.save_peft writes the adapter config with peft, which is not installed: {PEFT_PIP}."
        ) from None
    from safetensors.torch import save_file

    hf = pristine_hf(reft.model, share=True)  # module names and base weights only: nothing is changed
    found = folds(reft, hf, adapter)
    if not found:
        raise ExportError("this ReftModel has no interventions, so there is no adapter to write.")
    with_bias = [f for f in found if bool(f.bias.any())]
    if with_bias and not peft_supports_lora_bias():
        import peft

        raise ExportError(
            f"intervention {with_bias[0].sources[0]!r} folds into {with_bias[0].name} with a bias U(Db + c) ≠ 0 "
            f"(max |·| = {with_bias[0].bias.abs().max().item():.3g}), and the installed peft {peft.__version__} has no "
            f"LoRA bias (LoraConfig.lora_bias, peft ≥ 0.14). Upgrade peft ({PEFT_PIP}), or train the Φs without a "
            "shift (LoReFT(d, r, bias=False), DiReFT(d, r, bias=False)) so the adapter needs none."
        )
    rank = max(f.rank for f in found)
    if rank < 1:
        raise ExportError(
            f"the edits of {', '.join(repr(s) for f in found for s in f.sources)} fold to rank 0 (their Φs' affine() has "
            "no directions, so they change nothing), and a LoRA adapter needs rank ≥ 1 (peft refuses r=0). There is "
            "no adapter to write: drop these interventions, or check the Φ's affine()."
        )
    conv1d = {type(hf.get_submodule(f.name)).__name__ == "Conv1D" for f in found}
    tensors: dict[str, torch.Tensor] = {}
    for f in found:
        key = f"base_model.model.{f.name}"
        A = torch.zeros(rank, f.A.shape[1], dtype=torch.float64)
        B = torch.zeros(f.B.shape[0], rank, dtype=torch.float64)
        A[: f.rank], B[:, : f.rank] = f.A.cpu(), f.B.cpu()
        tensors[f"{key}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = B.float().contiguous()
        if with_bias:
            tensors[f"{key}.lora_B.bias"] = f.bias.cpu().float().contiguous()
    options = dict(
        r=rank,
        lora_alpha=rank,  # scaling α / r = 1: lora_B · lora_A is exactly the folded update
        lora_dropout=0.0,
        target_modules=sorted(f.name for f in found),
        bias="none",
        fan_in_fan_out=conv1d == {True},  # GPT-2's Conv1D stores [in, out]
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or getattr(hf.config, "name_or_path", None) or None,
        inference_mode=True,
    )
    if with_bias:
        options["lora_bias"] = True
    config = LoraConfig(**options)

    def write(folder: Path) -> None:
        config.save_pretrained(str(folder))
        save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return atomic_dir(path, write, markers=((ADAPTER_CONFIG, ADAPTER_WEIGHTS),))
