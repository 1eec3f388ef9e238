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
from matplotlib.ticker import FuncFormatter, NullFormatter

from .files import replacing

# Whitespace and control characters as drawn: a space is a middle dot, a newline a return arrow.
VISIBLE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "⏎"}
CELL_CHARS = 8  # longest cell text, ellipsis included
TICK_CHARS = 14  # longest axis label, ellipsis included

# Layout, in inches and points: a cell is CELL_W x CELL_H; the margins hold labels and colour bar.
CELL_W, CELL_H = 0.68, 0.27
MARGIN_W, MARGIN_H = 2.3, 2.5
CELL_FONT, TICK_FONT = 7.5, 8
OUTLINE = "#e4572e"  # orange-red: visible on both ends of cividis
BLANK = "#e6e6e6"  # cells without a value (next-rank at the last position)
LITERAL = {"parse_math": False, "usetex": False}  # text properties: token text is drawn as it is

# The widest figure drawn: 48 inches (7,200 pixels at the command line's 150 dpi). Cells keep their
# readable width (CELL_W) up to TEXT_POSITIONS positions; a longer window is drawn narrower to fit, with
# no cell text (a cell would be too narrow to read) and every n-th token on the axes, and says so.
MAX_WIDTH = 48.0
TEXT_POSITIONS = int((MAX_WIDTH - MARGIN_W) / CELL_W)  # 67

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


def figsize(lens, n_panels: int = 1) -> tuple[float, float]:
    """Figure size in inches: grows with the window width and the number of rows (and panels)."""
    return size_of(lens.end - lens.start, len(lens.rows), n_panels)


def size_of(W: int, R: int, n_panels: int = 1) -> tuple[float, float]:
    """``figsize`` of a window of W positions and R rows (``size_of(1, 1)``: the smallest figure); never
    wider than ``MAX_WIDTH``."""
    return min(MARGIN_W + CELL_W * max(W, 4), MAX_WIDTH), n_panels * (MARGIN_H + CELL_H * max(R, 2))


def has_text(lens) -> bool:
    """Whether the figure of ``lens`` writes each cell's token: windows up to ``TEXT_POSITIONS`` positions."""
    return lens.end - lens.start <= TEXT_POSITIONS


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

    Parameters
    ----------
    lens : gpt2np.Lens, from ``logit_lens`` or ``Lens.load``
    view : one of ``VIEWS``: logits, probs, ranks, kl, kl-input, input-rank, entropy, next-rank
    ax : draw into this matplotlib Axes (its figure is returned); default: a new Figure of ``figsize(lens)``
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
    _view(view)
    if ax is None:
        fig = Figure(figsize=figsize(lens), layout="constrained")
        ax = fig.add_subplot()
    _draw(ax, lens, view, vmin=vmin, vmax=vmax, cmap=cmap, title=title)
    return ax.figure


def plot_views(lens, views=("logits", "ranks", "kl"), *, vmin=None, vmax=None, cmap=None,
               title: str | None = None) -> Figure:
    """Several views of one ``Lens`` in a grid, one panel per view, stacked top to bottom.

    ``vmin``, ``vmax`` and ``cmap`` are either one value for every panel or a dict keyed by view.
    ``title`` goes above the grid (default: the model and decoder settings).
    """
    views = list(views)
    if not views:
        raise ValueError("plot_views needs at least one view")
    for v in views:
        _view(v)
    fig = Figure(figsize=figsize(lens, len(views)), layout="constrained")
    axes = fig.subplots(len(views), 1, squeeze=False)[:, 0]

    def pick(arg, v):
        return arg.get(v) if isinstance(arg, dict) else arg

    for ax, v in zip(axes, views):
        _draw(ax, lens, v, vmin=pick(vmin, v), vmax=pick(vmax, v), cmap=pick(cmap, v), title=VIEWS[v].title)
    fig.suptitle(title if title is not None else describe(lens), fontsize=11, **LITERAL)
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


