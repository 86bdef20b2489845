"""A model with a planted variable, for checking DAS against ground truth.

A 4-layer GPT-2 with hand-set weights: the last token's parity (even → +1, odd → −1) is written
into direction ``v`` of its embedding; the MLP of ``write_layer`` moves it into direction ``u``
(and erases ``v`` exactly); the unembedding reads only ``u`` (token 4 for even, 5 for odd).
Attention is off, so a position's stream depends on its own token alone. Above ``write_layer``
the variable lives in ``u`` and nowhere else; below it, only in ``v``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

EVEN, ODD = 4, 5  # answer tokens


def planted_variable_model(
    d_model: int = 16, write_layer: int = 1, readout: float = 0.3, seed: int = 0
) -> tuple[Any, Tensor, Tensor]:
    """Return ``(bridge, u, v)``: the TransformerLens model and the planted directions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from reftlens.models import load_model, tiny_tokenizer

    tok = tiny_tokenizer()
    vocab = len(tok)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=d_model,
        n_layer=4,
        n_head=2,
        n_positions=64,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    # an orthonormal basis whose first vector is the mean direction, which LayerNorm removes
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(d_model, 1), torch.randn(d_model, d_model - 1, generator=g)], 1))
    u, v, rest = basis[:, 1], basis[:, 2], basis[:, 3:]
    var = torch.where(torch.arange(vocab) % 2 == 0, 1.0, -1.0)
    noise = torch.nn.functional.normalize(torch.randn(vocab, rest.shape[1], generator=g), dim=1) @ rest.T
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight.copy_(2.0 * var[:, None] * v + noise)  # norm sqrt(5) for every token
        # LayerNorm scales h by sqrt(d/5), so ln(h)·v = sqrt(d/5)(h·v). Two GELU units compute it linearly
        # (gelu(x) − gelu(−x) = x) and write (ln(h)·v)(u − sqrt(5/d) v): v's content moves to u, v is erased.
        out = u - (5 / d_model) ** 0.5 * v
        mlp = model.transformer.h[write_layer].mlp
        mlp.c_fc.weight[:, 0], mlp.c_fc.weight[:, 1] = v, -v
        mlp.c_proj.weight[0], mlp.c_proj.weight[1] = out, -out
        model.lm_head.weight[EVEN], model.lm_head.weight[ODD] = readout * u, -readout * u
    return load_model(model, tokenizer=tok), u, v


def planted_pairs(n: int, length: int = 5, seed: int = 0, vocab: int = 400) -> list[dict]:
    """Counterfactual pairs: random base and source sequences; the label is the source's answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(10, vocab, (length,), generator=g)
        source = torch.randint(10, vocab, (length,), generator=g)
        out.append({"base": base, "source": source, "label": EVEN if int(source[-1]) % 2 == 0 else ODD})
    return out
