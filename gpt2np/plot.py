"""Figures of a ``Lens``, drawn as in the post ("The figure, as in the post" in lens-spec.md).

One cell per (row, position): rows by depth with ``input`` at the bottom, positions left to right.
The cell text is the row's top-1 token (whitespace made visible, long tokens shortened with an
ellipsis), the colour the view's quantity with a labelled colour bar. The bottom axis shows the
input tokens, the top axis the true next tokens with ``*`` where the model's final top-1 equals
them; a cell is outlined when its top-1 equals the final top-1 at its position.

Views (``VIEWS``) and their colour scales. One colour map family, ``cividis`` (perceptually
uniform, readable with colour-vision deficiencies), oriented so that **light means good**: a high
top-1 logit or probability, a low entropy, a rank near 1, a KL near 0 (close to the final
distribution for ``kl``, to the input row's for ``kl-input``):

=============  ======================================  =====================  ===========
view           quantity, per cell                      scale                  colour map
=============  ======================================  =====================  ===========
logits         the cell's own top-1 logit               5th-95th percentile    cividis
probs          the cell's own top-1 probability        0 .. 1                 cividis
ranks          rank of the final top-1 token           log, 1 .. 100          cividis_r
kl             KL(final || row), nats                  0 .. 30                cividis_r
kl-input       KL(input || row), nats                  0 .. 30                cividis_r
input-rank     rank of the input token                 log, 1 .. 1000         cividis_r
entropy        entropy of the row's distribution       0 .. its maximum       cividis_r
next-rank      rank of the true next token             log, 1 .. 1000         cividis_r
=============  ======================================  =====================  ===========

Values beyond a cap take the end colour (the colour bar shows an arrow). The last position of the
sequence has no next token: its ``next-rank`` cells are blank (light grey).

**Long windows.** A figure is never wider than ``MAX_WIDTH``, 24 inches (3,600 pixels at the default
150 dpi): the width of one panel of ``PANEL_POSITIONS`` (32) readable cells. Cell text is drawn for
windows of at most ``TEXT_POSITIONS`` (64) positions and ``TEXT_CELLS`` (1,024) cells (rows x
positions) a view, in stacked panels of at most 32 positions, each with its own token axes. A longer
window is drawn as one overview panel, at most ``MAX_WIDTH`` wide, without cell text, token labels or
outlines: its axis shows positions, a line marks each position's lock-in row, and the title says what
was left out. A cell text costs matplotlib 1 to 3 ms to draw, so these bounds keep the figure of any
window to a few seconds at most (``scripts/bench_render.py``); ``html.py`` writes every cell of any window.

Every string drawn (cell texts, token axes, row labels, titles) is drawn literally: a token such as
`` $$`` or ``$x^$`` is text, never mathtext or LaTeX (``parse_math=False, usetex=False``).

Only the object-oriented API is used (``matplotlib.figure.Figure``): nothing here touches pyplot's
global state or opens a window. Save with ``save_figure(fig, "lens.png")`` (the size checked first,
an earlier file replaced only once the new one is complete) or ``fig.savefig``; in a notebook the
returned figure displays itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PatchCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from .files import replacing

# Whitespace and control characters as drawn: a space is a middle dot, a newline a return arrow.
VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "⏎"}
CELL_CHARS = 8  # longest cell text, ellipsis included
TICK_CHARS = 14  # longest axis label, ellipsis included

# Layout, in inches and points: a cell is CELL_W x CELL_H; the margins hold labels and colour bar.
CELL_W, CELL_H = 0.68, 0.27
MARGIN_W, MARGIN_H = 2.24, 2.5
CELL_FONT, TICK_FONT = 7.5, 8
OUTLINE = "#e4572e"  # orange-red: visible on both ends of cividis
BLANK = "#e6e6e6"  # cells without a value (next-rank at the last position)
LITERAL = {"parse_math": False, "usetex": False}  # text properties: token text is drawn as it is

# Long windows (the module docstring): the widest figure, and the windows whose cells carry text.
PANEL_POSITIONS = 32  # positions of one panel with cell text
MAX_WIDTH = MARGIN_W + CELL_W * PANEL_POSITIONS  # 24.0 inches: 3,600 pixels at 150 dpi
TEXT_POSITIONS = 64  # cell text for at most this many positions (2 stacked panels) ...
TEXT_CELLS = 1024  # ... and this many cells (rows x positions) a view

# The largest image a figure may be saved as: 150 megapixels (600 MB of RGBA while drawing), and
# Agg's own limit of 2**16 pixels a side. ``save_figure`` refuses larger sizes before drawing.
MAX_MEGAPIXELS = 150
MAX_SIDE = 2**16 - 1
FIGURE_TYPES = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class View:
    """How one quantity of a ``Lens`` is drawn."""

    title: str  # colour bar label and panel title
    values: Callable  # Lens -> [R, W] float array (NaN = no value)
    cmap: str
    vmin: float | None = None  # None: from the data (see ``limits``)
    vmax: float | None = None
    log: bool = False


def _next_rank(lens) -> np.ndarray:
    r = lens.next_rank.astype(np.float64)
    r[lens.next_rank < 1] = np.nan  # -1: the last position has no next token
    return r


VIEWS: dict[str, View] = {
    "logits": View("top-1 logit", lambda L: L.top_logits[..., 0].astype(np.float64), "cividis"),
    "probs": View("top-1 probability", lambda L: L.top_probs[..., 0].astype(np.float64), "cividis", 0.0, 1.0),
    "ranks": View("rank of the final top-1 token", lambda L: L.final_rank.astype(np.float64), "cividis_r",
                  1, 100, log=True),
    "kl": View("KL(final ‖ row), nats", lambda L: L.kl_final.astype(np.float64), "cividis_r", 0.0, 30.0),
    "kl-input": View("KL(input ‖ row), nats", lambda L: L.kl_input.astype(np.float64), "cividis_r", 0.0, 30.0),
    "input-rank": View("rank of the input token", lambda L: L.input_rank.astype(np.float64), "cividis_r",
                       1, 1000, log=True),
    "entropy": View("entropy, nats", lambda L: L.entropy.astype(np.float64), "cividis_r", 0.0, None),
    "next-rank": View("rank of the true next token", _next_rank, "cividis_r", 1, 1000, log=True),
}


# -------------------------------------------------------------------------------------------------
# Text


def visible(token: str, width: int | None = None) -> str:
    """A token as drawn: whitespace made visible, other control characters escaped, and shortened
    to ``width`` characters (the last one an ellipsis) when longer.

    >>> visible(" the"), visible("\\n\\n"), visible(" autoregressive", 8)
    ('·the', '↵↵', '·autore…')
    """
    out = "".join(VISIBLE.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in str(token))
    if width is not None and len(out) > width:
        out = out[:width - 1] + "…"
    return out or "∅"  # an empty string (never a GPT-2 token) still gets a mark


def next_labels(lens, width: int | None = TICK_CHARS) -> list[str]:
    """Top-axis labels: the true next token of each position, ``*`` appended where the final top-1
    equals it; empty at the last position of the sequence (no next token)."""
    nxt = lens.next_ids
    strings = lens.tokens[lens.start + 1:lens.end + 1]
    out = []
    for w, ok in enumerate(lens.final_correct):
        if nxt[w] < 0:
            out.append("")
        else:
            out.append(visible(strings[w], width) + ("*" if ok else ""))
    return out


# -------------------------------------------------------------------------------------------------
# Figures


def limits(lens, view: str, vmin: float | None = None, vmax: float | None = None) -> tuple[float, float]:
    """The colour limits of ``view`` for ``lens``: the arguments where given, else the view's
    defaults (the post's caps), else from the data (logits: 5th to 95th percentile; entropy: 0 to max)."""
    v = _view(view)
    for name, x in (("vmin", vmin), ("vmax", vmax)):
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating))
                              or not math.isfinite(x)):
            raise ValueError(f"{name}={x!r} must be a finite number (or None: the {view} view's default)")
    if v.log and vmin is not None and vmin <= 0:
        raise ValueError(f"vmin={vmin:g} must be above 0: the {view} view has a log scale")
    data = v.values(lens)
    finite = data[np.isfinite(data)]
    lo, hi = (vmin if vmin is not None else v.vmin), (vmax if vmax is not None else v.vmax)
    if lo is None:
        lo = float(np.percentile(finite, 5)) if finite.size else 0.0
    if hi is None:
        hi = float(np.percentile(finite, 95) if view == "logits" else finite.max()) if finite.size else 1.0
    if hi <= lo and (vmin is not None or vmax is not None):  # never change a limit the caller gave
        given = "both given" if vmin is not None and vmax is not None else \
            f"vmax the {view} view's default" if vmin is not None else f"vmin the {view} view's default"
        raise ValueError(f"vmin={lo:g} must be below vmax={hi:g} ({given}): give limits with vmin < vmax")
    if hi <= lo:  # a constant panel and no limits given: widen so the norm is defined
        hi = lo * 10 if v.log else lo + 1.0
    return float(lo), float(hi)


