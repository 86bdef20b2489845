"""Sharded training of a base that does not fit one device: PyTorch's FSDP2 (``fully_shard``) on the
frozen base, the Φs trained as in data-parallel runs.

Each decoder layer of the transformers model under the TransformerLens bridge becomes one FSDP unit
(its weights all-gathered just before it runs and freed after), and the rest (embeddings, final norm,
unembedding) the root unit. The bridge calls those modules as before, so hook points, plans and every
reftlens intervention run unchanged; the Φs stay whole on every process and :func:`reftlens.train`
averages their gradients with DistributedDataParallel, as it does for a replicated base. The base is
frozen, so it has no gradients and no optimizer state to shard or checkpoint: a checkpoint is the Φs'.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py OUT --shard-base

Every process must take part in every forward of a sharded base (the all-gathers are collective):
run evaluation and generation on all ranks, and save from rank 0 only what does not read the base.
"""

from __future__ import annotations

from typing import Any

from reftlens.errors import ConfigError, TrainingError
from reftlens.runtime.hf_backend import decoder_layers


def shard_base(model: Any) -> Any:
    """Shard a TransformerLens model's weights across the processes of the default process group
    with FSDP2, in place; returns the model. Call it after ``dist.init_process_group`` and before
    building the :class:`~reftlens.ReftModel` (which freezes the base).

    >>> dist.init_process_group("gloo")                       # doctest: +SKIP
    >>> model = reftlens.training.shard_base(reftlens.load_model("smollm2-135m"))   # doctest: +SKIP
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TrainingError(
            "shard_base needs torch.distributed initialised: launch with torchrun and call "
            "torch.distributed.init_process_group(...) first (gloo on CPUs, nccl on GPUs)."
        )
    hf = getattr(model, "original_model", None)
    if hf is None:
        raise ConfigError(
            f"shard_base takes a TransformerLens bridge from reftlens.load_model; got {type(model).__name__}, "
            "which has no original_model (the transformers model to shard)."
        )
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:  # torch < 2.6
        raise TrainingError(f"shard_base needs FSDP2 (torch.distributed.fsdp.fully_shard, torch ≥ 2.6): {e}") from None
    for layer in decoder_layers(hf):
        fully_shard(layer)
    fully_shard(hf)
    return model
