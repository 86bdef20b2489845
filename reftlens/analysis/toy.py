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


def planted_site_model(
    d_model: int = 16, site_layer: int = 1, n_layers: int = 4, seed: int = 0
) -> tuple[Any, dict[str, Tensor]]:
    """A GPT-2 whose task answer is linearly readable at one site only: ``resid_post`` of
    ``site_layer``, at each position (attention is off, so a position sees its own token alone).

    Each token t carries two ±1 features in its embedding, p = (−1)^t and q = (−1)^(t // 2), in
    directions ``a`` and ``b``. The MLP of ``site_layer`` computes their product var = p·q (an XOR:
    no affine map of the embedding gives it) into direction ``u``; the MLP of the next layer erases
    ``u`` exactly. The unembedding reads direction ``w``, which no layer writes, as token ``EVEN``
    (+) and ``ODD`` (−): the base model has no idea, and an affine edit can teach it the answer
    (var = +1 → EVEN) only where var is linear in the activation, i.e. at ``site_layer``'s output
    (its ``resid_post``, and the ``mlp_out`` of that layer and of the next). Returns
    ``(bridge, {"a", "b", "u", "w"})``; :func:`planted_site_label` gives an example's answer.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from reftlens.models import load_model, tiny_tokenizer

    if not 0 <= site_layer < n_layers - 1:
        raise ValueError(f"site_layer must be in 0..{n_layers - 2} (the next layer erases the feature).")
    tok = tiny_tokenizer()
    vocab = len(tok)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=2,
        n_positions=64,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-12,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.cat([torch.ones(d_model, 1), torch.randn(d_model, d_model - 1, generator=g)], 1))
    a, b, u, w, rest = basis[:, 1], basis[:, 2], basis[:, 3], basis[:, 4], basis[:, 5:]
    ids = torch.arange(vocab)
    p = torch.where(ids % 2 == 0, 1.0, -1.0)
    q = torch.where((ids // 2) % 2 == 0, 1.0, -1.0)
    alpha, gain = 2.0, 1.0  # feature size in the embedding; size of var·u written at site_layer
    noise = torch.nn.functional.normalize(torch.randn(vocab, rest.shape[1], generator=g), dim=1) @ rest.T
    emb = alpha * (p[:, None] * a + q[:, None] * b) + noise  # every token has norm sqrt(2α² + 1)
    kappa = d_model**0.5 / float(emb[0].norm())  # LayerNorm's scale on a (mean-free) embedding
    beta = 5.0 / (kappa * alpha)  # pre-activations ±5(p ± q) ∈ {0, ±10}: gelu(x) + gelu(−x) = |x| there
    h_norm = (float(emb[0].norm()) ** 2 + (10 * gain) ** 2) ** 0.5  # every stream's norm after site_layer
    kappa2 = d_model**0.5 / h_norm
    with torch.no_grad():
        for prm in model.parameters():
            prm.zero_()
        for block in model.transformer.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.wte.weight.copy_(emb)
        # |p+q| − |p−q| = 2pq: four GELU units write 10·gain·var along u
        mlp = model.transformer.h[site_layer].mlp
        for k, (vec, sign) in enumerate([(a + b, 1.0), (-(a + b), 1.0), (a - b, -1.0), (-(a - b), -1.0)]):
            mlp.c_fc.weight[:, k] = beta * vec
            mlp.c_proj.weight[k] = sign * gain * u  # gain·(5|p+q| − 5|p−q|) = 10·gain·var
        # the next MLP writes −(u·h) u exactly (gelu(x) − gelu(−x) = x)
        nxt = model.transformer.h[site_layer + 1].mlp
        nxt.c_fc.weight[:, 0], nxt.c_fc.weight[:, 1] = u, -u
        nxt.c_proj.weight[0], nxt.c_proj.weight[1] = -u / kappa2, u / kappa2
        model.lm_head.weight[EVEN], model.lm_head.weight[ODD] = 3.0 * w, -3.0 * w
    return load_model(model, tokenizer=tok), {"a": a, "b": b, "u": u, "w": w}


def planted_site_label(token: int) -> int:
    """The answer :func:`planted_site_model` asks for after a prompt ending in ``token``: EVEN when
    (−1)^t · (−1)^(t // 2) = +1, else ODD."""
    return EVEN if (token % 2 == 0) == ((token // 2) % 2 == 0) else ODD


def planted_site_data(model: Any, n: int, length: int = 5, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion examples for :func:`planted_site_model`: ``length`` random letters,
    answered by ``planted_site_label`` of the prompt's last token (EVEN is ``"!"``, ODD ``'"'``)."""
    from reftlens.inputs import text_tokens

    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tok = model.tokenizer
    out = []
    for _ in range(n):
        prompt = "".join(letters[int(i)] for i in torch.randint(len(letters), (length,), generator=g))
        last = int(text_tokens(model, prompt)[-1])
        out.append({"prompt": prompt, "completion": tok.decode([planted_site_label(last)])})
    return out
