"""Causal tracing (Meng et al. 2022, ROME): corrupt the subject, restore clean states one site at a time.

1. Corrupt: add Gaussian noise (σ = ``noise`` × the std of the token embeddings, seeded) to the
   subject tokens' embeddings, once per noise sample.
2. Restore: for each (layer, position), put back the clean run's state — the residual stream
   (``kind="resid"``), or the MLP / attention outputs of a window of layers (``"mlp"``, ``"attn"``)
   — in every noisy sample, and read the probability of the answer.
3. Report the probability per (layer, position), averaged over noise samples, beside the clean
   and corrupted probabilities; the indirect effect is ``values - corrupted``.

All restorations of one position run in one batched forward (rows = samples × layers), and every
variant of one sample sees the same noise, as in ROME. :func:`corruption` and :func:`restoration`
give the two pieces as ordinary interventions for building variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from reftlens.analysis.patching import AnalysisError
from reftlens.interventions.patching import Interchange, Noise
from reftlens.runtime.plan import hook_name_for
from reftlens.runtime.tl import detach
from reftlens.sets import Intervention

_KINDS = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass
class TraceResult:
    """``values[l, p]``: mean probability of ``answer`` with the clean state restored at layer ``l``
    (window centred there for mlp/attn), position ``p``."""

    values: Float[Tensor, "layer pos"]
    clean: float
    corrupted: float
    tokens: list[str]
    subject: tuple[int, int]  # [start, end) token positions
    answer: str
    answer_id: int
    kind: str

    @property
    def indirect_effect(self) -> Tensor:
        """``values − corrupted``: what restoring each (layer, position) recovers."""
        return self.values - self.corrupted

    def plot(self, path: str | None = None, **kwargs: Any) -> Any:
        """A layers × tokens heatmap of ``values`` (matplotlib), subject tokens starred; saved as PNG
        when ``path`` is given."""
        from reftlens.analysis.plots import heatmap

        tokens = [t + ("*" if self.subject[0] <= i < self.subject[1] else "") for i, t in enumerate(self.tokens)]
        title = f"causal trace ({self.kind}): p({self.answer!r}) clean {self.clean:.3f}, corrupted {self.corrupted:.3f}"
        return heatmap(self.values, list(range(self.values.shape[0])), tokens, title=title, path=path, cmap="Purples",
                       center=None, label="p(answer)", **kwargs)


def subject_span(model: Any, prompt: str, subject: str) -> tuple[Tensor, tuple[int, int]]:
    """The prompt's tokens (as TransformerLens makes them) and the [start, end) span of ``subject``."""
    tok = model.tokenizer
    start_char = prompt.find(subject)
    if not subject or start_char < 0:
        raise AnalysisError(f"subject {subject!r} is not in the prompt {prompt!r}; pass the subject exactly as it appears.")
    tokens = model.to_tokens(prompt)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    shift = tokens.shape[1] - len(enc["input_ids"])  # the start token TransformerLens prepends
    end_char = start_char + len(subject)
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end_char and b > start_char]
    return tokens, (hit[0] + shift, hit[-1] + 1 + shift)


def embedding_std(model: Any) -> float:
    """Standard deviation of the token-embedding entries (ROME's noise scale unit)."""
    return float(model.embed.W_E.detach().float().std())


def corruption(model: Any, span: tuple[int, int], noise: float = 3.0, seed: int = 0) -> Intervention:
    """The corruption as an intervention: Gaussian noise on the subject tokens' embeddings."""
    return Intervention(Noise(noise * embedding_std(model), seed=seed), layers=0, positions=slice(*span),
                        hook="resid_pre", name="corrupt subject")


def restoration(layers: int | Sequence[int], position: int, kind: str = "resid") -> Intervention:
    """The restoration as an intervention: the clean run's state at one position of ``layers``
    (pass the clean run as the source)."""
    if kind not in _KINDS:
        raise AnalysisError(f"kind must be one of {sorted(_KINDS)}; got {kind!r}.")
    return Intervention(Interchange(), layers=layers, positions=[position], hook=_KINDS[kind], name=f"restore {kind}")


