"""The ``gpt2np`` command line: the logit lens as figures or tables, generation, scoring, checkpoints.

    gpt2np lens "We train GPT-3, an autoregressive language model" --view kl --out kl.png
    gpt2np plot lens.npz --view ranks --out ranks.svg
    gpt2np lens "The logit lens" --view kl --out lens.html      # interactive, one self-contained file
    gpt2np attribute "The Eiffel Tower is in the city of" --target " Paris" --heads --out attr.png
    gpt2np generate "The logit lens" --max-new-tokens 30 --seed 0
    gpt2np score "The logit lens reads the residual stream." --json
    gpt2np download gpt2 gpt2-xl
    gpt2np info gpt2-xl

Only this module prints. A user error (unknown model, unreadable file, empty or too long text, bad
window, unknown view, unsupported file type, no usable GPU, ...) ends with exit status 2 and one line
``gpt2np: error: ...`` on standard error; ``--debug`` shows the traceback instead. An unexpected
failure (a bug) exits with status 1.
"""
from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import shutil
import sys
import textwrap
import unicodedata
import warnings
from pathlib import Path

PROG = "gpt2np"
VIEW_NAMES = ("logits", "probs", "ranks", "kl", "kl-input", "input-rank", "entropy", "next-rank")
FIGURE_TYPES = (".png", ".svg", ".pdf")
PAGE_TYPES = (".html",)  # lens and plot: one self-contained page with every view (gpt2np/html.py)
LENS_TYPES = (".npz", ".json")


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors become ``UserError`` (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


# -------------------------------------------------------------------------------------------------
# Shared pieces


def _read_text(args, what: str = "text") -> str:
    """TEXT, ``-`` (standard input) or ``--file PATH``; a file's or stdin's final newline is dropped."""
    if args.file is not None and args.text is not None:
        raise UserError(f"give the {what} or --file PATH, not both")
    if args.file is not None or args.text == "-":
        source = args.file if args.file is not None else "-"
        if source == "-":
            text = _read_stdin()
        else:
            try:
                text = Path(source).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"cannot read {source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise UserError(f"cannot read {source}: {e.strerror or e}") from None
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    elif args.text is None:
        raise UserError(f"no {what}: give it as an argument, with --file PATH, or as - to read standard input")
    else:
        text = args.text
    if not text:
        raise UserError(f"the {what} is empty")
    return text


def _read_stdin() -> str:
    """Standard input as UTF-8, strictly (as a ``--file``): undecodable bytes are an error, never replaced."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already text (e.g. io.StringIO)
        return sys.stdin.read()
    data = buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"cannot read standard input: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load(args):
    from .api import load

    return load(args.model, weights_dir=args.weights_dir, offline=args.offline or None, device=args.device)


def _encode(model, text: str, what: str = "text"):
    ids = model.encode(text)
    n = model.config.n_positions
    if len(ids) == 0:
        raise UserError(f"the {what} encodes to no tokens")
    if len(ids) > n:
        raise UserError(f"the {what} is {len(ids)} tokens long, more than the {n}-position context of "
                        f"{model.name}; shorten it (gpt2np never truncates)")
    return ids


def _check_suffix(path: str | None, allowed: tuple, option: str) -> None:
    if path is not None and Path(path).suffix.lower() not in allowed:
        raise UserError(f"{option} {path}: unsupported file type {Path(path).suffix or '(none)'}; "
                        f"use {', '.join(allowed)}")


def _check_writable(path: str | None, option: str) -> None:
    """Refuse an output path that cannot be written, before any work: a missing or read-only folder,
    a folder in place of the file, a read-only file."""
    if path is None:
        return
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        problem = "it is a folder; give a file name"
    elif not folder.exists():
        problem = f"the folder {folder} does not exist; create it first"
    elif not folder.is_dir():
        problem = f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"the folder {folder} is not writable"
    elif p.exists() and not os.access(p, os.W_OK):
        problem = "the file is read-only"
    else:
        return
    raise UserError(f"cannot write {option} {path}: {problem}")


def _check_tuned_path(args) -> None:
    """``--lens FILE``: a lens saved by ``gpt2np tune`` (.safetensors) or a tuned-lens folder, checked to
    exist before the model is loaded."""
    path = getattr(args, "tuned", None)
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"cannot read --lens {path}: no such file or folder")
    if not p.is_dir() and p.suffix.lower() != ".safetensors":
        raise UserError(f"--lens {path}: give a tuned lens saved by `gpt2np tune` (.safetensors) or a folder "
                        "published by tuned-lens (config.json and params.pt)")
    if args.decoder_blocks:
        raise UserError("--lens maps each row to the final stream itself; --decoder-blocks runs the last blocks "
                        "instead: give one of them")


def _translator(model, args):
    """The tuned lens of ``--lens`` for ``model`` (None without it)."""
    from .tuned import TunedLens, read_published

    path = getattr(args, "tuned", None)
    if path is None:
        return None
    return read_published(path, model) if Path(path).is_dir() else TunedLens.load(path, model)


def _check_decoder_blocks(model, args) -> None:
    """``--decoder-blocks`` against the model's depth (with ``--no-input``, one row must be left)."""
    L = model.config.n_layer
    if args.decoder_blocks > L or (args.decoder_blocks == L and args.no_input):
        raise UserError(f"--decoder-blocks {args.decoder_blocks} leaves no row to show: {model.name} has {L} blocks"
                        + (" and --no-input drops the input row" if args.no_input else ""))


def _width(s: str) -> int:
    """Terminal columns of ``s`` (East Asian wide characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1 for c in s)


def _pad(s: str, n: int, right: bool = False) -> str:
    fill = " " * max(0, n - _width(s))
    return fill + s if right else s + fill


def _finite(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def _at_least(low: int):
    """An argparse type: a whole number >= ``low``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} must be at least {low}")
        return v
    return parse


_positive, _nonnegative = _at_least(1), _at_least(0)


def _token_arg(text: str):
    """A token given on the command line: a whole number is an id, anything else is text."""
    return int(text) if text.lstrip("-").isdigit() else text


# -------------------------------------------------------------------------------------------------
# Tables (lens without --out, plot without --out)


CELL = 12  # widest table cell, ellipsis included


