"""Figures of the logit lens, checked through the matplotlib objects (no pixels compared): cell texts,
outlines, the ``*`` marks, colour scales, tick labels, sizes, and a rendered file for every view.

Lenses come from the tiny random checkpoint of conftest.py; where a test needs the model to be right
(``*`` marks, outlines everywhere), the lens is edited with ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import gpt2np
from gpt2np import plot as P
from gpt2np.lens import Lens

TEXT = "When people say plasma,\nthey\tmean blood. Other times"  # 33 tokens in the tiny vocabulary (32 used)
VIEWS = ("logits", "probs", "ranks", "kl", "kl-input", "input-rank", "entropy", "next-rank")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shown(token: str, width: int) -> str:
    """The visible-whitespace mapping, written out independently of gpt2np.plot: space, newline, tab and
    carriage return as symbols, other control characters as \\xNN escapes, an ellipsis past ``width``."""
    s = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    s = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in s)
    return (s if len(s) <= width else s[:width - 1] + "…") or "∅"  # an empty string still gets a mark


@pytest.fixture(scope="module")
def ids(tiny_model):
    """32 tokens: one panel of a figure (``P.PANEL_POSITIONS``)."""
    return tiny_model.encode(TEXT)[:P.PANEL_POSITIONS]


@pytest.fixture(scope="module")
def lens(tiny_model, ids):
    """Whole sequence (the last position has no next token), input row included."""
    return gpt2np.logit_lens(tiny_model, tiny_model.forward(ids))


@pytest.fixture(scope="module")
def window_lens(tiny_model, ids):
    """A window in the middle, with sub-rows and a step: rows 'input', '0.attn', '0', '2.attn', '2'."""
    trace = tiny_model.forward(ids, sublayers=True)
    return gpt2np.logit_lens(tiny_model, trace, start=5, end=17, sublayers=True, step=2)


@pytest.fixture(scope="module")
def right_lens(lens):
    """The same lens with the final top-1 set to the true next token at every third position, so that
    some top-axis labels carry a ``*`` (a random model is rarely right)."""
    final = lens.final_ids.copy()
    nxt = lens.next_ids
    pick = (np.arange(len(final)) % 3 == 0) & (nxt >= 0)
    final[pick] = nxt[pick]
    return dataclasses.replace(lens, final_ids=final)


def heatmaps(fig):
    """The lens panels of a figure (colour bars and the top token axes are separate)."""
    return [a for a in fig.axes if a.get_label().startswith("lens:")]


def one_heatmap(fig):
    (ax,) = heatmaps(fig)
    return ax


def mesh(ax):
    """The heat map of a panel: one QuadMesh (``pcolormesh``), cell (r, w) centred on (w, r)."""
    (m,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    return m


def outlined(ax) -> set:
    """Centres (w, r) of a panel's outlined cells: the rectangles of its one collection of outlines."""
    (boxes,) = [c for c in ax.collections if c.get_gid() == "outline"]
    return {(round(p.vertices[:4, 0].mean()), round(p.vertices[:4, 1].mean())) for p in boxes.get_paths()}


def top_axis(ax):
    (top,) = ax.child_axes
    return top


# -------------------------------------------------------------------------------------------------
# Text


def test_visible_whitespace_and_ellipsis():
    assert P.visible(" the") == "·the"
    assert P.visible("\n\n") == "↵↵"
    assert P.visible("\t x\r") == "⇥·x⏎"
    assert P.visible("\x00\x1b") == "\\x00\\x1b"
    assert P.visible(" autoregressive", 8) == "·autore…" and len(P.visible(" autoregressive", 8)) == 8
    assert P.visible("abcdefgh", 8) == "abcdefgh"  # exactly the width: unchanged
    assert P.visible("") == "∅"


@pytest.mark.parametrize("view", ["logits", "kl", "next-rank"])
def test_cell_texts_are_the_top1_tokens(lens, view):
    ax = one_heatmap(P.plot_lens(lens, view))
    R, W = len(lens.rows), lens.end - lens.start
    assert len(ax.texts) == R * W
    got = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    want = {(w, r): shown(lens.top_tokens[r, w, 0], P.CELL_CHARS) for r in range(R) for w in range(W)}
    assert got == want