@dataclass(frozen=True)
class Layout:
    """Where a window's positions are drawn: ``panels``, stacked top to bottom, are ``(w0, w1)`` ranges of
    window positions, each panel ``span`` positions wide; ``text``: cell text, token axes and outlines
    (without: one overview panel); ``note``: what an overview leaves out, for its title ('' with text)."""

    panels: tuple
    span: int
    text: bool
    note: str


def layout(W: int, R: int, stack: bool = True) -> Layout:
    """The ``Layout`` of a window of W positions and R rows; ``stack=False``: one panel only (a given Axes).

    Cell text for at most ``TEXT_POSITIONS`` positions (``PANEL_POSITIONS`` without stacking) and
    ``TEXT_CELLS`` cells, in panels of at most ``PANEL_POSITIONS`` positions, balanced (40 positions are
    two panels of 20); anything longer is one overview panel without text.
    """
    most = TEXT_POSITIONS if stack else PANEL_POSITIONS
    if W <= most and R * W <= TEXT_CELLS:
        span = -(-W // -(-W // PANEL_POSITIONS))  # ceil(W / number of panels)
        return Layout(tuple((a, min(a + span, W)) for a in range(0, W, span)), span, True, "")
    note = (f"overview of {W} positions: no cell text, token labels or outlines (drawn for at most {most} positions "
            f"and {TEXT_CELLS:,} cells); the orange line is each position's lock-in row")
    return Layout(((0, W),), W, False, note)


def figsize(lens, n_views: int = 1) -> tuple[float, float]:
    """Figure size in inches: grows with the window width (up to ``MAX_WIDTH``), the rows, the panels of
    ``layout`` and the number of views."""
    return size_of(lens.end - lens.start, len(lens.rows), n_views)


def size_of(W: int, R: int, n_views: int = 1) -> tuple[float, float]:
    """``figsize`` of a window of W positions and R rows (``size_of(1, 1)``: the smallest figure)."""
    lay = layout(W, R)
    return (min(MAX_WIDTH, MARGIN_W + CELL_W * max(lay.span, 4)),
            n_views * len(lay.panels) * (MARGIN_H + CELL_H * max(R, 2)))


def max_dpi(size: tuple[float, float]) -> int:
    """The largest whole dpi at which a figure of ``size`` inches stays within ``MAX_MEGAPIXELS`` and
    ``MAX_SIDE``."""
    w, h = size
    return max(0, math.floor(min(math.sqrt(MAX_MEGAPIXELS * 1e6 / (w * h)), MAX_SIDE / max(w, h))))


def check_pixels(size: tuple[float, float], dpi: float) -> None:
    """Raise a ValueError if a figure of ``size`` inches saved at ``dpi`` exceeds ``MAX_MEGAPIXELS`` or
    ``MAX_SIDE`` pixels a side (cheap: call it before drawing)."""
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float, np.integer, np.floating)) \
            or not math.isfinite(dpi) or dpi <= 0:
        raise ValueError(f"dpi={dpi!r} must be a positive number")
    w, h = size
    px_w, px_h = round(w * dpi), round(h * dpi)
    if w * h * dpi * dpi > MAX_MEGAPIXELS * 1e6 or max(w, h) * dpi > MAX_SIDE:
        raise ValueError(f"a figure of {w:.1f} x {h:.1f} inches at dpi={dpi:g} would be {px_w} x {px_h} pixels "
                         f"({px_w * px_h / 1e6:,.0f} megapixels); the limit is {MAX_MEGAPIXELS} megapixels and "
                         f"{MAX_SIDE} pixels a side: use dpi <= {max_dpi(size)}")


