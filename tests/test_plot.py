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
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import gpt2np
from gpt2np import plot as P
from gpt2np.lens import Lens

TEXT = "When people say plasma,\nthey\tmean blood. Other times"  # 33 tokens in the tiny vocabulary
VIEWS = ("logits", "probs", "ranks", "kl", "kl-input", "input-rank", "entropy", "next-rank")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def shown(token: str, width: int) -> str:
    """The visible-whitespace mapping, written out independently of gpt2np.plot: space, newline, tab and
    carriage return as symbols, other control characters as \\xNN escapes, an ellipsis past ``width``."""
    s = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    s = "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in s)
    return s if len(s) <= width else s[:width - 1] + "…"


@pytest.fixture(scope="module")
def ids(tiny_model):
    return tiny_model.encode(TEXT)


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
    im = ax.images[0]
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
    im = one_heatmap(fig).images[0]
    assert isinstance(im.norm, LogNorm) is log
    assert (im.norm.vmin, im.norm.vmax) == (lo, hi)
    (cbar_ax,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert cbar_ax.get_ylabel().startswith(P.VIEWS[view].title)


def test_colour_values_are_the_lens_quantities(lens):
    for view, field in (("kl", lens.kl_final), ("ranks", lens.final_rank), ("kl-input", lens.kl_input),
                        ("input-rank", lens.input_rank), ("entropy", lens.entropy)):
        data = one_heatmap(P.plot_lens(lens, view)).images[0].get_array()
        np.testing.assert_array_equal(np.ma.getdata(data), field.astype(np.float64))
    data = one_heatmap(P.plot_lens(lens, "logits")).images[0].get_array()
    np.testing.assert_array_equal(np.ma.getdata(data), lens.top_logits[..., 0].astype(np.float64))


def test_next_rank_is_blank_at_the_last_position(lens):
    data = one_heatmap(P.plot_lens(lens, "next-rank")).images[0].get_array()
    assert np.ma.getmaskarray(data)[:, -1].all() and not np.ma.getmaskarray(data)[:, :-1].any()
    np.testing.assert_array_equal(data[:, :-1], lens.next_rank[:, :-1])


def test_logits_scale_and_overrides(lens):
    im = one_heatmap(P.plot_lens(lens, "logits")).images[0]
    top1 = lens.top_logits[..., 0]
    assert im.norm.vmin == pytest.approx(np.percentile(top1, 5)) and im.norm.vmax == pytest.approx(np.percentile(top1, 95))
    im = one_heatmap(P.plot_lens(lens, "kl", vmin=1, vmax=5, cmap="magma")).images[0]
    assert (im.norm.vmin, im.norm.vmax, im.cmap.name) == (1, 5, "magma")
    assert one_heatmap(P.plot_lens(lens, "kl")).images[0].cmap.name == "cividis_r"  # good = light


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
    assert axes[1].images[0].norm.vmax == 10 and axes[2].images[0].norm.vmax == 1000
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
# Long windows: never wider than MAX_WIDTH, no cell text past TEXT_POSITIONS, a bounded number of artists


@pytest.fixture(scope="module")
def long_model(make_checkpoint):
    return gpt2np.load(make_checkpoint(n_positions=4096))


@pytest.mark.parametrize("T", [10, 100, 1000, 3000])
def test_any_window_gives_a_figure_no_wider_than_the_limit(long_model, T):
    m = long_model
    lens = gpt2np.logit_lens(m, m.forward(np.arange(T) % 397), k=1)
    R = len(lens.rows)
    for fig in (P.plot_lens(lens, "kl"), P.plot_views(lens, ["logits", "ranks"])):
        assert fig.get_size_inches()[0] <= P.MAX_WIDTH == 48
        for ax in [a for a in fig.axes if a.get_label().startswith("lens:")]:
            ticks = ax.get_xticklabels()
            if T <= 67:  # every cell written, every token on the axis
                assert len(ax.texts) == R * T and len(ticks) == T
                assert "no cell text" not in ax.get_xlabel()
            else:  # no cell text, said so; at most TEXT_POSITIONS tokens on each axis
                assert len(ax.texts) == 0 and len(ticks) <= P.TEXT_POSITIONS
                assert f"no cell text: {T} positions" in ax.get_xlabel()
            (outlines,) = [c for c in ax.collections if c.get_gid() == "outline"]  # one artist for all outlines
            assert len(outlines.get_paths()) == lens.matches_final.sum()
    assert P.TEXT_POSITIONS == int((48 - P.MARGIN_W) / P.CELL_W)


def test_the_command_line_draws_a_long_window_within_the_limit(long_model, tmp_path, capsys):
    from gpt2np import cli

    m = long_model
    text = m.decode((np.arange(1200) * 7 % 397).tolist())
    n = len(m.encode(text))
    assert n > P.TEXT_POSITIONS
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "kl.png"
    assert cli.main(["lens", "--file", str(tmp_path / "t.txt"), "--model", str(m.path), "--view", "kl",
                     "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{n} positions: the figure is 48 inches wide, without cell text" in err
    w, h = int.from_bytes(out.read_bytes()[16:20], "big"), int.from_bytes(out.read_bytes()[20:24], "big")
    assert w <= 48 * 150 and h < 48 * 150  # the PNG header's size: the stated limit at the default dpi