def test_cell_text_contrasts_with_its_colour(lens):
    ax = one_heatmap(P.plot_lens(lens, "kl"))
    im = mesh(ax)
    rgba = im.to_rgba(im.get_array())
    for t in ax.texts:
        w, r = (round(v) for v in t.get_position())
        dark = rgba[r, w, :3] @ [0.299, 0.587, 0.114] < 0.5
        assert t.get_color() == ("white" if dark else "black")


def test_outlines_mark_cells_whose_top1_is_the_final_top1(window_lens):
    ax = one_heatmap(P.plot_lens(window_lens, "ranks"))
    (outlines,) = [c for c in ax.collections if c.get_gid() == "outline"]
    boxes = [p.vertices[:4] for p in outlines.get_paths()]  # each a rectangle's corners
    assert len(boxes) == window_lens.matches_final.sum() > 0
    centres = {(round(b[:, 0].mean()), round(b[:, 1].mean())) for b in boxes}
    assert centres == {(w, r) for r, w in zip(*np.nonzero(window_lens.matches_final))}
    # the last row is the final distribution itself: every cell of it is outlined
    assert all((w, len(window_lens.rows) - 1) in centres for w in range(window_lens.end - window_lens.start))


def test_stars_on_the_top_axis_where_the_final_top1_is_right(right_lens):
    ax = one_heatmap(P.plot_lens(right_lens, "logits"))
    labels = [t.get_text() for t in top_axis(ax).get_xticklabels()]
    assert sum(s.endswith("*") for s in labels) == right_lens.final_correct.sum() > 0
    nxt = right_lens.tokens[right_lens.start + 1:right_lens.end + 1]
    for w, ok in enumerate(right_lens.final_correct[:-1]):
        assert labels[w] == shown(nxt[w], P.TICK_CHARS) + ("*" if ok else "")
    assert labels[-1] == ""  # the last position of the sequence has no next token


def test_token_axes_and_row_labels(window_lens):
    ax = one_heatmap(P.plot_lens(window_lens, "kl"))
    assert window_lens.rows == ("input", "0.attn", "0", "2.attn", "2")
    assert [t.get_text() for t in ax.get_yticklabels()] == list(window_lens.rows)
    assert list(ax.get_yticks()) == list(range(len(window_lens.rows)))  # input at the bottom (y = 0)
    assert not ax.yaxis_inverted()
    bottom = [t.get_text() for t in ax.get_xticklabels()]
    assert bottom == [shown(s, P.TICK_CHARS) for s in window_lens.tokens[5:17]]
    assert all(t.get_rotation() == 45 for t in ax.get_xticklabels())
    top = [t.get_text() for t in top_axis(ax).get_xticklabels()]
    assert [s.rstrip("*") for s in top] == [shown(s, P.TICK_CHARS) for s in window_lens.tokens[6:18]]
    assert all(t.get_rotation() == 45 for t in top_axis(ax).get_xticklabels())


# -------------------------------------------------------------------------------------------------
# Colours


@pytest.mark.parametrize("view, log, lo, hi", [
    ("kl", False, 0, 30), ("kl-input", False, 0, 30), ("probs", False, 0, 1),
    ("ranks", True, 1, 100), ("input-rank", True, 1, 1000), ("next-rank", True, 1, 1000)])