def save_figure(fig: Figure, path, *, dpi: float = 150) -> Path:
    """Save ``fig`` as PNG, SVG or PDF (by the extension), its size checked first (``check_pixels``).

    The file is written beside ``path`` and renamed over it when complete: a failure while drawing
    or writing leaves an earlier file at ``path`` as it was.
    """
    path = Path(path)
    if path.suffix.lower() not in FIGURE_TYPES:
        raise ValueError(f"cannot save a figure as {path.suffix or 'a file without extension'}: "
                         f"use {', '.join(FIGURE_TYPES)}")
    check_pixels(tuple(fig.get_size_inches()), dpi)
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lower()[1:], dpi=dpi)
    return path


def plot_lens(lens, view: str = "logits", *, ax=None, vmin: float | None = None, vmax: float | None = None,
              cmap: str | None = None, title: str | None = None) -> Figure:
    """Draw one view of a ``Lens`` as in the post and return the figure.

    Long windows are drawn in stacked panels, or as an overview without cell text (``layout``; the
    title says so); the figure is never wider than ``MAX_WIDTH``.

    Parameters
    ----------
    lens : gpt2np.Lens, from ``logit_lens`` or ``Lens.load``
    view : one of ``VIEWS``: logits, probs, ranks, kl, kl-input, input-rank, entropy, next-rank
    ax : draw into this matplotlib Axes, as one panel (its figure is returned); default: a new Figure of
        ``figsize(lens)``
    vmin, vmax : colour limits (default: the view's, e.g. KL 0..30, ranks 1..100)
    cmap : a matplotlib colour map name (default: the view's, see the module docstring)
    title : panel title (default: the view, model and decoder settings)

    Returns
    -------
    matplotlib.figure.Figure  (save it with ``fig.savefig(path)``; no window is opened)

    Examples
    --------
    >>> lens = gpt2np.logit_lens(m, m.forward(m.encode(text)), norm="norm", step=2)
    >>> plot_lens(lens, "kl").savefig("kl.png")
    """
    v = _view(view)
    lay = layout(lens.end - lens.start, len(lens.rows), stack=ax is None)
    if ax is None:
        fig = Figure(figsize=figsize(lens), layout="constrained")
        axes = fig.subplots(len(lay.panels), 1, squeeze=False)[:, 0]
    else:
        axes = [ax]
    heading = title if title is not None else f"{v.title}\n{describe(lens)}"
    _draw(axes, lens, view, lay, vmin=vmin, vmax=vmax, cmap=cmap, title=heading + (f"\n{lay.note}" if lay.note else ""))
    return axes[0].figure


