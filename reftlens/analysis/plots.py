"""Heatmaps for notebooks and files (matplotlib, imported only when a plot is drawn).

The colour scale follows the values: a grid whose values straddle 0 (a logit difference, an
indirect effect) gets a diverging scale centred at 0, so the sign reads at a glance; a grid on
one side of 0 (log-probabilities, probabilities) gets a sequential scale over its own range, so
its differences stay visible. ``center=`` and ``cmap=`` override the choice.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from reftlens.errors import ConfigError

DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"
DPI = 100
MAX_WIDTH_IN, MAX_HEIGHT_IN = 13.0, 8.0  # the default figure: at most 1300 × 800 px at the default dpi


def color_scale(values: Tensor, *, center: Any = "auto", cmap: Any = None) -> dict[str, Any]:
    """The colour scale :func:`heatmap` draws ``values`` with: ``{"cmap", "vmin", "vmax", "diverging"}``.

    ``center="auto"``: diverging (``RdBu_r``) and symmetric about 0 when the finite values straddle 0
    (some below, some above), else sequential (``viridis``) from the smallest to the largest value.
    ``center=c`` (a number): diverging and symmetric about ``c``. ``center=None``: sequential over the
    values' range. ``cmap`` replaces the colour map, not the range.

    >>> color_scale(torch.tensor([[-3.0, -1.0]]))["vmin"], color_scale(torch.tensor([[-3.0, -1.0]]))["diverging"]
    (-3.0, False)
    >>> s = color_scale(torch.tensor([[-1.0, 2.0]])); (s["vmin"], s["vmax"], s["cmap"])
    (-2.0, 2.0, 'RdBu_r')
    """
    if center != "auto" and center is not None:
        if isinstance(center, bool) or not isinstance(center, (int, float)) or not math.isfinite(center):
            raise ConfigError(f"center must be 'auto', None or a finite number; got {center!r}.")
    if cmap is not None and not isinstance(cmap, str) and not hasattr(cmap, "N"):
        raise ConfigError(f"cmap must be a matplotlib colour map or its name (e.g. 'viridis'); got {cmap!r}.")
    v = values.detach().float()
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)
    if center == "auto":
        center = 0.0 if lo < 0.0 < hi else None
    if center is None:
        if lo == hi:  # one value: a visible range around it
            lo, hi = lo - 0.5, hi + 0.5
        return {"cmap": cmap or SEQUENTIAL, "vmin": lo, "vmax": hi, "diverging": False}
    span = max(abs(hi - center), abs(lo - center)) or 1.0
    return {"cmap": cmap or DIVERGING, "vmin": center - span, "vmax": center + span, "diverging": True}


def default_figsize(n_layers: int, n_tokens: int) -> tuple[float, float]:
    """Inches that fit a ``n_layers × n_tokens`` grid, capped at ``MAX_WIDTH_IN × MAX_HEIGHT_IN``."""
    width = min(MAX_WIDTH_IN, max(5.0, 0.32 * n_tokens + 3.0))
    height = min(MAX_HEIGHT_IN, max(3.0, 0.2 * n_layers + 2.0))
    return width, height


def heatmap(
    values: Tensor,
    layers: Sequence[int],
    tokens: Sequence[str],
    *,
    title: str = "",
    path: str | None = None,
    cmap: Any = None,
    center: Any = "auto",
    label: str = "metric",
    figsize: tuple[float, float] | None = None,
    dpi: int = DPI,
    ax: Any = None,
) -> Any:
    """Layers (rows) × tokens (columns); returns the matplotlib Figure, saved as PNG when ``path`` is given.

    Args:
        values: ``[len(layers), len(tokens)]``.
        layers: the row labels (layer numbers).
        tokens: the column labels (token strings, shown escaped).
        title: the axes' title.
        path: where to save the PNG (``None``: not saved).
        cmap: the colour map (a matplotlib name or object); default ``"RdBu_r"`` for a diverging
            scale, ``"viridis"`` for a sequential one.
        center: ``"auto"`` (default) — diverging and centred at 0 when the values straddle 0,
            sequential over the values' range otherwise (see :func:`color_scale`); a number —
            diverging, centred there (``center=0`` for a signed difference that happens to be all
            positive); ``None`` — sequential.
        label: the colour bar's label.
        figsize: inches ``(width, height)``; default: fitted to the grid, at most 13 × 8 inches
            (1300 × 800 pixels at the default dpi).
        dpi: pixels per inch of the saved PNG (default 100).
        ax: a matplotlib axes to draw into (a subplot of your own figure) instead of a new figure.
    """
    if figsize is not None and (
        len(figsize) != 2 or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in figsize)
    ):
        raise ConfigError(f"figsize must be two positive numbers (width, height in inches); got {figsize!r}.")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ConfigError(f"dpi must be a positive integer; got {dpi!r}.")
    scale = color_scale(values, center=center, cmap=cmap)
    try:
        import matplotlib

        if path is not None and matplotlib.get_backend().lower() not in (
            "agg",
            "module://matplotlib_inline.backend_inline",
        ):
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    v = values.detach().float().cpu().numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize or default_figsize(len(layers), len(tokens)))
    else:
        fig = ax.figure
    im = ax.imshow(v, aspect="auto", cmap=scale["cmap"], vmin=scale["vmin"], vmax=scale["vmax"], origin="lower")
    width, height = fig.get_size_inches()
    x_font = max(4.0, min(8.0, 0.55 * 72 * width / max(1, len(tokens))))  # labels shrink rather than overlap
    y_font = max(4.0, min(7.0, 0.5 * 72 * height / max(1, len(layers))))
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, ha="right", fontsize=x_font)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=y_font)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