@torch.no_grad()
def causal_trace(
    model: Any,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kind: str = "resid",
    window: int = 10,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    max_rows: int = 256,
) -> TraceResult:
    """Trace where ``model`` recalls ``answer`` for ``prompt`` (default answer: its own greedy prediction).

    >>> res = causal_trace(model, "The Space Needle is in downtown", "The Space Needle", " Seattle")  # doctest: +SKIP
    >>> res.plot("trace.png")  # doctest: +SKIP
    """
    if kind not in _KINDS:
        raise AnalysisError(f"kind must be one of {sorted(_KINDS)}; got {kind!r}.")
    if samples < 1:
        raise AnalysisError(f"samples must be at least 1; got {samples}.")
    tokens, span = subject_span(model, prompt, subject)
    n_layers, seq = model.cfg.n_layers, tokens.shape[1]
    clean_logits = model(tokens)
    if answer is None:
        target = int(clean_logits[0, -1].argmax())
        answer = model.tokenizer.decode([target])
    else:
        ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AnalysisError(f"answer {answer!r} has no tokens.")
        target = ids[0]
    hooks = [hook_name_for(_KINDS[kind], l) for l in range(n_layers)]
    hook_dict = model.hook_dict  # TL 4.3 rebuilds it (with aliases) on every access: read it once
    points = [hook_dict[h] for h in hooks]
    wanted = set(hooks) | {p.name for p in points}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
    clean_acts = [cache[p.name][0] for p in points]  # [seq, d] per layer
    embed_point = hook_dict[hook_name_for("resid_pre", 0)]
    sigma = noise * embedding_std(model)
    gen = torch.Generator().manual_seed(seed)
    eps = (sigma * torch.randn(samples, span[1] - span[0], model.cfg.d_model, generator=gen)).to(tokens.device)

    def run(n_variants: int, restores: list[tuple[list[int], int, list[int]]]) -> Tensor:
        """p(answer) for ``n_variants`` × ``samples`` noisy rows (variant-major); each restore is
        (variant indices, position, layers) with the clean state written there."""
        rows = n_variants * samples

        def corrupt(h: Tensor, hook: Any = None) -> Tensor:
            h = h.clone()
            h[:, span[0] : span[1]] += eps.repeat(n_variants, 1, 1).to(h.dtype)
            return h

        def restore(layer: int, variant_rows: Tensor, pos: int):
            def fn(h: Tensor, hook: Any = None) -> Tensor:
                h = h.clone()
                h[variant_rows, pos] = clean_acts[layer][pos].to(h.dtype)
                return h
            return fn

        handles = [(embed_point, embed_point.add_hook(corrupt, dir="fwd"))]
        try:
            for variants, pos, layers in restores:
                for layer in layers:
                    vrows = (torch.tensor(variants)[:, None] * samples + torch.arange(samples)).reshape(-1).to(tokens.device)
                    handles.append((points[layer], points[layer].add_hook(restore(layer, vrows, pos), dir="fwd")))
            logits = model(tokens.expand(rows, -1))
        finally:
            detach(handles)
        probs = logits[:, -1].float().softmax(-1)[:, target]
        return probs.view(n_variants, samples).mean(1).cpu()

    corrupted = float(run(1, [])[0])
    values = torch.empty(n_layers, seq)
    per_forward = max(1, max_rows // samples)
    for pos in range(seq):
        for start in range(0, n_layers, per_forward):
            chunk = list(range(start, min(start + per_forward, n_layers)))
            restores = [([i], pos, _window(l, kind, window, n_layers)) for i, l in enumerate(chunk)]
            values[chunk, pos] = run(len(chunk), restores)
    clean_p = float(clean_logits[0, -1].float().softmax(-1)[target])
    tok_strs = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    return TraceResult(values, clean_p, corrupted, tok_strs, span, answer, target, kind)


def _window(layer: int, kind: str, window: int, n_layers: int) -> list[int]:
    if kind == "resid":
        return [layer]
    lo = max(0, layer - window // 2)
    return list(range(lo, min(n_layers, lo + window)))