def plot_views(lens, views=("logits", "ranks", "kl"), *, vmin=None, vmax=None, cmap=None,
               title: str | None = None) -> Figure:
    """Several views of one ``Lens`` in a grid, one panel per view (or one group of stacked panels, as
    ``plot_lens`` draws a long window), stacked top to bottom.

    ``vmin``, ``vmax`` and ``cmap`` are either one value for every panel or a dict keyed by view.
    ``title`` goes above the grid (default: the model and decoder settings), with an overview's note.
    """
    views = list(views)
    if not views:
        raise ValueError("plot_views needs at least one view")
    for v in views:
        _view(v)
    lay = layout(lens.end - lens.start, len(lens.rows))
    n = len(lay.panels)
    fig = Figure(figsize=figsize(lens, len(views)), layout="constrained")
    axes = fig.subplots(len(views) * n, 1, squeeze=False)[:, 0]

    def pick(arg, v):
        return arg.get(v) if isinstance(arg, dict) else arg

    for i, v in enumerate(views):
        _draw(axes[i * n:(i + 1) * n], lens, v, lay, vmin=pick(vmin, v), vmax=pick(vmax, v), cmap=pick(cmap, v),
              title=VIEWS[v].title)
    heading = title if title is not None else describe(lens)
    fig.suptitle(heading + (f"\n{lay.note}" if lay.note else ""), fontsize=11, **LITERAL)
    return fig


def describe(lens) -> str:
    """One line naming the model, the decoder and the window, for titles."""
    s = lens.settings or {}
    parts = [str(s.get("model", "model")), f"norm={s.get('norm', 'ln_f')}"]
    if s.get("step", 1) != 1:
        parts.append(f"every {s['step']} blocks")
    if s.get("decoder_blocks", 0):
        parts.append(f"last {s['decoder_blocks']} blocks in the decoder")
    parts.append(f"positions {lens.start}..{lens.end - 1} of {len(lens.ids)}")
    return f"{s.get('translator', 'logit lens')} · " + ", ".join(parts)


def _view(view: str) -> View:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: choose one of {', '.join(VIEWS)}")
    return VIEWS[view]