def _format_value(view: str, x: float) -> str:
    if not math.isfinite(x) or (view.endswith("rank") and x < 1):
        return "-"
    if view.endswith("rank") or view == "ranks":
        return f"{int(x)}"
    return f"{x:.2f}" if view == "probs" else f"{x:.1f}" if view in ("logits", "kl", "kl-input") else f"{x:.2f}"


def lens_table(lens, view: str | None = None, columns: int | None = None) -> str:
    """The figure as text: rows top to bottom as drawn (last block first, ``input`` last), one column
    per position; cells hold the top-1 token, or the ``view``'s value. Wide windows wrap into blocks
    that fit ``columns`` characters (default: the terminal width)."""
    from .plot import VIEWS, describe, next_labels, visible

    R, W = len(lens.rows), lens.end - lens.start
    if view is None:
        cells = [[visible(lens.top_tokens[r, w, 0], CELL) for w in range(W)] for r in range(R)]
        heading = "top-1 token of each row"
    else:
        values = VIEWS[view].values(lens)
        cells = [[_format_value(view, float(values[r, w])) for w in range(W)] for r in range(R)]
        heading = VIEWS[view].title
    top = next_labels(lens, CELL)
    bottom = [visible(t, CELL) for t in lens.tokens[lens.start:lens.end]]
    pos = [str(p) for p in lens.positions]
    labels = ["next", *reversed(lens.rows), "token", "pos"]
    lw = max(_width(s) for s in labels)
    widths = [max(_width(s) for s in (top[w], bottom[w], pos[w], *(cells[r][w] for r in range(R)))) for w in range(W)]
    columns = columns or shutil.get_terminal_size((100, 24)).columns
    lines = textwrap.wrap(f"{heading} · {describe(lens)}", columns, break_on_hyphens=False)  # a long path too
    w0 = 0
    while w0 < W:  # as many positions per block as fit the width (at least one)
        w1, used = w0, lw
        while w1 < W and (w1 == w0 or used + 2 + widths[w1] <= columns):
            used += 2 + widths[w1]
            w1 += 1
        block = range(w0, w1)

        def line(label, texts, right=False):
            return (_pad(label, lw, True) + "".join("  " + _pad(texts[i], widths[w], right)
                                                   for i, w in enumerate(block))).rstrip()

        lines.append("")
        lines.append(line("next", [top[w] for w in block]))
        lines.extend(line(lens.rows[r], [cells[r][w] for w in block], view is not None)
                     for r in reversed(range(R)))
        lines.append(line("token", [bottom[w] for w in block]))
        lines.append(line("pos", [pos[w] for w in block], True))
        w0 = w1
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# Figures


def _figure_jobs(out: str, views: list[str]) -> list[tuple[str, list[str]]]:
    """``(path, views)`` of each figure: one (one view, or a grid of several) or, with ``{view}`` in
    ``out``, one file per view."""
    if "{view}" in out:
        return [(out.replace("{view}", v), [v]) for v in views]
    return [(out, views)]


def _check_figure_options(args) -> None:
    """Before any work: the figure files can be written, the dpi can draw at least the smallest figure,
    and the colour limits fit each view's fixed defaults (limits from the data are checked when drawing)."""
    if not args.out:
        return
    from . import plot as P

    views = args.view or ["logits"]
    html = Path(args.out).suffix.lower() in PAGE_TYPES  # a page: no pixels, no dpi
    for path, _ in _figure_jobs(args.out, views):
        _check_writable(path, "--out")
    smallest = P.size_of(1, 1)
    if not html and args.dpi > P.max_dpi(smallest):
        raise UserError(f"--dpi {args.dpi} is too high: even the smallest figure ({smallest[0]:.1f} x "
                        f"{smallest[1]:.1f} inches) would exceed the limit of {P.MAX_MEGAPIXELS} megapixels; "
                        f"use --dpi {P.max_dpi(smallest)} or less")
    if args.vmin is not None and args.vmax is not None and args.vmin >= args.vmax:
        raise UserError(f"--vmin {args.vmin:g} must be below --vmax {args.vmax:g}")
    for v in views:
        view = P.VIEWS[v]
        lo = args.vmin if args.vmin is not None else view.vmin
        hi = args.vmax if args.vmax is not None else view.vmax
        if view.log and args.vmin is not None and args.vmin <= 0:
            raise UserError(f"--vmin {args.vmin:g} must be above 0 for --view {v} (a log scale)")
        if lo is not None and hi is not None and hi <= lo:
            which, value = ("--vmin", args.vmin) if args.vmin is not None else ("--vmax", args.vmax)
            raise UserError(f"{which} {value:g} leaves no range for --view {v}: its limits would be {lo:g}..{hi:g}; "
                            "give --vmin and --vmax with vmin < vmax")


def _save_figures(lens, views: list[str], out: str, *, vmin, vmax, dpi: int, title) -> list[str]:
    """Each figure of ``_figure_jobs``, its pixel size checked before it is drawn (``plot.check_pixels``).
    Figures are at most ``plot.MAX_WIDTH`` wide; a window too long for cell text is drawn as an overview
    (``plot.layout``), and one line on standard error says so. A ``.html`` file is the page of
    ``html.to_html`` instead, opening on the first of its views (every view is in the page)."""
    from . import plot as P

    jobs = []
    for path, vs in _figure_jobs(out, views):  # every size checked before the first figure is drawn
        if Path(path).suffix.lower() in PAGE_TYPES:
            jobs.append((path, vs, None))
            continue
        size = P.figsize(lens, len(vs))
        try:
            P.check_pixels(size, dpi)
        except ValueError:
            raise UserError(f"--dpi {dpi} is too high for {path}: a figure of {size[0]:.1f} x {size[1]:.1f} inches "
                            f"would exceed the limit of {P.MAX_MEGAPIXELS} megapixels; use --dpi "
                            f"{P.max_dpi(size)} or less") from None
        jobs.append((path, vs, dpi))
    W = lens.end - lens.start
    if not P.layout(W, len(lens.rows)).text and any(at is not None for _, _, at in jobs):
        print(f"{PROG}: note: the {W} positions are drawn as an overview, without cell text, token labels or "
              f"outlines (drawn for at most {P.TEXT_POSITIONS} positions and {P.TEXT_CELLS:,} cells); choose a "
              "shorter window with --start and --end, or write an .html page, to read them", file=sys.stderr)
    written = []
    for path, vs, at in jobs:
        if at is None:  # a page: its size is the browser's business
            from .files import write_text
            from .html import to_html
            page = to_html(lens, view=vs[0], title=title, vmin={v: vmin for v in vs}, vmax={v: vmax for v in vs})
            try:
                write_text(path, page)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
            written.append(path)
            continue
        if len(vs) == 1:
            fig = P.plot_lens(lens, vs[0], vmin=vmin, vmax=vmax, title=title)
        else:
            fig = P.plot_views(lens, vs, vmin=vmin, vmax=vmax, title=title)
        try:
            with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box
                warnings.filterwarnings("ignore", message="Glyph .* missing from")
                P.save_figure(fig, path, dpi=dpi)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        written.append(path)
    return written


