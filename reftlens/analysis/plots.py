"""Heatmaps for notebooks and files (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor


def heatmap(
    values: Tensor,
    layers: Sequence[int],
    tokens: Sequence[str],
    *,
    title: str = "",
    path: str | None = None,
    cmap: str = "RdBu_r",
    center: float | None = 0.0,
    label: str = "metric",
    figsize: tuple[float, float] | None = None,
    dpi: int = 120,
    ax: Any = None,
) -> Any:
    """Layers (rows) × tokens (columns); returns the matplotlib Figure, saved as PNG when ``path`` is given.

    ``figsize`` defaults to a size that fits the grid; ``dpi`` applies to the saved PNG; ``ax`` draws
    into an existing axes (a subplot of your own figure) instead of a new figure."""
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
        size = figsize or (max(4.0, 0.6 * len(tokens) + 2), max(3.0, 0.25 * len(layers) + 1.5))
        fig, ax = plt.subplots(figsize=size)
    else:
        fig = ax.figure
    kw: dict[str, Any] = {}
    if center is not None:
        span = max(abs(float(v.max()) - center), abs(float(v.min()) - center)) or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(v, aspect="auto", cmap=cmap, origin="lower", **kw)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig
