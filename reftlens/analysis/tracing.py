"""Causal tracing (Meng et al. 2022, ROME): corrupt the subject, restore clean states one site at a time.

1. Corrupt: add Gaussian noise (σ = ``noise`` × the std of the token embeddings, seeded) to the
   subject tokens' embeddings, once per noise sample.
2. Restore: for each (layer, position), put back the clean run's state — the residual stream
   (``hook="resid_post"``), or the MLP / attention outputs of a window of layers (``"mlp_out"``,
   ``"attn_out"``; ROME's short names ``"resid"``, ``"mlp"``, ``"attn"`` work too)
   — in every noisy sample, and read the probability of the answer.
3. Report the probability per (layer, position), averaged over noise samples, beside the clean
   and corrupted probabilities; the indirect effect is ``values - corrupted``.

:func:`corruption` and :func:`restoration` are the two pieces as ordinary interventions; the trace
is a sweep of restorations over the corrupted run (the engine batches them, replays only the
blocks and positions a restoration can change, and every variant of one sample sees the same
noise, as in ROME).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from reftlens.errors import AnalysisError
from reftlens.hook_names import HOOK_ALIASES, canonical_hook
from reftlens.inputs import text_tokens
from reftlens.interventions.patching import Interchange, Noise
from reftlens.progress import check_progress
from reftlens.runtime.plan import hook_name_for
from reftlens.runtime.sweep import Sweep
from reftlens.sets import Intervention

# the hooks a trace restores (ROME's "resid", "mlp", "attn" resolve to them: reftlens.hook_names)
_HOOKS = ("resid_post", "mlp_out", "attn_out")


def _hook(hook: str) -> str:
    name = canonical_hook(hook)
    if name not in _HOOKS:
        close = difflib.get_close_matches(str(hook), [*_HOOKS, *HOOK_ALIASES], n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AnalysisError(
            f"causal_trace restores 'resid_post', 'mlp_out' or 'attn_out' (ROME's 'resid', 'mlp', 'attn'); "
            f"got hook={hook!r}.{hint}"
        )
    return name


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
    hook: str

    @property
    def indirect_effect(self) -> Tensor:
        """``values − corrupted``: what restoring each (layer, position) recovers."""
        return self.values - self.corrupted

    def plot(self, path: str | None = None, **kwargs: Any) -> Any:
        """A layers × tokens heatmap of ``values`` (matplotlib Figure), subject tokens starred; saved
        as PNG when ``path`` is given.

        A probability is drawn on a sequential scale (``cmap="Purples"``, ``center=None``) labelled
        ``"p(answer)"``; every option of :func:`~reftlens.analysis.plots.heatmap` (``title``,
        ``cmap``, ``center``, ``label``, ``figsize``, ``dpi``, ``ax``) overrides these."""
        from reftlens.analysis.plots import heatmap

        tokens = [t + ("*" if self.subject[0] <= i < self.subject[1] else "") for i, t in enumerate(self.tokens)]
        title = f"causal trace ({self.hook}): p({self.answer!r}) clean {self.clean:.3f}, corrupted {self.corrupted:.3f}"
        options = {"title": title, "cmap": "Purples", "center": None, "label": "p(answer)", **kwargs}
        return heatmap(self.values, list(range(self.values.shape[0])), tokens, path=path, **options)


def subject_span(model: Any, prompt: str, subject: str) -> tuple[Tensor, tuple[int, int]]:
    """The prompt's tokens (as TransformerLens makes them) and the [start, end) span of ``subject``."""
    tok = model.tokenizer
    start_char = prompt.find(subject)
    if not subject or start_char < 0:
        raise AnalysisError(
            f"subject {subject!r} is not in the prompt {prompt!r}; pass the subject exactly as it appears."
        )
    tokens = text_tokens(model, prompt)[None]
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    shift = tokens.shape[1] - len(enc["input_ids"])  # the start token prepended (if the prompt had none)
    end_char = start_char + len(subject)
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end_char and b > start_char]
    return tokens, (hit[0] + shift, hit[-1] + 1 + shift)


def embedding_std(model: Any) -> float:
    """Standard deviation of the token-embedding entries (ROME's noise scale unit)."""
    return float(model.embed.W_E.detach().float().std())


