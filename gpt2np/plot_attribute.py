"""Figures of an ``Attribution`` (``attribute.py``): each component's direct share of a logit.

Without heads: one horizontal bar per component in depth order (``embed`` at the top, ``ln_f.bias``
at the bottom), the shares' sum and the model's logit in the title. With heads: a ``block x head``
grid of the heads' shares beside the bars of everything else (embeddings, attention biases, MLPs,
``ln_f.bias``). One diverging colour map (``PuOr``, readable with colour-vision deficiencies),
symmetric about 0: purple raises the target's logit (or the difference), orange lowers it. The grid
has its own scale (the heads' largest share), stated on its colour bar.

Token text is drawn literally (never as mathtext), and only the object-oriented API is used.
"""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

CMAP = "PuOr"
FONT = 8


def describe(a) -> str:
    """One line: what was attributed, where, and the check that the shares sum to the logit."""
    what = f"logit({a.tokens[0]!r})" if a.versus is None else f"logit({a.tokens[0]!r}) - logit({a.tokens[1]!r})"
    return (f"direct attribution of {what} at position {a.position}, row {a.row}: "
            f"shares sum to {a.total:.4g}, the value itself is {a.logit:.4g}")


def figure_size(n_bars: int, grid: tuple[int, int] | None = None) -> tuple[float, float]:
    """Inches for ``n_bars`` bars and, with heads, a ``grid = (blocks, heads)`` panel beside them."""
    bars = 0.8 + 0.22 * n_bars
    if grid is None:
        return 6.5, bars + 1.0
    return 4.5 + 0.45 * grid[1], max(bars, 1.2 + 0.35 * grid[0]) + 1.0


def plot_attribution(a, *, title: str | None = None) -> Figure:
    """Draw an ``Attribution``: bars in depth order, and the heads as a grid when it has per-head shares.

    Returns a ``matplotlib.figure.Figure`` (save it with ``fig.savefig(path)``; no window is opened).
    """
    heads = [i for i, s in enumerate(a.labels) if ".h" in s]
    rest = [i for i in range(len(a.labels)) if i not in set(heads)]
    lim = float(np.max(np.abs(a.shares))) or 1.0
    norm = Normalize(-lim, lim)
    cmap = colormaps[CMAP]
    if heads:
        grid = a.head_grid()  # [blocks, H]
        fig = Figure(figsize=figure_size(len(rest), grid.shape), layout="constrained")
        bars_ax, grid_ax = fig.subplots(1, 2, width_ratios=[1.0, max(1.0, 0.12 * grid.shape[1])])
    else:
        fig = Figure(figsize=figure_size(len(rest)), layout="constrained")
        bars_ax, grid_ax = fig.add_subplot(), None

    y = np.arange(len(rest))
    vals = a.shares[rest]
    bars_ax.barh(y, vals, color=cmap(norm(vals)), edgecolor="#555555", linewidth=0.4)
    bars_ax.set_yticks(y, labels=[a.labels[i] for i in rest], fontsize=FONT)
    bars_ax.invert_yaxis()  # depth order, top to bottom
    bars_ax.axvline(0, color="black", linewidth=0.6)
    bars_ax.set_xlim(-1.08 * lim, 1.08 * lim)
    bars_ax.set_xlabel("direct share of the logit" + ("" if a.versus is None else " difference"), fontsize=FONT)
    bars_ax.tick_params(labelsize=FONT)
    bars_ax.set_label("attribution:bars")

    if grid_ax is not None:
        blocks = sorted({int(a.labels[i].split(".")[0]) for i in heads})
        g = float(np.max(np.abs(grid))) or 1.0
        im = grid_ax.imshow(grid, cmap=cmap, norm=Normalize(-g, g), aspect="auto", interpolation="nearest")
        grid_ax.set_xticks(range(grid.shape[1]), labels=[str(h) for h in range(grid.shape[1])], fontsize=FONT)
        grid_ax.set_yticks(range(len(blocks)), labels=[str(b) for b in blocks], fontsize=FONT)
        grid_ax.set_xlabel("head", fontsize=FONT)
        grid_ax.set_ylabel("block", fontsize=FONT)
        grid_ax.set_label("attribution:heads")
        cb = fig.colorbar(im, ax=grid_ax, fraction=0.05)
        cb.set_label("head's share", fontsize=FONT)
        cb.ax.tick_params(labelsize=FONT)
    for t in [*bars_ax.get_yticklabels()]:
        t.set_parse_math(False)
    fig.suptitle(title if title is not None else describe(a), fontsize=9, parse_math=False)
    return fig