def _figure_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--view", action="append", choices=VIEW_NAMES, metavar="VIEW",
                   help=f"what the colours show: {', '.join(VIEW_NAMES)} (default logits); repeat for several: "
                        "one grid figure, or one file each when --out contains {view}")
    p.add_argument("--out", metavar="FILE", help="write the figure to FILE (.png, .svg or .pdf), or an interactive "
                   "page with every view (.html, self-contained: it fetches nothing); '{view}' in the name writes "
                   "one file per view. Without --out a table is printed")
    p.add_argument("--vmin", type=_finite, help="lower colour limit (default: the view's)")
    p.add_argument("--vmax", type=_finite, help="upper colour limit (default: the view's cap, e.g. KL 30, rank 100)")
    p.add_argument("--title", help="figure title (default: the view, model and decoder settings)")
    p.add_argument("--dpi", type=_positive, default=150, help="resolution of PNG figures (default 150; figures are "
                   "at most 24 inches wide, 3,600 pixels at 150 dpi, and 150 megapixels)")


def _show(lens, args) -> int:
    """Write figures (--out) or print the table(s)."""
    views = args.view or ["logits"]
    if args.out:
        for path in _save_figures(lens, views, args.out, vmin=args.vmin, vmax=args.vmax, dpi=args.dpi,
                                  title=args.title):
            print(f"wrote {path}")
        return 0
    print(lens_table(lens))
    for v in args.view or []:  # the numbers behind each asked-for view
        print()
        print(lens_table(lens, v))
    return 0


# -------------------------------------------------------------------------------------------------
# Commands


def cmd_lens(args) -> int:
    from .api import logit_lens

    _check_suffix(args.out, FIGURE_TYPES + PAGE_TYPES, "--out")
    _check_suffix(args.save, LENS_TYPES, "--save")
    _check_writable(args.save, "--save")
    _check_figure_options(args)
    _check_tuned_path(args)
    text = _read_text(args)
    model = _load(args)
    translator = _translator(model, args)
    ids = _encode(model, text)
    T = len(ids)
    start = 0 if args.start is None else args.start + T if args.start < 0 else args.start
    end = T if args.end is None else args.end + T if args.end < 0 else args.end
    if not 0 <= start < end <= T:
        asked = " ".join(f"--{k} {v}" for k, v in (("start", args.start), ("end", args.end)) if v is not None)
        raise UserError(f"bad window {asked}: the text has {T} tokens, so "
                        f"0 <= start < end <= {T} is needed (negative values count from the end)")
    _check_decoder_blocks(model, args)
    if args.top_k > model.config.vocab_size:
        raise UserError(f"--top-k {args.top_k} exceeds the vocabulary size {model.config.vocab_size}")
    trace = model.forward(ids, sublayers=args.sublayers)
    lens = logit_lens(model, trace, k=args.top_k, step=args.step, include_input=not args.no_input,
                      sublayers=args.sublayers, start=start, end=end, norm=args.norm,
                      decoder_blocks=args.decoder_blocks, translator=translator,
                      progress=sys.stderr.isatty() and not args.quiet)
    if args.save:
        try:
            lens.save(args.save)
        except OSError as e:
            raise UserError(f"cannot write {args.save}: {e.strerror or e}") from None
        print(f"wrote {args.save}")
    return _show(lens, args)


def attribution_table(a, top: int | None = None, lens: bool = False) -> str:
    """The shares, largest magnitude first (the first ``top``), and optionally the lens frame."""
    import numpy as np

    from .plot_attribute import describe

    rows = a.table()
    shown = rows if top is None else rows[:top]
    w = max(len("component"), *(len(k) for k, _ in shown))
    lines = [describe(a), f"(ln_f's scale held at the row's own, {a.scale:.4g}; ln_f.bias is a component)", "",
             f"rank  {'component':<{w}}  share"]
    lines += [f"{i:>4}  {k:<{w}}  {v:+.4f}" for i, (k, v) in enumerate(shown, 1)]
    if len(rows) > len(shown):
        lines.append(f"      ... {len(rows) - len(shown)} more (--top {len(rows)} shows all)")
    if lens:
        w = max(len("row"), *(len(r) for r in a.rows))
        lines += ["", f"{'row':<{w}}  lens logit  change"]
        change = np.concatenate(([np.nan], a.lens_change))
        lines += [f"{r:<{w}}  {z:+10.4f}  " + ("" if np.isnan(c) else f"{c:+.4f}")
                  for r, z, c in zip(a.rows, a.lens_logit, change)]
    return "\n".join(lines)


def cmd_attribute(args) -> int:
    from .attribute import attribute, check_position, component_labels, find_row, token_id
    from .plot import check_pixels, save_figure
    from .plot_attribute import figure_size, plot_attribution

    _check_suffix(args.out, FIGURE_TYPES, "--out")
    _check_suffix(args.save, (".json",), "--save")
    _check_writable(args.out, "--out")
    _check_writable(args.save, "--save")
    text = _read_text(args)
    model = _load(args)
    ids = _encode(model, text)
    c = model.config
    target = token_id(model, args.target, "--target")
    versus = None if args.versus is None else token_id(model, args.versus, "--versus")
    position = check_position(args.position, len(ids), "--position")
    row = find_row(c.n_layer, args.row)
    if args.out:  # the figure's size is known from the model: refuse a dpi too high before any work
        labels = component_labels(c.n_layer, c.n_head, row, args.heads)
        blocks = len({s.split(".")[0] for s in labels if ".h" in s})
        n_bars = sum(".h" not in s for s in labels) + 1  # and ln_f.bias
        check_pixels(figure_size(n_bars, (blocks, c.n_head) if blocks else None), args.dpi)
    trace = model.forward(ids, sublayers=True, heads=args.heads)
    a = attribute(model, trace, target, versus=versus, position=position, heads=args.heads, row=args.row)
    if args.save:
        a.save(args.save)
        print(f"wrote {args.save}")
    if args.out:
        save_figure(plot_attribution(a), args.out, dpi=args.dpi)
        print(f"wrote {args.out}")
    if not args.out:
        print(attribution_table(a, args.top, args.lens))
    return 0


def _check_corpus(args) -> None:
    """The corpus files of ``gpt2np stats`` and ``gpt2np tune``, checked before any work."""
    for f in args.files:
        if f != "-" and not Path(f).exists():
            raise UserError(f"cannot read {f}: no such file or folder")
    if args.files.count("-") > 1:
        raise UserError("standard input (-) can be read once")


def _corpus(args):
    """A function giving the texts of ``args.files`` one at a time (files can be read again; stdin once)."""
    from .corpus import read_texts

    def texts():
        for f in args.files:
            if f == "-":
                try:
                    yield sys.stdin.buffer.read().decode("utf-8") if hasattr(sys.stdin, "buffer") else sys.stdin.read()
                except UnicodeDecodeError as e:
                    raise UserError(f"cannot read standard input: not UTF-8 text ({e.reason} at byte {e.start})") \
                        from None
            else:
                try:
                    yield from read_texts([f])
                except UnicodeDecodeError as e:
                    raise UserError(f"cannot read {f}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    return texts


def _tuned_out(out: str) -> str:
    """Where ``gpt2np stats --lens`` writes the tuned lens's statistics: beside ``--out``."""
    p = Path(out)
    return str(p.with_name(p.stem + ".tuned" + p.suffix))


def cmd_stats(args) -> int:
    from .corpus import compare_stats, corpus_stats

    _check_suffix(args.out, (".json",), "--out")
    _check_writable(args.out, "--out")
    _check_tuned_path(args)
    if args.tuned:
        _check_writable(_tuned_out(args.out), "(the tuned lens's statistics)")
    _check_suffix(args.plot, FIGURE_TYPES, "--plot")
    _check_writable(args.plot, "--plot")
    for f in args.with_stats or []:
        if not Path(f).is_file():
            raise UserError(f"cannot read --with {f}: no such file")
    _check_corpus(args)
    dask = args.dask
    if dask is not None and not (dask.startswith("tcp://") or (dask.startswith("local:") and dask[6:].isdigit()
                                                               and int(dask[6:]) >= 1)):
        raise UserError(f"--dask {dask}: use local:N (N worker processes here) or tcp://HOST:PORT (a scheduler)")
    if dask is not None:
        try:
            import distributed
        except ImportError:
            raise UserError("--dask needs Dask: pip install 'gpt2np[dask]'") from None
    model = _load(args)
    translator = _translator(model, args)
    texts = _corpus(args)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    # files can be read twice: count their tokens first (tokenising is fast) for the time left
    total = sum(len(model.encode(t)) for t in texts()) if progress and "-" not in args.files else None
    options = dict(window=args.window, stride=args.stride, step=args.step, sublayers=args.sublayers, norm=args.norm,
                   decoder_blocks=args.decoder_blocks, include_input=not args.no_input, progress=progress,
                   total_tokens=total)

    def run(client=None):  # {name: CorpusStats}: the lens, or the logit and tuned lenses side by side
        if translator is None:
            return {Path(args.out).stem: corpus_stats(model, texts(), client=client, **options)}
        return compare_stats(model, texts(), translator, client=client, **options)

    if dask is None:
        results = run()
    elif dask.startswith("local:"):
        n = int(dask[6:])
        from .backend import usable_cores
        with distributed.LocalCluster(n_workers=n, threads_per_worker=max(1, usable_cores() // n), processes=True,
                                      dashboard_address=None, silence_logs=40) as cluster, \
                distributed.Client(cluster) as client:
            results = run(client)
    else:
        with distributed.Client(dask) as client:
            results = run(client)
    stats = next(iter(results.values()))
    paths = [args.out] if translator is None else [args.out, _tuned_out(args.out)]
    for path, s in zip(paths, results.values()):
        s.save(path)
    print(f"{stats.documents} documents, {stats.positions} tokens scored; wrote {', '.join(paths)}")
    if args.plot:
        from .corpus import CorpusStats
        from .plot import save_figure
        from .plot_corpus import plot_stats
        drawn = dict(results)
        for f in args.with_stats or []:
            drawn[Path(f).stem] = CorpusStats.load(f)
        save_figure(plot_stats(drawn), args.plot)
        print(f"wrote {args.plot}")
    print(stats_table(results))
    return 0


def stats_table(results: dict) -> str:
    """The per-row means of ``{name: CorpusStats}``: one table, or two lenses side by side."""
    if len(results) == 1:
        (stats,) = results.values()
        lines = [f"{'row':<8}{'KL(final)':>10}{'KL(input)':>10}{'entropy':>9}{'xent':>8}{'bits/B':>8}"
                 f"{'top1=final':>11}{'top1=next':>10}"]
        means = {k: stats.mean(k) for k in ("kl_final", "kl_input", "entropy", "next_xent", "agree_final",
                                             "next_correct")}
        for r, row in enumerate(stats.rows):
            lines.append(f"{row:<8}{means['kl_final'][r]:>10.3f}{means['kl_input'][r]:>10.3f}"
                         f"{means['entropy'][r]:>9.3f}{means['next_xent'][r]:>8.3f}{stats.bits_per_byte[r]:>8.3f}"
                         f"{means['agree_final'][r]:>11.3f}{means['next_correct'][r]:>10.3f}")
        return "\n".join(lines)
    (a_name, a), (b_name, b) = results.items()
    columns = (("KL(final)", lambda s: s.mean("kl_final")), ("bits/B", lambda s: s.bits_per_byte),
               ("top1=final", lambda s: s.mean("agree_final")), ("top1=next", lambda s: s.mean("next_correct")))
    head = f"{'':<8}" + "".join(f"{name:>22}" for name, _ in columns)
    sub = f"{'row':<8}" + f"{'logit':>11}{'tuned':>11}" * len(columns)
    lines = [f"{a_name} and {b_name} on the same windows", head, sub]
    values = [(f(a), f(b)) for _, f in columns]
    for r, row in enumerate(a.rows):
        lines.append(f"{row:<8}" + "".join(f"{x[r]:>11.3f}{y[r]:>11.3f}" for x, y in values))
    return "\n".join(lines)


def cmd_tune(args) -> int:
    from .tuned import TunedLens, fit
    from .tuned_fit import pack

    _check_suffix(args.out, (".safetensors",), "--out")
    _check_writable(args.out, "--out")
    _check_corpus(args)
    if args.method == "ridge":
        given = [f"--{k.replace('_', '-')}" for k in ("steps", "tokens_per_step", "init", "checkpoint", "resume")
                 if getattr(args, k) not in (None, False)]
        if given:
            raise UserError(f"{', '.join(given)} belong to --method kl; the ridge fit is one pass, solved once")
    if args.checkpoint is not None:
        _check_suffix(args.checkpoint, (".safetensors",), "--checkpoint")
        _check_writable(args.checkpoint, "--checkpoint")
    if args.resume and (args.checkpoint is None or not Path(args.checkpoint).is_file()):
        raise UserError("--resume continues from --checkpoint FILE: give the checkpoint of the stopped run")
    init = args.init or "ridge"
    if init not in ("ridge", "identity") and not Path(init).is_file():
        raise UserError(f"--init {init}: use ridge, identity, or a tuned lens file (.safetensors)")
    model = _load(args)
    if init not in ("ridge", "identity"):
        init = TunedLens.load(init, model)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    ids = pack(model, _corpus(args)())  # [N] the corpus, packed with <|endoftext|> between texts
    options = dict(window=args.window, sublayers=args.sublayers, ridge=args.ridge, progress=progress, ids=ids)
    if args.method == "kl":
        every = args.checkpoint_every if args.checkpoint_every is not None else (25 if args.checkpoint else 0)
        options.update(init=init, steps=args.steps or 250, tokens_per_step=args.tokens_per_step or 2 ** 18,
                       checkpoint=args.checkpoint, checkpoint_every=every, resume=args.resume)
    lens = fit(model, None, method=args.method, **options)
    lens.save(args.out)
    print(f"{lens.description}: {len(lens.rows)} rows ({', '.join(lens.rows)}); wrote {args.out}")
    return 0


def cmd_plot(args) -> int:
    from .result import Lens

    _check_suffix(args.out, FIGURE_TYPES + PAGE_TYPES, "--out")
    _check_suffix(args.lens_file, LENS_TYPES, "LENS_FILE")
    _check_figure_options(args)
    path = Path(args.lens_file)
    if not path.is_file():
        raise UserError(f"cannot read {path}: no such file")
    try:
        lens = Lens.load(path)
    except ValueError as e:  # a damaged or hand-edited file: the message names the field
        raise UserError(f"{_one_line(e)}; make one with `gpt2np lens ... --save FILE`") from None
    except Exception as e:  # zip, JSON and field errors of a damaged or foreign file
        raise UserError(f"cannot read {path} as a saved lens ({type(e).__name__}: {e}); "
                        "make one with `gpt2np lens ... --save FILE`") from None
    return _show(lens, args)


def _token_stream(model, ids, args):
    """The new tokens, one int at a time, as the model chooses them. With ``--lens-out`` they come
    from ``lens.record``, which also keeps every residual row; its trace is the generator's value."""
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    stop_at_eot=args.stop_at_eot)
    if args.lens_out:
        from .record import record
        return record(model, ids, args.max_new_tokens, **sampling)
    return model.stream(ids, args.max_new_tokens, **sampling)


def _write_stream(model, tokens, out) -> list[int]:
    """Print each token as soon as it comes (flushed), holding back only the bytes of a UTF-8
    character split across tokens; return the tokens."""
    from .tokenizer import token_bytes

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    done = []
    for t in tokens:
        done.append(int(t))
        out.write(decoder.decode(token_bytes(model.tokenizer, int(t), model.config.vocab_size)))
        out.flush()
    out.write(decoder.decode(b"", final=True))
    return done


def cmd_generate(args) -> int:
    _check_suffix(args.lens_out, LENS_TYPES, "--lens-out")
    _check_writable(args.lens_out, "--lens-out")
    if args.tuned and not args.lens_out:
        raise UserError("--lens applies to the lens of the generation: give --lens-out FILE too")
    _check_tuned_path(args)
    prompt = _read_text(args, "prompt")
    model = _load(args)
    translator = _translator(model, args)
    ids = _encode(model, prompt, "prompt")
    if args.lens_out:  # the lens's options, before generation (the lens is read once it is done)
        _check_decoder_blocks(model, args)
        if args.max_new_tokens == 0:
            raise UserError("--lens-out needs at least one new token: --max-new-tokens 0 generates none")
    tokens = _token_stream(model, ids, args)  # checks the arguments before printing anything
    out = sys.stdout
    if not args.no_prompt:
        out.write(prompt)
        out.flush()
    recorded = {}

    def keep_trace():  # the tokens, passed on one by one; the recording's trace is kept at the end
        recorded["trace"] = yield from tokens

    new = _write_stream(model, keep_trace() if args.lens_out else tokens, out)
    out.write("\n")
    out.flush()
    if args.lens_out:
        from .record import lens_of_generation

        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
        lens = lens_of_generation(model, recorded["trace"], len(ids), len(new), sampling, step=args.step,
                                  sublayers=args.sublayers, include_input=not args.no_input, norm=args.norm,
                                  decoder_blocks=args.decoder_blocks, translator=translator,
                                  progress=sys.stderr.isatty() and not args.quiet)
        lens.save(args.lens_out)
        print(f"lens of the {len(new)} generated tokens saved to {args.lens_out}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from .generate import perplexity
    from .plot import visible

    text = _read_text(args)
    model = _load(args)
    ids = _encode(model, text)
    if len(ids) < 2:
        raise UserError("scoring needs at least two tokens: the first one has no prediction to score")
    logp = model.score(ids)  # [T-1]
    xent, ppl = perplexity(logp)
    tokens = model.tokens(ids)
    if args.json:
        rows = [{"position": i, "id": int(t), "token": s, "logprob": None if i == 0 else float(logp[i - 1])}
                for i, (t, s) in enumerate(zip(ids, tokens))]
        print(json.dumps({"model": model.name, "n_tokens": len(ids), "n_scored": len(logp), "tokens": rows,
                          "mean_cross_entropy": xent, "perplexity": ppl}, ensure_ascii=False))
        return 0
    shown = [visible(s, 24) for s in tokens]
    tw = max(5, *(_width(s) for s in shown))
    print(f"{'pos':>5}  {_pad('token', tw)}  {'logprob':>9}  {'prob':>8}")
    for i, s in enumerate(shown):
        lp = "-" if i == 0 else f"{logp[i - 1]:.3f}"
        p = "-" if i == 0 else f"{math.exp(logp[i - 1]):.4g}"
        print(f"{i:>5}  {_pad(s, tw)}  {lp:>9}  {p:>8}")
    print(f"mean cross-entropy {xent:.4f} nats/token over {len(logp)} predicted tokens, perplexity {ppl:.2f}")
    return 0


def cmd_download(args) -> int:
    from .config import SIZES
    from .weights import canonical_name, download, missing_files, weights_dir

    names = list(SIZES) if args.names == ["all"] else args.names
    unknown = [n for n in names if canonical_name(n) is None]
    if unknown:
        raise UserError(f"unknown model name {', '.join(map(repr, unknown))}: choose from {', '.join(SIZES)} or 'all'")
    for name in dict.fromkeys(canonical_name(n) for n in names):
        folder = weights_dir(args.weights_dir) / name
        if not args.force and not missing_files(folder):
            print(f"{name}: already complete in {folder}")
            continue
        print(f"{name}: downloading into {folder}", flush=True)
        download(name, root=args.weights_dir, revision=args.revision)
        print(f"{name}: done ({folder})")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.1f} {unit})"
    return f"{n:,} B"


def cmd_info(args) -> int:
    from .api import check_folder
    from .config import SIZES, Config, arithmetic_options
    from .weights import (HUB_PREFIX, canonical_name, checkpoint_files, missing_files, resolve, stored_tensors,
                          weights_dir, weights_path)

    name = canonical_name(args.model)
    if name is not None and not Path(args.model).is_dir():
        folder = weights_dir(args.weights_dir) / name
        missing = missing_files(folder)
        source = f"{name} (Hugging Face {HUB_PREFIX}{name})"
    else:
        folder = resolve(args.model, download_missing=False)
        missing, source = [], args.model
    config = SIZES[name] if missing else None
    where = f" --weights-dir {args.weights_dir}" if args.weights_dir else ""
    problem, options = None, None
    if not missing:  # "complete" only for a folder that loads: every check load makes, no tensor data read
        try:
            config = check_folder(folder)
        except (ValueError, OSError) as e:
            problem = _one_line(e)
        try:
            options = arithmetic_options(folder / "config.json")
            config = config or Config.from_json(folder / "config.json")
        except (ValueError, OSError):
            pass  # a config.json that cannot be read: the status says why
    status = ("complete" if problem is None else f"does not load: {problem}") if not missing else (
        f"not downloaded (missing {', '.join(missing)}); run `gpt2np download {name}{where}`")
    print(f"model       {source}")
    print(f"folder      {folder.resolve() if folder.exists() else folder}  [{status}]")
    if config is not None:
        print(f"config      n_layer={config.n_layer}  n_head={config.n_head}  n_embd={config.n_embd}  "
              f"d_mlp={config.d_mlp}  n_positions={config.n_positions}  vocab_size={config.vocab_size}")
    if options is not None:  # every option of config.json that changes the arithmetic, implemented or not
        shown = "  ".join(f"{k}={json.dumps(v)}" for k, v in options.items())
        print(f"options     {shown or 'none: the arithmetic of GPT-2 itself'}")
    if config is not None:
        print(f"parameters  {config.n_params:,} (tied unembedding counted once)")
    if not missing and problem is None:
        head = stored_tensors(weights_path(folder), config).get("lm_head.weight")
        if head is not None:
            print(f"            + lm_head.weight {list(head.shape)} stored in the file (untied head, or a copy of wte)")
    present = checkpoint_files(folder)
    if present:
        fw = max(len(f) for f in present)
        for i, f in enumerate(present):
            print(f"{'files' if i == 0 else '':<12}{f:<{fw}}  {_size((folder / f).stat().st_size)}")
    return 1 if problem else 0


# -------------------------------------------------------------------------------------------------
# The parser


EXAMPLES = {
    "lens": """examples:
  gpt2np lens "We train GPT-3, an autoregressive language model" --view kl --out kl.png
  gpt2np lens --file examples/gpt3_abstract.txt --model gpt2-xl --norm norm --step 2 \\
      --start 156 --end 166 --view logits --view ranks --out 'abstract-{view}.png'
  echo "Hello world" | gpt2np lens - --top-k 3 --save hello.npz

Without --out, a table of each row's top-1 token is printed (and the numbers of each --view).
--start/--end choose the positions drawn, [start, end); negative values count from the end;
the model still reads the whole text. Text longer than the context is an error, never truncated.""",
    "plot": """examples:
  gpt2np lens "The logit lens" --save lens.npz
  gpt2np plot lens.npz --view ranks --view kl --out grid.pdf
  gpt2np plot lens.npz --view kl --out lens.html   # every view in one page; hover a cell for its numbers
  gpt2np plot lens.json                      # the table of top-1 tokens""",
    "generate": """examples:
  gpt2np generate "The logit lens is" --max-new-tokens 40 --seed 0
  gpt2np generate "Once upon a time" --temperature 0.8 --top-p 0.9 --stop-at-eot
  gpt2np generate "2 + 2 =" --temperature 0 --no-prompt      # greedy""",
    "score": """examples:
  gpt2np score "The logit lens reads the residual stream."
  gpt2np score --file essay.txt --model gpt2-medium --json > scores.json""",
    "download": """examples:
  gpt2np download gpt2
  gpt2np download gpt2 gpt2-xl --weights-dir /data/gpt2
  gpt2np download all""",
    "attribute": """examples:
  gpt2np attribute "The Eiffel Tower is in the city of" --target " Paris"
  gpt2np attribute "When John and Mary went to the shops, John gave the bag to" \\
      --target " Mary" --versus " John" --heads --out ioi.png
  gpt2np attribute "The logit lens" --target " is" --position 1 --lens --save attr.json

Each component's direct share of the target's logit at --position (default the last), or of the
logit difference target - versus: the embeddings, each block's attention (or each head, --heads) and
MLP, and ln_f's bias. ln_f's scale is held at the value the model applied; the shares then sum to the
model's own logit exactly. --lens adds the target's logit under the logit lens at every row.""",
    "stats": """examples:
  gpt2np stats corpus/ --model gpt2 --out stats.json
  gpt2np stats data.jsonl --model gpt2-xl --step 2 --window 1024 --stride 512 --out xl.json
  gpt2np stats held-out/ --model gpt2 --lens gpt2-tuned.safetensors --out s.json --plot s.png
      (the tuned lens beside the logit lens, on the same windows: s.json and s.tuned.json)

Per row of the lens: mean KL(final || row), KL(input || row), entropy, next-token cross-entropy (nats
and bits per byte), the share of positions whose top-1 is the final one, and the next-token accuracy;
the JSON also holds rank histograms and the lock-in rows. Statistics files merge exactly.""",
    "tune": """examples:
  gpt2np tune corpus/ --model gpt2 --out gpt2-tuned.safetensors
  gpt2np tune data.jsonl --model gpt2 --method kl --steps 50 --tokens-per-step 8192 \\
      --checkpoint run.safetensors --out gpt2-kl.safetensors
  gpt2np lens "The capital of France is" --model gpt2 --lens gpt2-tuned.safetensors
  gpt2np stats held-out/ --model gpt2 --lens gpt2-tuned.safetensors --out s.json --plot s.png

The tuned lens (Belrose et al. 2023): one affine map per row, h -> h + A h + b, before ln_f and the
unembedding, fitted so that each row predicts the final distribution. ridge solves least squares
from each row to the final stream in one pass (Din et al. 2023); kl minimises KL(final || row) with
SGD (Nesterov momentum 0.9, weight decay 0.001, gradient clipping at 1, linear decay), by default
from the ridge fit. A kl run needs steps x tokens-per-step tokens and refuses a smaller corpus.""",
    "info": """examples:
  gpt2np info gpt2-xl
  gpt2np info ./my-checkpoint""",
}