def _draw(ax, lens, view: str, *, vmin, vmax, cmap, title) -> None:
    """The heat map, cell texts, outlines, both token axes and the colour bar of one view."""
    v = _view(view)
    data = v.values(lens)  # [R, W]
    R, W = data.shape
    lo, hi = limits(lens, view, vmin, vmax)
    norm = LogNorm(lo, hi) if v.log else Normalize(lo, hi)
    cm = colormaps[cmap or v.cmap].with_extremes(bad=BLANK)
    im = ax.imshow(np.ma.masked_invalid(data), origin="lower", aspect="auto", interpolation="nearest",
                   cmap=cm, norm=norm)
    ax.set_label(f"lens:{view}")

    # cell texts, black on light cells and white on dark ones (windows too long to read them: none)
    text = has_text(lens)
    if text:
        rgba = im.to_rgba(np.ma.masked_invalid(data))  # [R, W, 4]
        luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        for r in range(R):
            for w in range(W):
                ax.text(w, r, visible(lens.top_tokens[r, w, 0], CELL_CHARS), ha="center", va="center",
                        fontsize=CELL_FONT, color="white" if luma[r, w] < 0.5 else "black", **LITERAL)
    # outlines where the cell's top-1 is the final top-1: one collection, however many cells
    boxes = [Rectangle((w - 0.46, r - 0.44), 0.92, 0.88) for r, w in zip(*np.nonzero(lens.matches_final))]
    ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor=OUTLINE, linewidth=1.4 if text else 0.6,
                                      gid="outline"))

    ax.set_yticks(range(R), labels=list(lens.rows), fontsize=TICK_FONT, **LITERAL)
    every = 1 if text else math.ceil(W / TEXT_POSITIONS)  # a long window: every n-th token on the axes
    ticks = range(0, W, every)
    inputs = [visible(t, TICK_CHARS) for t in lens.tokens[lens.start:lens.end]]
    ax.set_xticks(ticks, labels=[inputs[w] for w in ticks], rotation=45, ha="right", rotation_mode="anchor",
                  fontsize=TICK_FONT, **LITERAL)
    top = ax.secondary_xaxis("top")
    nxt = next_labels(lens)
    top.set_xticks(ticks, labels=[nxt[w] for w in ticks], rotation=45, ha="left", rotation_mode="anchor",
                   fontsize=TICK_FONT, **LITERAL)
    for a in (ax, top):
        a.tick_params(length=0)
    ax.set_ylabel("layer (row read by the lens)", fontsize=TICK_FONT, **LITERAL)
    ax.set_xlabel("input token" if text else f"input token (one in {every} shown; no cell text: {W} positions "
                  f"are more than the {TEXT_POSITIONS} a figure at most {MAX_WIDTH:g} inches wide can write; "
                  "narrow the window or use an .html page)", fontsize=TICK_FONT, **LITERAL)
    top.set_xlabel("true next token  (* = final top-1 correct)", fontsize=TICK_FONT, **LITERAL)
    ax.set_title(title if title is not None else f"{v.title}\n{describe(lens)}", fontsize=10, loc="left",
                 **LITERAL)

    # arrows on the colour bar: values beyond a cap (or outside the logits' percentile range) saturate
    extend = "max" if v.log or view.startswith("kl") else "both" if view == "logits" else "neither"
    cax_pad = 0.25 / max(ax.figure.get_size_inches()[0], 1)
    cb = ax.figure.colorbar(im, ax=ax, extend=extend, pad=cax_pad, fraction=0.02, aspect=max(10, 1.6 * R))
    capped = view != "probs" and (v.vmax is not None or vmax is not None)
    label = v.title + (f" (capped at {hi:g})" if capped else "")
    cb.set_label(label, fontsize=TICK_FONT, **LITERAL)
    cb.ax.tick_params(labelsize=TICK_FONT)
    if v.log:  # 1, 10, 100 rather than 10^0, 10^1, 10^2
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
