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

Only the object-oriented API is used (``matplotlib.figure.Figure``): nothing here touches pyplot's
global state or opens a window. Save with ``fig.savefig("lens.png")``; in a notebook the returned
figure displays itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

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
    data = v.values(lens)
    finite = data[np.isfinite(data)]
    lo, hi = (vmin if vmin is not None else v.vmin), (vmax if vmax is not None else v.vmax)
    if lo is None:
        lo = float(np.percentile(finite, 5)) if finite.size else 0.0
    if hi is None:
        hi = float(np.percentile(finite, 95) if view == "logits" else finite.max()) if finite.size else 1.0
    if hi <= lo:  # a constant panel: widen so the norm is defined
        hi = lo * 10 if v.log else lo + 1.0
    return float(lo), float(hi)


def figsize(lens, n_panels: int = 1) -> tuple[float, float]:
    """Figure size in inches: grows with the window width and the number of rows (and panels)."""
    W, R = lens.end - lens.start, len(lens.rows)
    return MARGIN_W + CELL_W * max(W, 4), n_panels * (MARGIN_H + CELL_H * max(R, 2))


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
    fig.suptitle(title if title is not None else describe(lens), fontsize=11)
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
    return "logit lens · " + ", ".join(parts)


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

    # cell texts, black on light cells and white on dark ones
    rgba = im.to_rgba(np.ma.masked_invalid(data))  # [R, W, 4]
    luma = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    for r in range(R):
        for w in range(W):
            ax.text(w, r, visible(lens.top_tokens[r, w, 0], CELL_CHARS), ha="center", va="center",
                    fontsize=CELL_FONT, color="white" if luma[r, w] < 0.5 else "black")
    # outlines where the cell's top-1 is the final top-1
    for r, w in zip(*np.nonzero(lens.matches_final)):
        ax.add_patch(Rectangle((w - 0.46, r - 0.44), 0.92, 0.88, fill=False, edgecolor=OUTLINE, linewidth=1.4,
                               gid="outline"))

    ax.set_yticks(range(R), labels=list(lens.rows), fontsize=TICK_FONT)
    ax.set_xticks(range(W), labels=[visible(t, TICK_CHARS) for t in lens.tokens[lens.start:lens.end]],
                  rotation=45, ha="right", rotation_mode="anchor", fontsize=TICK_FONT)
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(W), labels=next_labels(lens), rotation=45, ha="left", rotation_mode="anchor",
                   fontsize=TICK_FONT)
    for a in (ax, top):
        a.tick_params(length=0)
    ax.set_ylabel("layer (row read by the lens)", fontsize=TICK_FONT)
    ax.set_xlabel("input token", fontsize=TICK_FONT)
    top.set_xlabel("true next token  (* = final top-1 correct)", fontsize=TICK_FONT)
    ax.set_title(title if title is not None else f"{v.title}\n{describe(lens)}", fontsize=10, loc="left")

    # arrows on the colour bar: values beyond a cap (or outside the logits' percentile range) saturate
    extend = "max" if v.log or view.startswith("kl") else "both" if view == "logits" else "neither"
    cax_pad = 0.25 / max(ax.figure.get_size_inches()[0], 1)
    cb = ax.figure.colorbar(im, ax=ax, extend=extend, pad=cax_pad, fraction=0.02, aspect=max(10, 1.6 * R))
    capped = view != "probs" and (v.vmax is not None or vmax is not None)
    label = v.title + (f" (capped at {hi:g})" if capped else "")
    cb.set_label(label, fontsize=TICK_FONT)
    cb.ax.tick_params(labelsize=TICK_FONT)
    if v.log:  # 1, 10, 100 rather than 10^0, 10^1, 10^2
        cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        cb.ax.yaxis.set_minor_formatter(NullFormatter())
