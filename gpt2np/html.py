"""A ``Lens`` as one self-contained HTML page: the post's grid, a switch between every view, and a panel
with each cell's numbers on hover.

    page = to_html(lens, view="kl")       # str: a whole page
    files.write_text("lens.html", page)   # or: gpt2np lens TEXT --out lens.html

The grid is the static figure's (``plot.py``): rows by depth with ``input`` at the bottom, the input
tokens along the bottom, the true next tokens along the top with ``*`` where the final top-1 is right,
cells outlined where their top-1 is the final top-1, whitespace made visible (``plot.visible``). Cells
have a fixed width: a long window scrolls sideways instead of shrinking. Every cell is a ``<td>`` with
``data-row`` (row label) and ``data-pos`` (absolute position) whose text is its top-1 token.

Colours are computed here, with plot.py's own scales (``plot.VIEWS``, ``plot.limits``, the same colour
map, norm and blank colour), so a cell has the colour of the same cell in the static figure. The page
holds the grid (coloured for ``view``), each view's colours and each cell's numbers as JSON, and a small
script and style sheet of its own: no font, image, script or style is fetched from anywhere.
"""
from __future__ import annotations

import html
import json
import math

import numpy as np

from .plot import BLANK, OUTLINE, VIEWS, describe, limits, next_labels, visible

CELL_PX = 64  # fixed cell width in CSS pixels: long windows scroll
# The numbers shown on hover: field, label, unit ("rank" for integer ranks, "p" for probabilities).
QUANTITIES = (("kl_final", "KL(final ‖ row)", "nats"), ("kl_input", "KL(input ‖ row)", "nats"),
              ("final_rank", "rank of the final top-1", "rank"), ("input_rank", "rank of the input token", "rank"),
              ("entropy", "entropy", "nats"), ("next_rank", "rank of the true next token", "rank"),
              ("next_prob", "probability of the true next token", "p"),
              ("next_xent", "next-token cross-entropy", "nats"))


def to_html(lens, *, view: str = "logits", title: str | None = None, vmin=None, vmax=None) -> str:
    """The page of ``lens``: every view of ``plot.VIEWS`` one click away, ``view`` shown first.

    Parameters
    ----------
    lens : gpt2np.Lens
    view : the view shown when the page opens (logits, probs, ranks, kl, kl-input, input-rank, entropy, next-rank)
    title : page heading (default: ``plot.describe(lens)``)
    vmin, vmax : colour limits, one value for every view or a dict keyed by view (default: each view's)

    Returns
    -------
    str : a complete HTML document; it makes no network request of any kind
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: choose one of {', '.join(VIEWS)}")
    scales = {v: _scale(lens, v, _pick(vmin, v), _pick(vmax, v)) for v in VIEWS}
    title = describe(lens) if title is None else str(title)
    data = {"start": lens.start, "view": view, "rows": list(lens.rows), **_numbers(lens),
            "views": {v: {"title": VIEWS[v].title, "bg": s["bg"], "light": s["light"]} for v, s in scales.items()}}
    buttons = "".join(f'<button type="button" data-view="{_e(v)}" title="{_e(VIEWS[v].title)}" aria-pressed='
                      f'"{str(v == view).lower()}">{_e(v)}</button>' for v in VIEWS)
    legends = "".join(_legend(v, s, v == view) for v, s in scales.items())
    settings = _e(json.dumps(lens.settings, ensure_ascii=False, indent=1))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="how">Rows are the residual stream read by the lens, <code>input</code> at the bottom; columns are
positions. Cells show the row's top-1 token (<code>·</code> a space, <code>↵</code> a newline);
<span class="m-key">outlined</span> cells already agree with the final top-1; <code>*</code> marks the positions
whose final top-1 is the true next token. Hover a cell for its numbers.</p>
<div class="bar"><div class="views" role="group" aria-label="view">{buttons}</div>{legends}</div>
<div class="scroll">{_grid(lens, scales[view])}</div>
<details><summary>settings</summary><pre>{settings}</pre></details>
<div id="panel" hidden></div>
<script type="application/json" id="lens-data">{_json(data)}</script>
<script>{JS}</script>
</body></html>
"""


