"""The two training steps the benchmarks time side by side: reftlens's, and the plain-transformers floor.

Shared by ``train_vs_pyreft.py``, ``gpu_suite.py`` and ``scale.py`` (one definition of the floor):

- :func:`add_zero_vectors`: the floor's trainable part, a zero-initialised vector added to the output
  of each chosen decoder layer of a plain transformers model (an identity edit, so the backward pass
  reaches the lowest chosen layer as with a ReFT there) by plain torch forward hooks;
- :func:`floor_step`: the transformers model's forward, the causal-LM loss, backward and AdamW;
- :func:`reft_step`: ``reftlens.train``'s step on a ReftModel (its forward computes logits only where
  the loss reads them), the same loss, backward and AdamW.

Both steps take one batch as a dict: ``input_ids``, ``attention_mask``, ``labels`` (-100 where no
loss; transformers' convention: ``labels[t]`` is predicted from position ``t - 1``) and, for
``reft_step``, ``prompt_mask`` (1 on the prompt tokens, against which ReFT positions resolve).
Unlike ``common.py``, this module imports torch at its top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: logits[:, :-1] against labels[:, 1:], mean over labels != -100."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def add_zero_vectors(hf: torch.nn.Module, layers: Sequence[int]) -> tuple[list[torch.nn.Parameter], list]:
    """A zero vector (trainable, the model's dtype and device) added to the output of each decoder layer
    ``hf.model.layers[l]``, ``l`` in ``layers``. Returns the vectors and the hook handles (``.remove()``)."""
    w = next(hf.parameters())
    params = [torch.nn.Parameter(torch.zeros(hf.config.hidden_size, device=w.device, dtype=w.dtype)) for _ in layers]

    def hook_for(p):
        def hook(module, inputs, output):
            if isinstance(output, tuple):  # older transformers return (hidden, ...)
                return (output[0] + p,) + tuple(output[1:])
            return output + p

        return hook

    handles = [hf.model.layers[layer].register_forward_hook(hook_for(p)) for layer, p in zip(layers, params)]
    return params, handles


def floor_step(hf: torch.nn.Module, params: Sequence[torch.nn.Parameter], lr: float) -> Callable[[dict], float]:
    """The floor's training step (returns the loss): forward, causal-LM loss, backward, AdamW on ``params``."""
    return loss_step(lambda b: hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, params, lr)


def loss_step(
    logits_of: Callable[[dict], torch.Tensor], params: Sequence[torch.nn.Parameter], lr: float
) -> Callable[[dict], float]:
    """A step around any forward ``logits_of(batch)``: causal-LM loss, backward, AdamW on ``params``."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step(b: dict) -> float:
        loss = causal_lm_loss(logits_of(b), b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def reft_step(reft, lr: float, autocast: bool = False) -> Callable[[dict], float]:
    """reftlens.train's step (returns the loss): its forward (logits only where the loss reads them),
    the same loss, backward, AdamW on the ReftModel's trainable parameters."""
    from reftlens.training.data import Batch
    from reftlens.training.forward import forward, token_losses

    opt = torch.optim.AdamW([p for p in reft.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    reft.train()

    def step(b: dict) -> float:
        shifted = F.pad(b["labels"][:, 1:], (0, 1), value=-100)  # reftlens aligns labels with logits
        batch = Batch(
            tokens=b["input_ids"], attention_mask=b["attention_mask"], prompt_mask=b["prompt_mask"], labels=shifted
        )
        with ctx():
            logits, labels = forward(reft, batch)
        loss = token_losses(logits, labels) / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def hf_greedy(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, k: int, pad: int) -> torch.Tensor:
    """The generation floor: transformers' greedy ``generate`` with the KV cache, exactly ``k`` new
    tokens (``eos_token_id=None``: EOS does not stop it); the new tokens only."""
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=k,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
            use_cache=True,
        )
    return out[:, ids.shape[1] :]