def _draw(axes, lens, view: str, lay: Layout, *, vmin, vmax, cmap, title: str) -> None:
    """One view in the panels ``axes`` of ``lay``: the heat map (one mesh a panel), then either the cell
    texts, outlines and both token axes, or the overview's position axis and lock-in line; the row
    labels, ``title`` above the first panel, and one colour bar beside them all."""
    v = _view(view)
    data = np.ma.masked_invalid(v.values(lens))  # [R, W]
    R, W = data.shape
    lo, hi = limits(lens, view, vmin, vmax)
    norm = LogNorm(lo, hi) if v.log else Normalize(lo, hi)
    cm = colormaps[cmap or v.cmap].with_extremes(bad=BLANK)
    tops = next_labels(lens)
    for i, (ax, (w0, w1)) in enumerate(zip(axes, lay.panels)):
        # one mesh of quads, cell (r, w) centred on (w, r): drawn at any size without resampling an image
        im = ax.pcolormesh(np.arange(w0, w1 + 1) - 0.5, np.arange(R + 1) - 0.5, data[:, w0:w1], cmap=cm, norm=norm)
        ax.set_label(f"lens:{view}")
        if lay.text:
            _cells(ax, lens, im, w0, w1)
            inputs = [visible(t, TICK_CHARS) for t in lens.tokens[lens.start + w0:lens.start + w1]]
            ax.set_xticks(range(w0, w1), labels=inputs, rotation=45, ha="right", rotation_mode="anchor",
                          fontsize=TICK_FONT, **LITERAL)
            top = ax.secondary_xaxis("top")
            top.set_xticks(range(w0, w1), labels=tops[w0:w1], rotation=45, ha="left", rotation_mode="anchor",
                           fontsize=TICK_FONT, **LITERAL)
            top.tick_params(length=0)
            top.set_xlabel("true next token  (* = final top-1 correct)", fontsize=TICK_FONT, **LITERAL)
            ax.set_xlabel("input token", fontsize=TICK_FONT, **LITERAL)
        else:  # positions as numbers, and where each position's top-1 settles on the final one
            ax.stairs(lens.lock_in - 0.5, np.arange(W + 1) - 0.5, baseline=None, color=OUTLINE, linewidth=1.2,
                      gid="lock-in")
            ax.xaxis.set_major_locator(MaxNLocator(12, integer=True))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{lens.start + round(x)}"))
            ax.set_xlabel("position", fontsize=TICK_FONT, **LITERAL)
            ax.tick_params(axis="x", labelsize=TICK_FONT)
        ax.set(xlim=(w0 - 0.5, w0 + lay.span - 0.5), ylim=(-0.5, R - 0.5))  # equal cells in every panel
        ax.set_yticks(range(R), labels=list(lens.rows), fontsize=TICK_FONT, **LITERAL)
        ax.tick_params(length=0)
        ax.set_ylabel("layer (row read by the lens)", fontsize=TICK_FONT, **LITERAL)
        if i == 0:
            ax.set_title(title, fontsize=10, loc="left", **LITERAL)
        if len(lay.panels) > 1:
            ax.set_title(f"positions {lens.start + w0}..{lens.start + w1 - 1}", fontsize=TICK_FONT, loc="right")

    # arrows on the colour bar: values beyond a cap (or outside the logits' percentile range) saturate
    fig = axes[0].figure
    extend = "max" if v.log or view.startswith("kl") else "both" if view == "logits" else "neither"
    cb = fig.colorbar(im, ax=list(axes), extend=extend, pad=0.25 / max(fig.get_size_inches()[0], 1), fraction=0.02,
                      aspect=max(10, 1.6 * R * len(axes)))
    capped = view != "probs" and (v.vmax is not None or vmax is not None)
    label = v.title + (f" (capped at {hi:g})" if capped else "")
    cb.set_label(label, fontsize=TICK_FONT, **LITERAL)
    cb.ax.tick_params(labelsize=TICK_FONT)
    if v.log:  # 1, 10, 100 rather than 10^0, 10^1, 10^2
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())


def _cells(ax, lens, im, w0: int, w1: int) -> None:
    """Cell texts of window positions [w0, w1) (black on light cells, white on dark ones) and one
    collection of outlines, around the cells whose top-1 is the final top-1."""
    rgba = im.to_rgba(im.get_array())  # [R, w1 - w0, 4]
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    for r in range(rgba.shape[0]):
        for w in range(w0, w1):  # in_layout=False: inside the axes, so the layout need not measure them
            ax.text(w, r, visible(lens.top_tokens[r, w, 0], CELL_CHARS), ha="center", va="center", fontsize=CELL_FONT,
                    color="white" if luma[r, w - w0] < 0.5 else "black", in_layout=False, **LITERAL)
    rows, cols = np.nonzero(lens.matches_final[:, w0:w1])
    boxes = [Rectangle((w0 + w - 0.46, r - 0.44), 0.92, 0.88) for r, w in zip(rows, cols)]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=OUTLINE, linewidth=1.4, gid="outline"),
                      autolim=False)