def _pick(arg, view):
    return arg.get(view) if isinstance(arg, dict) else arg


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _json(obj) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as escapes, so no token can end the element."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scale(lens, view: str, vmin, vmax) -> dict:
    """A view's cell colours as plot.py draws them: ``bg`` the ``[R, W]`` colours as one string of 6-digit
    hex, ``light`` "1" where the text is white; and its colour bar (limits, gradient, ticks)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.ticker import LogLocator, MaxNLocator

    v = VIEWS[view]
    lo, hi = limits(lens, view, vmin, vmax)
    norm = LogNorm(lo, hi) if v.log else Normalize(lo, hi)
    cm = colormaps[v.cmap].with_extremes(bad=BLANK)
    rgba = cm(norm(np.ma.masked_invalid(v.values(lens))))  # [R, W, 4], as imshow's to_rgba
    rgb = np.round(rgba[..., :3] * 255).astype(int).reshape(-1, 3)
    luma = (rgba[..., :3] @ np.array([0.299, 0.587, 0.114])).reshape(-1)
    locator = LogLocator(base=10) if v.log else MaxNLocator(nbins=5)
    ticks = [t for t in locator.tick_values(lo, hi) if lo <= t <= hi]
    stops = [f"{_hex(cm(x))} {100 * x:.0f}%" for x in np.linspace(0, 1, 11)]
    capped = view != "probs" and (v.vmax is not None or vmax is not None)
    return {"bg": "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in rgb),
            "light": "".join("1" if x < 0.5 else "0" for x in luma),  # white text on dark cells, as plot.py
            "label": v.title + (f" (capped at {hi:g})" if capped else ""), "gradient": ", ".join(stops),
            "ticks": [(float(norm(t)), f"{t:g}") for t in ticks], "blank": view == "next-rank"}


def _hex(rgba) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgba[:3])


def _legend(view: str, s: dict, shown: bool) -> str:
    """The colour bar of one view: its label, the gradient, the ticks at their places on the scale."""
    ticks = "".join(f'<span style="left:{100 * x:.2f}%">{_e(t)}</span>' for x, t in s["ticks"])
    blank = f'<span class="swatch" style="background:{BLANK}"></span> no next token' if s["blank"] else ""
    return (f'<div class="legend" data-legend="{_e(view)}"{"" if shown else " hidden"}><div class="label">'
            f'{_e(s["label"])}</div><div class="cbar" style="background:linear-gradient(to right, {s["gradient"]})">'
            f'</div><div class="ticks">{ticks}</div>'
            f'<div class="note">light = good{blank and " · " + blank}</div></div>')


def _grid(lens, scale: dict) -> str:
    """The table: next tokens on top, rows from the last one down to ``input``, input tokens and positions
    at the bottom; cells coloured by ``scale`` (the first view)."""
    R, W = len(lens.rows), lens.end - lens.start
    match = lens.matches_final
    head = "".join(f'<th class="tok" title="{_e(t)}">{_e(t)}</th>' for t in next_labels(lens, None))
    body = []
    for r in reversed(range(R)):
        cells = []
        for w in range(W):
            j = r * W + w
            style = f'background:#{scale["bg"][6 * j:6 * j + 6]};color:{"#fff" if scale["light"][j] == "1" else "#000"}'
            cls = ' class="m"' if match[r, w] else ""  # m: top-1 = the final top-1 (outlined)
            cells.append(f'<td data-row="{_e(lens.rows[r])}" data-pos="{lens.start + w}"{cls} style="{style}">'
                         f'{_e(visible(lens.top_tokens[r, w, 0]))}</td>')
        body.append(f'<tr data-r="{r}"><th class="row">{_e(lens.rows[r])}</th>{"".join(cells)}</tr>')
    inputs = "".join(f'<th class="tok" title="{_e(visible(t))}">{_e(visible(t))}</th>'
                     for t in lens.tokens[lens.start:lens.end])
    positions = "".join(f"<th>{p}</th>" for p in lens.positions)
    return (f'<table id="grid" style="width:{96 + CELL_PX * W}px"><colgroup><col class="labels">'
            f'{"<col>" * W}</colgroup><thead><tr><th class="row">next *</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody><tfoot><tr><th class="row">token</th>{inputs}</tr>'
            f'<tr class="pos"><th class="row">pos</th>{positions}</tr></tfoot></table>')


def _numbers(lens) -> dict:
    """Each cell's numbers for the panel: top-k tokens, probabilities and logits ``[R][W][k]``, the
    quantities ``[R][W]`` (NaN and rank -1 as null), and each position's tokens and lock-in row."""
    W = lens.end - lens.start
    nxt = next_labels(lens, None)
    lock = [lens.rows[i] if 0 <= i < len(lens.rows) else None for i in lens.lock_in.tolist()]
    return {"input": [visible(t) for t in lens.tokens[lens.start:lens.end]],
            "next": [nxt[w] if lens.next_ids[w] >= 0 else None for w in range(W)],
            "lock_in": lock, "top_tokens": np.vectorize(visible, otypes=[object])(lens.top_tokens).tolist(),
            "top_probs": _floats(lens.top_probs), "top_logits": _floats(lens.top_logits),
            "quantities": [{"name": name, "label": label, "unit": unit,  # ranks as integers (-1: no next token)
                            "values": getattr(lens, name).tolist() if unit == "rank" else _floats(getattr(lens, name))}
                           for name, label, unit in QUANTITIES]}