def _lens_options(p, when: str = "") -> None:
    """The lens's row and decoder options (``gpt2np lens``; ``gpt2np generate --lens-out``)."""
    p.add_argument("--step", type=_positive, default=1,
                   help=f"{when}keep every STEP-th block row, counting back from the last (the post: 2)")
    p.add_argument("--sublayers", action="store_true", help=f"{when}add the row after each block's attention (l.attn)")
    p.add_argument("--no-input", action="store_true", help=f"{when}leave out the input (embedding) row")
    p.add_argument("--norm", choices=("ln_f", "norm", "raw"), default="ln_f",
                   help=f"{when}decoder normalisation: ln_f (the model's own, default), norm (without ln_f's gain "
                        "and bias: the post's figures), raw (none)")
    p.add_argument("--decoder-blocks", type=_nonnegative, default=0, metavar="K",
                   help=f"{when}run the last K blocks inside the decoder (their rows are not shown)")
    p.add_argument("--lens", dest="tuned", metavar="FILE", help=f"{when}the tuned lens: translate each row "
                   "before the decoder with a lens from `gpt2np tune` (.safetensors) or a tuned-lens folder")


def build_parser() -> Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")

    model = Parser(add_help=False)
    model.add_argument("--model", default="gpt2", metavar="NAME|PATH",
                       help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a checkpoint folder (default gpt2)")
    model.add_argument("--weights-dir", metavar="DIR",
                       help="where named checkpoints live (default $GPT2NP_WEIGHTS or ./weights)")
    model.add_argument("--offline", action="store_true", help="never download a missing checkpoint")
    model.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                       help="cpu (NumPy, default) or gpu (CuPy: pip install 'gpt2np[gpu]')")

    def text_args(p, what="TEXT"):
        p.add_argument("text", nargs="?", metavar=what, help=f"the {what.lower()}; - reads standard input")
        p.add_argument("--file", metavar="PATH", help=f"read the {what.lower()} from a UTF-8 file "
                       "(its final newline is dropped)")

    top = Parser(prog=PROG, formatter_class=fmt, description="GPT-2 in NumPy, built to look inside: the logit "
                 "lens as figures or tables, generation, scoring and checkpoints.",
                 epilog="run `gpt2np COMMAND --help` for each command's options and examples")
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name, fn, help_, parents):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name], formatter_class=fmt,
                           parents=[common, *parents])
        p.set_defaults(run=fn)
        return p

    p = command("lens", cmd_lens, "the logit lens of a text: a figure of the post, a table, or a saved result",
                [model])
    text_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown on standard error when it is a "
                   "terminal)")
    p.add_argument("--start", type=int, help="first position drawn (default 0; negative counts from the end)")
    p.add_argument("--end", type=int, help="one past the last position drawn (default: the end of the text)")
    _lens_options(p)
    p.add_argument("--top-k", type=_positive, default=5, help="top tokens kept per cell in --save (default 5)")
    p.add_argument("--save", metavar="FILE", help="save the lens result (.npz or .json) for `gpt2np plot`")
    _figure_options(p)

    p = command("plot", cmd_plot, "draw a lens saved with `gpt2np lens --save` (or print its table)", [])
    p.add_argument("lens_file", metavar="LENS_FILE", help="a .npz or .json file from `gpt2np lens --save`")
    _figure_options(p)

    p = command("generate", cmd_generate, "continue a prompt, printing tokens as they come", [model])
    text_args(p, "PROMPT")
    p.add_argument("--quiet", action="store_true", help="with --lens-out: no progress bar for the lens (shown on "
                   "standard error when it is a terminal)")
    p.add_argument("--max-new-tokens", type=_nonnegative, default=50, metavar="N", help="default 50")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=_positive, help="sample among the K most probable tokens")
    p.add_argument("--top-p", type=float, help="then among the smallest set with probability >= P, in (0, 1]")
    p.add_argument("--seed", type=_nonnegative, help="random seed (>= 0): the same seed gives the same text")
    p.add_argument("--stop-at-eot", action="store_true", help="stop after <|endoftext|>")
    p.add_argument("--no-prompt", action="store_true", help="print only the new text")
    p.add_argument("--lens-out", metavar="FILE", help="record the logit lens at every position that chose a new "
                   "token (from the cached computation) and save it (.npz or .json); draw it with `gpt2np plot`")
    _lens_options(p, when="with --lens-out: ")

    p = command("score", cmd_score, "log-probability of each token, mean cross-entropy and perplexity", [model])
    text_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("attribute", cmd_attribute, "which component wrote a prediction: each one's direct share of a "
                "logit", [model])
    text_args(p)
    p.add_argument("--target", required=True, help="the token whose logit is attributed: text that is one token "
                   "(e.g. ' Paris', with its space) or a whole number, read as a token id", type=_token_arg)
    p.add_argument("--versus", type=_token_arg, help="attribute the logit difference target - versus")
    p.add_argument("--position", type=int, default=-1, help="the position whose prediction is attributed (default "
                   "-1, the last; negative counts from the end)")
    p.add_argument("--heads", action="store_true", help="each attention head (l.h0 ...) and attention bias apart")
    p.add_argument("--row", help="attribute the lens's logit at this row (input, l, l.attn; default the final)")
    p.add_argument("--top", type=_positive, default=20, help="rows of the table (default 20)")
    p.add_argument("--lens", action="store_true", help="also print the target's lens logit at every row")
    p.add_argument("--out", metavar="FILE", help="draw the shares (.png, .svg or .pdf)")
    p.add_argument("--dpi", type=_positive, default=150, help="resolution of PNG figures (default 150)")
    p.add_argument("--save", metavar="FILE", help="save the attribution as .json")

    p = command("stats", cmd_stats, "the lens's statistics per row over a corpus (files, folders, .jsonl, -)",
                [model])
    p.add_argument("files", nargs="+", metavar="FILE", help="text files, folders of .txt/.jsonl, .jsonl files "
                   "(a \"text\" field per line), or - for standard input")
    p.add_argument("--out", required=True, metavar="FILE", help="write the statistics (.json)")
    p.add_argument("--window", type=_positive, help="positions per forward pass (default: the context)")
    p.add_argument("--stride", type=_positive, help="positions between windows (default: the window); later "
                   "windows score only their new positions")
    p.add_argument("--plot", metavar="FIGURE", help="draw each statistic per row (.png, .svg or .pdf)")
    p.add_argument("--with", dest="with_stats", action="append", metavar="STATS_JSON",
                   help="with --plot: overlay earlier statistics (other models or lenses); repeatable")
    # --lens (in the lens options): the tuned lens beside the logit lens, its statistics in OUT.tuned.json
    p.add_argument("--dask", metavar="local:N|tcp://HOST:PORT", help="documents as Dask tasks: N worker processes "
                   "here, or the cluster of a running scheduler (pip install 'gpt2np[dask]')")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on standard error (default: when it is a terminal)")
    _lens_options(p)

    p = command("tune", cmd_tune, "fit a tuned lens on a corpus (files, folders, .jsonl, -): ridge or the paper's "
                "KL objective", [model])
    p.add_argument("files", nargs="+", metavar="FILE", help="text files, folders of .txt/.jsonl, .jsonl files "
                   "(a \"text\" field per line), or - for standard input")
    p.add_argument("--out", required=True, metavar="FILE", help="write the tuned lens (.safetensors)")
    p.add_argument("--method", choices=("ridge", "kl"), default="ridge",
                   help="ridge: least squares from each row to the final stream, one pass (default); "
                        "kl: the paper's objective and optimiser, from the ridge fit")
    p.add_argument("--window", type=_positive, help="positions per forward pass (default: the context)")
    p.add_argument("--sublayers", action="store_true", help="also fit the rows after each block's attention")
    p.add_argument("--ridge", type=_finite, default=1e-3,
                   help="the ridge term, relative to the streams' mean variance (default 0.001)")
    p.add_argument("--steps", type=_positive, help="kl: optimiser steps (default 250)")
    p.add_argument("--tokens-per-step", type=_positive, metavar="N",
                   help="kl: new tokens per step (default 262144; the corpus must hold steps x N)")
    p.add_argument("--init", metavar="ridge|identity|FILE", help="kl: where to start (default ridge)")
    p.add_argument("--checkpoint", metavar="FILE", help="kl: save the run's state here (.safetensors)")
    p.add_argument("--checkpoint-every", type=_nonnegative, metavar="N",
                   help="kl: save every N steps (default 25 with --checkpoint)")
    p.add_argument("--resume", action="store_true", help="kl: continue the run saved in --checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on standard error (default: when it is a terminal)")

    p = command("download", cmd_download, "download official checkpoints (four files each), with progress bars",
                [])
    p.add_argument("names", nargs="+", metavar="NAME", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or all")
    p.add_argument("--weights-dir", metavar="DIR", help="default $GPT2NP_WEIGHTS or ./weights")
    p.add_argument("--revision", help="a commit of the hub repository (default $GPT2NP_REVISION or main)")
    p.add_argument("--force", action="store_true", help="download even when the files are there")

    p = command("info", cmd_info, "a checkpoint's sizes, files, parameter count and folder", [])
    p.add_argument("model", nargs="?", default="gpt2", metavar="MODEL", help="a model name or folder (default gpt2)")
    p.add_argument("--weights-dir", metavar="DIR", help="default $GPT2NP_WEIGHTS or ./weights")
    return top


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    if args.command is None:
        print(f"{PROG}: error: choose a command: lens, plot, attribute, stats, tune, generate, score, download, "
              f"info (see `{PROG} --help`)", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gpt2np generate ... | head -1`: the reader left, stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except (UserError, ValueError, OSError, RuntimeError) as e:  # library errors carry a message for the user
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(f"{PROG}: error: internal error ({type(e).__name__}: {_one_line(e)}); "
              "run again with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