def test_colour_limits_are_the_posts(lens, view, log, lo, hi):
    fig = P.plot_lens(lens, view)
    im = mesh(one_heatmap(fig))
    assert isinstance(im.norm, LogNorm) is log
    assert (im.norm.vmin, im.norm.vmax) == (lo, hi)
    (cbar_ax,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert cbar_ax.get_ylabel().startswith(P.VIEWS[view].title)


def test_colour_values_are_the_lens_quantities(lens):
    for view, field in (("kl", lens.kl_final), ("ranks", lens.final_rank), ("kl-input", lens.kl_input),
                        ("input-rank", lens.input_rank), ("entropy", lens.entropy)):
        data = mesh(one_heatmap(P.plot_lens(lens, view))).get_array()
        np.testing.assert_array_equal(np.ma.getdata(data), field.astype(np.float64))
    data = mesh(one_heatmap(P.plot_lens(lens, "logits"))).get_array()
    np.testing.assert_array_equal(np.ma.getdata(data), lens.top_logits[..., 0].astype(np.float64))


def test_next_rank_is_blank_at_the_last_position(lens):
    data = mesh(one_heatmap(P.plot_lens(lens, "next-rank"))).get_array()
    assert np.ma.getmaskarray(data)[:, -1].all() and not np.ma.getmaskarray(data)[:, :-1].any()
    np.testing.assert_array_equal(data[:, :-1], lens.next_rank[:, :-1])


def test_logits_scale_and_overrides(lens):
    im = mesh(one_heatmap(P.plot_lens(lens, "logits")))
    top1 = lens.top_logits[..., 0]
    assert im.norm.vmin == pytest.approx(np.percentile(top1, 5)) and im.norm.vmax == pytest.approx(np.percentile(top1, 95))
    im = mesh(one_heatmap(P.plot_lens(lens, "kl", vmin=1, vmax=5, cmap="magma")))
    assert (im.norm.vmin, im.norm.vmax, im.cmap.name) == (1, 5, "magma")
    assert mesh(one_heatmap(P.plot_lens(lens, "kl"))).cmap.name == "cividis_r"  # good = light


def test_titles(lens):
    ax = one_heatmap(P.plot_lens(lens, "kl", title="my title"))
    assert ax.get_title(loc="left") == "my title"
    ax = one_heatmap(P.plot_lens(lens, "kl"))
    assert "KL(final ‖ row)" in ax.get_title(loc="left") and lens.settings["model"] in ax.get_title(loc="left")


# -------------------------------------------------------------------------------------------------
# Figures, grids, files


def test_returns_a_figure_and_draws_into_a_given_axes(lens):
    fig = P.plot_lens(lens, "kl")
    assert isinstance(fig, Figure)
    host = Figure()
    ax = host.add_subplot()
    assert P.plot_lens(lens, "ranks", ax=ax) is host
    assert heatmaps(host) == [ax]


def test_grid_has_one_panel_per_view(window_lens):
    views = ["logits", "kl", "input-rank"]
    fig = P.plot_views(window_lens, views, vmax={"kl": 10})
    axes = heatmaps(fig)
    assert [a.get_label() for a in axes] == [f"lens:{v}" for v in views]
    assert mesh(axes[1]).norm.vmax == 10 and mesh(axes[2]).norm.vmax == 1000
    for ax in axes:
        assert len(ax.texts) == len(window_lens.rows) * 12
    assert fig.get_size_inches()[1] > P.plot_lens(window_lens, "kl").get_size_inches()[1] * 2.5


def test_unknown_view_is_an_error(lens):
    with pytest.raises(ValueError, match="unknown view 'kl-final'.*logits"):
        P.plot_lens(lens, "kl-final")
    with pytest.raises(ValueError, match="unknown view"):
        P.plot_views(lens, ["kl", "nope"])


def test_size_grows_with_window_and_rows(tiny_model, ids):
    trace = tiny_model.forward(ids, sublayers=True)
    narrow = gpt2np.logit_lens(tiny_model, trace, start=0, end=6)
    wide = gpt2np.logit_lens(tiny_model, trace, start=0, end=24)
    tall = gpt2np.logit_lens(tiny_model, trace, start=0, end=6, sublayers=True)
    (w0, h0), (w1, h1), (w2, h2) = (P.plot_lens(x, "kl").get_size_inches() for x in (narrow, wide, tall))
    assert w1 > w0 + 18 * P.CELL_W * 0.99 and h1 == h0
    assert h2 > h0 and w2 == w0


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_renders_a_png(window_lens, view, tmp_path):
    path = tmp_path / f"{view}.png"
    P.plot_lens(window_lens, view).savefig(path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_svg_and_pdf(window_lens, tmp_path):
    fig = P.plot_views(window_lens, ["kl", "ranks"])
    fig.savefig(tmp_path / "g.svg")
    fig.savefig(tmp_path / "g.pdf")
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "g.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_saved_lens_draws_the_same(window_lens, tmp_path):
    for name in ("l.npz", "l.json"):
        loaded = Lens.load(window_lens.save(tmp_path / name))
        a = [t.get_text() for t in one_heatmap(P.plot_lens(window_lens, "ranks")).texts]
        b = [t.get_text() for t in one_heatmap(P.plot_lens(loaded, "ranks")).texts]
        assert a == b


def test_no_pyplot_and_no_window():
    """Library code never imports pyplot (its global state and GUI backends)."""
    code = ("import sys, gpt2np.plot, gpt2np.cli; from gpt2np.lens import Lens; "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------------------------------------
# Bad input: token text that looks like mathtext, figures too large to draw, failed saves, limits


MATHLIKE = ["$$", " $$", "$x^$", "$\\foo$ 50% _x_ ^{y}"]


@pytest.mark.parametrize("token", MATHLIKE)
def test_token_text_is_drawn_literally(tiny_model, ids, token):
    """Text containing $ (mathtext), \\ or ^ is drawn as it is, everywhere: cells, both token axes,
    row labels and titles, in one panel and in a grid, rendered with Agg."""
    import io

    lens = gpt2np.logit_lens(tiny_model, tiny_model.forward(ids[:5]))
    top_tokens, tokens = lens.top_tokens.astype("U32"), lens.tokens.astype("U32")  # room for the token
    top_tokens[0, 0, 0] = token
    tokens[0] = tokens[1] = token  # the first input token and the first next token
    odd = dataclasses.replace(lens, top_tokens=top_tokens, tokens=tokens, rows=(token, *lens.rows[1:]),
                              settings={**lens.settings, "model": token})
    for fig in (P.plot_lens(odd, "kl"), P.plot_lens(odd, "ranks", title=token),
                P.plot_views(odd, ["kl", "logits"], title=token)):
        fig.savefig(io.BytesIO(), format="png", dpi=40)  # raised mathtext's ParseException before
        ax = heatmaps(fig)[0]
        drawn = [ax.texts[0], ax.get_xticklabels()[0], top_axis(ax).get_xticklabels()[0], ax.get_yticklabels()[0],
                 ax.title if ax.get_title() else ax._left_title]
        assert [t.get_text() for t in drawn[:4]] == [shown(token, P.CELL_CHARS), shown(token, P.TICK_CHARS),
                                                     shown(token, P.TICK_CHARS), token]
        assert token in drawn[4].get_text() or token in fig.get_suptitle()
        if fig._suptitle is not None:
            drawn.append(fig._suptitle)
        for t in drawn:
            assert t.get_parse_math() is False and t.get_usetex() is False, t.get_text()


def test_a_figure_too_large_is_refused_before_drawing(window_lens, tmp_path, monkeypatch):
    fig = P.plot_lens(window_lens, "kl")
    size = tuple(fig.get_size_inches())
    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: pytest.fail("the figure was drawn"))
    path = tmp_path / "big.png"
    with pytest.raises(ValueError, match=r"megapixels\); the limit is 150 megapixels .* use dpi <= \d+"):
        P.save_figure(fig, path, dpi=100000)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    assert P.MAX_MEGAPIXELS == 150
    best = P.max_dpi(size)
    P.check_pixels(size, best)  # the largest allowed dpi passes, one more does not
    assert size[0] * size[1] * best**2 <= 150e6 < size[0] * size[1] * (best + 1) ** 2
    with pytest.raises(ValueError, match="the limit is 150 megapixels"):
        P.check_pixels(size, best + 1)
    with pytest.raises(ValueError, match="pixels a side"):
        P.check_pixels((2000.0, 1.0), 40)  # 80000 x 40 pixels: few megapixels, too wide for Agg
    for bad in (0, -1, float("nan"), "100"):
        with pytest.raises(ValueError, match="dpi=.* must be a positive number"):
            P.check_pixels(size, bad)


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_save_figure_writes_and_never_destroys_an_earlier_file(window_lens, tmp_path, monkeypatch, suffix):
    fig = P.plot_lens(window_lens, "kl")
    path = P.save_figure(fig, tmp_path / f"f{suffix}", dpi=50)
    magic = {".png": PNG_MAGIC, ".svg": b"<?xml", ".pdf": b"%PDF-"}[suffix]
    before = path.read_bytes()
    assert before.startswith(magic)

    def fail_midway(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(magic + b" half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        P.save_figure(fig, path, dpi=50)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="use .png, .svg, .pdf"):
        P.save_figure(fig, tmp_path / "f.jpg")


def test_colour_limits_given_are_never_changed(lens):
    with pytest.raises(ValueError, match="vmin=50 must be below vmax=30 .*vmax the kl view's default"):
        P.limits(lens, "kl", vmin=50)
    with pytest.raises(ValueError, match="vmin=3 must be below vmax=1 .*both given"):
        P.plot_lens(lens, "probs", vmin=3, vmax=1)
    with pytest.raises(ValueError, match="vmin=2 must be below vmax=2"):
        P.limits(lens, "entropy", vmin=2, vmax=2)
    with pytest.raises(ValueError, match="vmin=0 must be above 0: the ranks view has a log scale"):
        P.plot_lens(lens, "ranks", vmin=0)
    with pytest.raises(ValueError, match="vmax=nan must be a finite number"):
        P.limits(lens, "kl", vmax=float("nan"))
    assert P.limits(lens, "kl", vmin=5) == (5.0, 30.0)  # a limit that fits is used as given


# -------------------------------------------------------------------------------------------------
# Long windows: never wider than MAX_WIDTH; cell text in stacked panels up to TEXT_POSITIONS positions
# and TEXT_CELLS cells; beyond, one overview without text (its title says so); a bounded number of artists


@pytest.fixture(scope="module")
def long_model(make_checkpoint):
    """The tiny model with a context of 3,000 positions."""
    return gpt2np.load(make_checkpoint(n_positions=3000))


@pytest.fixture(scope="module")
def long_lens(long_model):
    """``long_lens(T)``: the lens of positions [0, T) of one 3,000-token trace."""
    trace = long_model.forward(np.arange(3000) * 7 % 397)
    return lambda T: gpt2np.logit_lens(long_model, trace, end=T, k=1)


def test_the_stated_limits():
    assert P.MAX_WIDTH == 24.0 and round(P.MAX_WIDTH * 150) == 3600  # 24 inches: 3,600 pixels at 150 dpi
    assert (P.PANEL_POSITIONS, P.TEXT_POSITIONS, P.TEXT_CELLS) == (32, 64, 1024)
    assert P.size_of(P.PANEL_POSITIONS, 13)[0] == pytest.approx(P.MAX_WIDTH)  # a full panel is the widest figure


@pytest.mark.parametrize("R", [1, 4, 13, 25, 49, 97])
def test_the_layout_rule_for_every_window(R):
    """Every window of 1 to 3,000 positions: panels of at most 32 positions that cover it in order, cell text
    exactly when it has at most 64 positions and 1,024 cells, a figure no wider than 24 inches."""
    for W in range(1, 3001):
        lay = P.layout(W, R)
        assert lay.text == (W <= 64 and R * W <= 1024), (W, R)
        edges = [w for panel in lay.panels for w in panel]
        assert edges[0] == 0 and edges[-1] == W and edges[1:-1:2] == edges[2:-1:2]  # contiguous, in order
        assert all(0 < w1 - w0 <= lay.span for w0, w1 in lay.panels)
        if lay.text:
            assert lay.span <= P.PANEL_POSITIONS and lay.note == ""
            assert len(lay.panels) == -(-W // P.PANEL_POSITIONS)  # as few panels as fit, balanced
        else:
            assert len(lay.panels) == 1 and lay.note.startswith(f"overview of {W} positions: no cell text")
        assert P.size_of(W, R)[0] <= P.MAX_WIDTH and P.size_of(W, R, 3)[0] <= P.MAX_WIDTH
    if R * 40 <= 1024:
        assert P.layout(40, R).panels == ((0, 20), (20, 40))  # balanced
    assert not P.layout(40, 4, stack=False).text and P.layout(32, 4, stack=False).text  # a given Axes: one panel


@pytest.mark.parametrize("T", [10, 100, 1000, 3000])
def test_no_figure_is_wider_than_the_limit(long_lens, T):
    lens = long_lens(T)
    R = len(lens.rows)
    for fig in (P.plot_lens(lens, "kl"), P.plot_views(lens, ["logits", "ranks"])):
        w, h = fig.get_size_inches()
        assert w <= P.MAX_WIDTH and round(w * 150) <= 3600
        panels = heatmaps(fig)
        texts = sum(len(ax.texts) for ax in panels)
        if T <= P.TEXT_POSITIONS:  # every cell written once
            assert texts == R * T * len(panels) // len(P.layout(T, R).panels)
        else:  # at most one panel a view, no cell text, a bounded number of artists whatever T
            assert len(panels) in (1, 2) and texts == 0
            for ax in panels:
                lo, hi = ax.get_xlim()
                assert len([t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]) <= 13
                assert len(ax.get_children()) < 40


def test_a_window_of_several_panels_writes_every_cell_once(long_lens):
    lens = long_lens(40)  # two panels of 20 positions
    R = len(lens.rows)
    fig = P.plot_lens(lens, "ranks")
    panels = heatmaps(fig)
    assert len(panels) == 2 and fig.get_size_inches()[0] == pytest.approx(P.MARGIN_W + 20 * P.CELL_W)
    cells = [(round(t.get_position()[0]), round(t.get_position()[1]), t.get_text()) for ax in panels for t in ax.texts]
    assert sorted(cells) == sorted((w, r, shown(lens.top_tokens[r, w, 0], P.CELL_CHARS))
                                   for r in range(R) for w in range(40))
    tokens = [t.get_text() for ax in panels for t in ax.get_xticklabels()]
    assert tokens == [shown(s, P.TICK_CHARS) for s in lens.tokens[:40]]
    nxt = [t.get_text() for ax in panels for t in top_axis(ax).get_xticklabels()]
    assert nxt == [shown(s, P.TICK_CHARS) + ("*" if ok else "") for s, ok in zip(lens.tokens[1:41], lens.final_correct)]
    assert set().union(*(outlined(ax) for ax in panels)) == {(w, r) for r, w in zip(*np.nonzero(lens.matches_final))}
    for ax, (w0, w1) in zip(panels, [(0, 20), (20, 40)]):  # equal cells, each panel its own positions
        assert ax.get_xlim() == (w0 - 0.5, w1 - 0.5)
        np.testing.assert_array_equal(mesh(ax).get_array(), lens.final_rank[:, w0:w1])
        assert ax.get_title(loc="right") == f"positions {w0}..{w1 - 1}"
    assert "overview" not in panels[0].get_title(loc="left")


def test_a_long_window_is_an_overview_that_says_so(long_lens):
    lens = long_lens(1000)
    ax = one_heatmap(P.plot_lens(lens, "kl"))
    title = ax.get_title(loc="left")
    assert "KL(final ‖ row)" in title
    assert "overview of 1000 positions: no cell text, token labels or outlines" in title
    assert len(ax.texts) == 0 and ax.child_axes == [] and not [c for c in ax.collections if c.get_gid() == "outline"]
    np.testing.assert_array_equal(mesh(ax).get_array(), lens.kl_final)  # every cell still coloured
    (lock,) = [p for p in ax.patches if p.get_gid() == "lock-in"]
    np.testing.assert_array_equal(lock.get_data().values, lens.lock_in - 0.5)  # the bottom of each lock-in row
    labels = [t.get_text() for t in ax.get_xticklabels() if -0.5 <= t.get_position()[0] <= 999.5]
    assert 3 <= len(labels) <= 13 and "0" in labels and ax.get_xlabel() == "position"
    custom = one_heatmap(P.plot_lens(lens, "kl", title="mine")).get_title(loc="left")
    assert custom.startswith("mine\noverview of 1000 positions")  # a title of one's own keeps the note
    grid = P.plot_views(lens, ["kl", "ranks"])
    assert "overview of 1000 positions" in grid.get_suptitle() and len(heatmaps(grid)) == 2


def test_a_given_axes_is_one_panel(long_lens):
    lens = long_lens(40)
    host = Figure(figsize=(10, 4))
    ax = host.add_subplot()
    assert P.plot_lens(lens, "kl", ax=ax) is host and heatmaps(host) == [ax]
    assert len(ax.texts) == 0 and "overview of 40 positions" in ax.get_title(loc="left")


def test_an_overview_saves_as_vector_files(long_lens, tmp_path):
    fig = P.plot_lens(long_lens(1000), "kl")
    assert P.save_figure(fig, tmp_path / "o.svg").read_bytes()[:5] == b"<?xml"
    assert P.save_figure(fig, tmp_path / "o.pdf").read_bytes()[:5] == b"%PDF-"


def test_the_command_line_draws_a_long_window_within_the_limit(long_model, tmp_path, capsys):
    """1,000 positions: one line on standard error says the figure is an overview; the PNG is 3,600 pixels
    wide at the default 150 dpi (its header), never wider."""
    from gpt2np import cli

    text = long_model.decode((np.arange(1000) * 7 % 397).tolist())
    n = len(long_model.encode(text))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "kl.png"
    assert cli.main(["lens", "--file", str(tmp_path / "t.txt"), "--model", str(long_model.path), "--view", "kl",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"note: the {n} positions are drawn as an overview, without cell text" in err
    data = out.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 3600 and height < 1500