def _floats(a: np.ndarray) -> list:
    """Nested lists of 7 significant digits (enough for any digit shown), NaN as None."""
    flat = [None if not math.isfinite(x) else float(f"{x:.7g}") for x in np.asarray(a, np.float64).reshape(-1).tolist()]
    return np.array(flat, dtype=object).reshape(a.shape).tolist()


CSS = f"""
body{{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px;color:#222;background:#fff}}
h1{{font-size:17px;margin:0 0 6px}} .how{{max-width:70em;color:#444;margin:0 0 10px}}
.m-key{{outline:2px solid {OUTLINE};outline-offset:1px}}
.bar{{display:flex;flex-wrap:wrap;align-items:flex-start;gap:10px 24px;margin-bottom:10px}}
.views button{{font:inherit;padding:3px 9px;margin:0 3px 3px 0;border:1px solid #999;border-radius:3px;
background:#f4f4f4;cursor:pointer}}
.views button[aria-pressed=true]{{background:#333;color:#fff;border-color:#333}}
.legend{{width:400px}} .legend .label{{font-weight:600}} .legend .note{{color:#555;font-size:12px}}
.cbar{{height:14px;border:1px solid #888}} .ticks{{position:relative;height:16px;font-size:12px}}
.ticks span{{position:absolute;transform:translateX(-50%)}}
.swatch{{display:inline-block;width:12px;height:12px;border:1px solid #888;vertical-align:-2px}}
.scroll{{overflow:auto;max-height:82vh;border:1px solid #ddd}}
#grid{{table-layout:fixed;border-collapse:separate;border-spacing:1px;font-size:12px}}
#grid col.labels{{width:96px}} #grid col{{width:{CELL_PX}px}}
#grid td,#grid th{{overflow:hidden;text-overflow:ellipsis;white-space:pre;text-align:center;padding:2px 1px;
height:17px}}
#grid td{{font-family:ui-monospace,Menlo,Consolas,monospace;cursor:default}}
#grid td.m{{outline:2px solid {OUTLINE};outline-offset:-2px}}
#grid td:hover{{outline:2px solid #000;outline-offset:-2px}}
#grid th.row{{position:sticky;left:0;background:#fff;text-align:right;padding-right:6px;z-index:1}}
#grid thead th{{position:sticky;top:0;background:#fff;z-index:2}} #grid thead th.row{{z-index:3}}
#grid th.tok{{font-family:ui-monospace,Menlo,Consolas,monospace;font-weight:normal}}
#grid tr.pos th{{color:#777;font-weight:normal}}
details{{margin-top:10px;color:#555}} pre{{font-size:12px}}
#panel{{position:fixed;z-index:10;background:#fffffa;border:1px solid #666;box-shadow:0 2px 8px #0004;
padding:8px 10px;max-width:440px;font-size:13px;pointer-events:none}}
#panel table{{border-collapse:collapse}} #panel td{{padding:0 6px 0 0}}
#panel .tok{{font-family:ui-monospace,Menlo,monospace}} #panel h2{{font-size:13px;margin:6px 0 2px}}
#panel .num{{white-space:nowrap;text-align:right;font-variant-numeric:tabular-nums}}
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("lens-data").textContent);
  var grid = document.getElementById("grid"), panel = document.getElementById("panel");
  var cells = grid.querySelectorAll("td[data-pos]"), W = D.input.length;

  function at(td) { return +td.parentNode.dataset.r * W + (+td.dataset.pos - D.start); }

  function show(view) {  // colour every cell for `view`; press its button, show its colour bar
    var s = D.views[view];
    for (var i = 0; i < cells.length; i++) {
      var j = at(cells[i]);
      cells[i].style.background = "#" + s.bg.substr(6 * j, 6);
      cells[i].style.color = s.light.charAt(j) === "1" ? "#fff" : "#000";
    }
    document.querySelectorAll("button[data-view]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.dataset.view === view));
    });
    document.querySelectorAll("[data-legend]").forEach(function (l) { l.hidden = l.dataset.legend !== view; });
  }

  function num(x, unit) {
    if (x === null || (unit === "rank" && x < 1)) return "–";
    if (unit === "rank") return String(x);
    if (unit === "p") return x >= 1e-3 ? x.toFixed(4) : x.toExponential(2);
    return x.toFixed(3) + (unit ? " " + unit : "");
  }

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function line(table, cls, first, texts) {  // one table row: `first` the class of its first cell
    var tr = el("tr", undefined, cls);
    texts.forEach(function (t, i) { tr.appendChild(el("td", t, i ? "num" : first)); });
    table.appendChild(tr);
  }

  function fill(td) {  // the panel of one cell: where it is, its top-k, every quantity of the lens
    var r = +td.parentNode.dataset.r, w = +td.dataset.pos - D.start;
    panel.textContent = "";
    panel.appendChild(el("div", "row " + D.rows[r] + " · position " + td.dataset.pos, "where"));
    panel.appendChild(el("div", "input token: " + D.input[w]));
    panel.appendChild(el("div", "next token: " + (D.next[w] === null ? "– (end of the text)" : D.next[w])));
    panel.appendChild(el("h2", "top-" + D.top_tokens[r][w].length + ": token, probability, logit"));
    var top = el("table", undefined, "top");
    D.top_tokens[r][w].forEach(function (t, i) {
      line(top, "topk", "tok", [t, num(D.top_probs[r][w][i], "p"), num(D.top_logits[r][w][i], "")]);
    });
    panel.appendChild(top);
    panel.appendChild(el("h2", "lens quantities"));
    var q = el("table", undefined, "quantities");
    D.quantities.forEach(function (k) { line(q, "q", "name", [k.label, num(k.values[r][w], k.unit)]); });
    line(q, "q", "name", ["lock-in row (top-1 = final from here)", D.lock_in[w] === null ? "–" : D.lock_in[w]]);
    panel.appendChild(q);
    panel.hidden = false;
  }

  function place(e) {  // beside the pointer (right, else left), as low as fits in the window
    var b = panel.getBoundingClientRect(), x = e.clientX + 24;
    if (x + b.width > innerWidth - 4) x = Math.max(4, e.clientX - b.width - 24);
    var y = Math.max(4, Math.min(e.clientY - 20, innerHeight - b.height - 4));
    panel.style.left = x + "px";
    panel.style.top = y + "px";
  }

  grid.addEventListener("mouseover", function (e) {
    var td = e.target.closest("td[data-pos]");
    if (!td) { panel.hidden = true; return; }
    fill(td);
    place(e);
  });
  grid.addEventListener("mousemove", function (e) { if (!panel.hidden) place(e); });
  grid.addEventListener("mouseleave", function () { panel.hidden = true; });
  document.querySelectorAll("button[data-view]").forEach(function (b) {
    b.addEventListener("click", function () { show(b.dataset.view); });
  });
  show(D.view);
})();
"""