def corruption(model: Any, span: tuple[int, int], noise: float = 3.0, seed: int = 0) -> Intervention:
    """The corruption as an intervention: Gaussian noise on the subject tokens' embeddings."""
    return Intervention(
        Noise(noise * embedding_std(model), seed=seed),
        layers=0,
        positions=slice(*span),
        hook="resid_pre",
        name="corrupt subject",
    )


def restoration(layers: int | Sequence[int], position: int, hook: str = "resid_post") -> Intervention:
    """The restoration as an intervention: the clean run's state at one position of ``layers``
    (pass the clean run as the source)."""
    hook = _hook(hook)
    return Intervention(Interchange(), layers=layers, positions=[position], hook=hook, name=f"restore {hook}")


@torch.no_grad()
def causal_trace(
    model: Any,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    hook: str = "resid_post",
    window: int = 10,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    batch_size: int = 256,
    check_finite: bool = True,
    progress: bool = True,
) -> TraceResult:
    """Trace where ``model`` recalls ``answer`` for ``prompt`` (default answer: its own greedy prediction).

    The corrupted run is the base of an engine sweep (:class:`reftlens.runtime.sweep.Sweep`) with
    :func:`corruption` active on its ``samples`` rows; every cell is one :func:`restoration`
    variant with the clean run as source. Each variant is replayed from the recorded corrupted run:
    from the first restored block, on positions from the restored one on. Positions before the
    subject are not run: the noise enters at the subject and attention is causal, so their clean
    and corrupted states are the same and restoring them gives the corrupted probability.
    ``check_finite`` as in :func:`~reftlens.analysis.activation_patching.patch_sweep` (for the restored clean states).
    ``progress``: a progress bar (tqdm) counting the restorations as each chunk of the sweep
    finishes; ``False`` prints nothing.

    >>> res = causal_trace(model, "The Space Needle is in downtown", "The Space Needle", " Seattle")  # doctest: +SKIP
    >>> res.plot("trace.png")  # doctest: +SKIP
    """
    check_progress(progress, "causal_trace")
    hook = _hook(hook)
    if samples < 1:
        raise AnalysisError(f"samples must be at least 1; got {samples}.")
    if window < 1:
        raise AnalysisError(f"window must be at least 1 layer; got {window}.")
    tokens, span = subject_span(model, prompt, subject)
    n_layers, seq = model.cfg.n_layers, tokens.shape[1]
    sweep = Sweep(
        model,
        tokens.expand(samples, -1),
        base=[corruption(model, span, noise, seed)],
        sources=tokens,
        strategy="replay",
        batch_size=batch_size,
        check_finite=check_finite,
        keep=[hook_name_for(hook, l) for l in range(n_layers)],
    )  # what the variants read
    clean_logits = sweep.source_run()
    if answer is None:
        target = int(clean_logits[0, -1].argmax())
        answer = model.tokenizer.decode([target])
    else:
        ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise AnalysisError(f"answer {answer!r} has no tokens.")
        target = ids[0]

    def p_answer(logits: Tensor, n: int) -> Tensor:
        return logits[:, -1].float().softmax(-1)[:, target].view(n, samples).mean(1).cpu()

    corrupted = float(p_answer(sweep.base_logits, 1)[0])
    values = torch.full((n_layers, seq), corrupted)
    cells = [(layer, pos) for pos in range(span[0], seq) for layer in range(n_layers)]
    variants = [[restoration(_window(layer, hook, window, n_layers), pos, hook)] for layer, pos in cells]

    def consume(indices: list[int], logits: Tensor) -> None:
        for i, v in zip(indices, p_answer(logits, len(indices))):
            values[cells[i]] = v

    sweep.run(variants, consume, read=[seq - 1], only_read=True, progress=progress, desc="causal_trace")
    clean_p = float(clean_logits[0, -1].float().softmax(-1)[target])
    tok_strs = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    return TraceResult(values, clean_p, corrupted, tok_strs, span, answer, target, hook)


def _window(layer: int, hook: str, window: int, n_layers: int) -> list[int]:
    """The layers restored for the cell at ``layer``: itself (resid_post), or ROME's window around it
    (mlp_out/attn_out), ``max(0, layer − w//2) … min(L, layer + ⌈w/2⌉) − 1``, narrower at both edges."""
    if _hook(hook) == "resid_post":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))
