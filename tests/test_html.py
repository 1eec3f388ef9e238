"""The lens as one HTML page (gpt2np/html.py): first the string (parsed with the standard library's
HTMLParser), then the page opened in headless Chromium through Selenium: cells and their texts, the
view switch and its colours, the hover panel, fixed-width cells that scroll, and no network request.

Expected values come from the lens's arrays and the model's tokenizer (tiktoken's bytes of each id),
with the visible-whitespace mapping written out here; the colours are plot.py's own (the scale the page
must match), read from a figure's image.

The browser tests need chromium, chromium-driver (Debian packages; .ci/run installs them) and selenium
(the ``test`` extra). Where one is missing they skip locally, and fail under GPT2NP_REQUIRE_REFERENCE=1
(as in CI): they can never pass CI by being skipped. One browser serves the whole module; it runs
behind a proxy that refuses every connection, so any fetch would fail and be logged.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import REQUIRE_ENV, reference_required

import gpt2np
from gpt2np import cli
from gpt2np import plot as P
from gpt2np.html import CELL_PX, to_html

TEXT = "When people say plasma,\nthey\tmean blood. Other times"  # 33 tokens in the tiny vocabulary
ODD = '</script><b id="x">&amp;"\'<!--'  # a token that must stay text everywhere on the page


def shown(token: str) -> str:
    """Whitespace made visible, written out independently of gpt2np.plot (as in test_plot.py)."""
    s = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in s) or "∅"


def decoded(model, i) -> str:
    """Token ``i`` as shown, from the tokenizer's bytes (not the lens's own strings)."""
    return shown(model.tokenizer.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace"))


@pytest.fixture(scope="module")
def lens(tiny_model):
    """The last 12 positions (the last has no next token), sub-rows every 2 blocks: 5 rows."""
    ids = tiny_model.encode(TEXT)
    trace = tiny_model.forward(ids, sublayers=True)
    return gpt2np.logit_lens(tiny_model, trace, start=len(ids) - 12, sublayers=True, step=2)


@pytest.fixture(scope="module")
def odd_lens(lens):
    """The lens with ODD as one cell's top-1, an input token and a row label."""
    top, tokens = lens.top_tokens.astype("U40"), lens.tokens.astype("U40")
    top[1, 2, 0] = top[1, 2, 1] = ODD
    tokens[lens.start] = ODD
    return dataclasses.replace(lens, top_tokens=top, tokens=tokens, rows=(lens.rows[0], ODD, *lens.rows[2:]))


class Page(HTMLParser):
    """The cells (``td`` with data-row and data-pos) and their texts, and every tag's attributes."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.cells, self.tags, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "td" and "data-row" in a and "data-pos" in a:
            self._cell = [a["data-row"], int(a["data-pos"]), "", a.get("class", "")]
            self.cells.append(self._cell)

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data


# -------------------------------------------------------------------------------------------------
# The string


def test_the_page_holds_one_cell_per_row_and_position(lens, tiny_model):
    page = Page(to_html(lens, view="kl"))
    R, W = len(lens.rows), lens.end - lens.start
    assert len(page.cells) == R * W == 60
    got = {(row, pos): (text, cls) for row, pos, text, cls in page.cells}
    for r, row in enumerate(lens.rows):
        for w, pos in enumerate(range(lens.start, lens.end)):
            match = lens.top_ids[r, w, 0] == lens.top_ids[-1, w, 0]  # the last row is the final one
            assert got[row, pos] == (decoded(tiny_model, lens.top_ids[r, w, 0]), "m" if match else "")
    # rows from the last one at the top down to input, as in the figure
    order = [row for row, *_ in page.cells[::W]]
    assert order == list(reversed(lens.rows)) and order[-1] == "input"


def test_stars_mark_the_next_tokens_the_final_row_gets_right(lens, tiny_model):
    nxt = lens.ids[lens.start + 1:]
    final = lens.top_ids[-1, :, 0].copy()
    final[::3][:3] = nxt[::3][:3]  # make the model right at positions 0, 3 and 6 of the window
    right = dataclasses.replace(lens, final_ids=final)
    text = to_html(right)
    head = re.search(r"<thead>(.*?)</thead>", text, re.S).group(1)
    labels = [html.unescape(s) for s in re.findall(r"<th[^>]*>(.*?)</th>", head)][1:]  # after "next *"
    want = [decoded(tiny_model, t) + ("*" if w in (0, 3, 6) else "") for w, t in enumerate(nxt)] + [""]
    assert labels == want


def test_every_token_is_escaped(odd_lens):
    text = to_html(odd_lens, title=ODD)
    page = Page(text)
    assert len(page.cells) == 60
    cell = [c for c in page.cells if c[0] == ODD and c[1] == odd_lens.start + 2]
    assert len(cell) == 1 and cell[0][2] == shown(ODD)  # its space as ·
    assert not any(tag == "b" for tag, _ in page.tags)  # the token made no element
    assert text.count("</script>") == 2 and text.count("<!--") == 0  # the page's own two scripts
    data = json.loads(re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', text, re.S).group(1))
    assert data["top_tokens"][1][2][:2] == [shown(ODD)] * 2 and data["rows"][1] == ODD


def test_nothing_external(lens):
    text = to_html(lens)
    for needle in ("http://", "https://", "src=", "href=", "url(", "@import", "@font-face", "<link", "<img"):
        assert needle not in text, needle
    tags = {tag for tag, _ in Page(text).tags}
    assert tags.isdisjoint({"img", "link", "iframe", "object", "embed", "video", "audio", "source"})


def test_the_lens_methods_give_the_same_page(lens):
    assert lens.to_html(view="ranks", title="t") == to_html(lens, view="ranks", title="t")
    frame = Page(lens._repr_html_())
    ((tag, attrs),) = frame.tags
    assert tag == "iframe" and attrs["srcdoc"] == lens.to_html() and "allow-scripts" in attrs["sandbox"]
    with pytest.raises(ValueError, match="unknown view 'kl-final'"):
        lens.to_html(view="kl-final")


def test_cli_writes_the_page(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    out, npz = tmp_path / "lens.html", tmp_path / "lens.npz"
    code = cli.main(["lens", TEXT, "--model", str(tiny_checkpoint), "--view", "kl", "--out", str(out),
                     "--save", str(npz)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8") == gpt2np.Lens.load(npz).to_html(view="kl")
    again = tmp_path / "again.html"
    assert cli.main(["plot", str(npz), "--view", "ranks", "--out", str(again)]) == 0
    assert again.read_text(encoding="utf-8") == gpt2np.Lens.load(npz).to_html(view="ranks")
    # generate --lens-out, then plot --out .html
    gen, page = tmp_path / "gen.npz", tmp_path / "gen.html"
    assert cli.main(["generate", "The", "--model", str(tiny_checkpoint), "--max-new-tokens", "3", "--seed", "0",
                     "--lens-out", str(gen)]) == 0
    assert cli.main(["plot", str(gen), "--out", str(page)]) == 0
    g = gpt2np.Lens.load(gen)
    assert len(Page(page.read_text(encoding="utf-8")).cells) == len(g.rows) * (g.end - g.start)
    capsys.readouterr()
    # other extensions are still refused, before any work
    for bad in ("lens.htm", "lens.xhtml"):
        assert cli.main(["plot", str(npz), "--out", str(tmp_path / bad)]) == 2
        assert "unsupported file type" in capsys.readouterr().err
    # a failed write leaves the earlier page as it was
    before = out.read_bytes()

    def half_and_fail(self, data):
        with open(self, "wb") as f:
            f.write(data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_and_fail)
    assert cli.main(["plot", str(npz), "--out", str(out)]) == 2
    assert "cannot write" in capsys.readouterr().err
    monkeypatch.undo()
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


# -------------------------------------------------------------------------------------------------
# In the browser


def _missing(what: str):
    msg = f"the browser tests need {what}"
    if reference_required():
        pytest.fail(f"{REQUIRE_ENV}=1 (CI) but {msg}", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (fixed window, no sandbox, no GPU) behind a proxy that refuses every connection,
    with performance (network) and console logs."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium: pip install -e '.[test]'")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        _missing("chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--disable-extensions",
                "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    # the driver's path given: Selenium Manager (which would download one) is never run
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def open_page(browser, path: Path, text: str) -> list[str]:
    """Write ``text`` to ``path``, load it; return the URLs of every request made (the page's own included)."""
    path.write_text(text, encoding="utf-8")
    browser.get_log("performance")  # drop what came before
    browser.get(path.as_uri())
    browser.execute_script("return document.readyState")
    return requests(browser)


def requests(browser) -> list[str]:
    """Every URL the browser asked for since the last look (Chrome's performance log)."""
    urls = []
    for entry in browser.get_log("performance"):
        m = json.loads(entry["message"])["message"]
        if m["method"] == "Network.requestWillBeSent":
            urls.append(m["params"]["request"]["url"])
    return urls


def quiet(browser) -> None:
    """No error on the console (a script error, a failed load)."""
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def cells(browser) -> list:
    """``[row, pos, text, background]`` of every ``[data-row][data-pos]`` element, in one script call."""
    return browser.execute_script("""return Array.from(document.querySelectorAll('[data-row][data-pos]'), e =>
        [e.dataset.row, +e.dataset.pos, e.textContent, getComputedStyle(e).backgroundColor]);""")


def figure_colours(lens, view: str) -> dict:
    """``(row, pos) -> 'rgb(r, g, b)'`` as the static figure colours the cell (its mesh's to_rgba)."""
    from matplotlib.collections import QuadMesh

    (im,) = [c for c in P.plot_lens(lens, view).axes[0].collections if isinstance(c, QuadMesh)]
    rgba = im.to_rgba(np.ma.masked_invalid(P.VIEWS[view].values(lens)))
    out = {}
    for r, row in enumerate(lens.rows):
        for w in range(lens.end - lens.start):
            red, green, blue = (round(float(c) * 255) for c in rgba[r, w, :3])
            out[row, lens.start + w] = f"rgb({red}, {green}, {blue})"
    return out


def test_browser_shows_every_cell_with_its_top1_token(browser, lens, tiny_model, tmp_path):
    urls = open_page(browser, tmp_path / "lens.html", to_html(lens, view="ranks"))
    got = cells(browser)
    assert len(got) == len(lens.rows) * (lens.end - lens.start)
    want = {(row, lens.start + w): decoded(tiny_model, lens.top_ids[r, w, 0])
            for r, row in enumerate(lens.rows) for w in range(lens.end - lens.start)}
    assert {(row, pos): text for row, pos, text, _ in got} == want
    assert {(row, pos): bg for row, pos, _, bg in got} == figure_colours(lens, "ranks")  # the first view
    assert urls == [(tmp_path / "lens.html").as_uri()]  # the page itself, nothing else
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    quiet(browser)


def test_switching_the_view_recolours_the_cells(browser, lens, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, tmp_path / "lens.html", to_html(lens, view="logits"))
    before = {(row, pos): bg for row, pos, _, bg in cells(browser)}
    assert before == figure_colours(lens, "logits")
    for view in ("kl", "next-rank", "entropy"):
        browser.find_element(By.CSS_SELECTOR, f'button[data-view="{view}"]').click()
        after = {(row, pos): bg for row, pos, _, bg in cells(browser)}
        assert after == figure_colours(lens, view), view
        assert sum(after[k] != before[k] for k in after) > len(after) // 2
        legends = browser.find_elements(By.CSS_SELECTOR, "[data-legend]")
        assert [e.get_attribute("data-legend") for e in legends if e.is_displayed()] == [view]
        assert browser.find_element(By.CSS_SELECTOR, f'button[data-view="{view}"]').get_attribute(
            "aria-pressed") == "true"
    # next-rank: the last position (no next token) is blank
    assert after != before and figure_colours(lens, "next-rank")["input", lens.end - 1] == "rgb(230, 230, 230)"
    assert len(legends) == len(P.VIEWS) and requests(browser) == []
    quiet(browser)


def test_hovering_a_cell_shows_its_numbers(browser, lens, tiny_model, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, tmp_path / "lens.html", to_html(lens))
    panel = browser.find_element(By.ID, "panel")
    assert not panel.is_displayed()
    for r, w in ((2, 4), (0, lens.end - lens.start - 1)):  # a middle cell, and the last position
        row, pos = lens.rows[r], lens.start + w
        cell = browser.find_element(By.CSS_SELECTOR, f'td[data-row="{row}"][data-pos="{pos}"]')
        ActionChains(browser).move_to_element(cell).perform()
        assert panel.is_displayed()
        text = panel.text
        assert f"row {row} · position {pos}" in text
        assert f"input token: {decoded(tiny_model, lens.ids[pos])}" in text
        top = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
               for tr in panel.find_elements(By.CSS_SELECTOR, "tr.topk")]
        assert [t for t, _, _ in top] == [decoded(tiny_model, i) for i in lens.top_ids[r, w]]
        for (_, p, z), p_want, z_want in zip(top, lens.top_probs[r, w], lens.top_logits[r, w]):
            assert abs(float(p) - p_want) <= 5e-5 + 5e-3 * p_want and abs(float(z) - z_want) <= 5e-4
        q = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
             for tr in panel.find_elements(By.CSS_SELECTOR, "tr.q")}
        assert abs(float(q["KL(final ‖ row)"].split()[0]) - lens.kl_final[r, w]) <= 5e-4
        assert abs(float(q["KL(input ‖ row)"].split()[0]) - lens.kl_input[r, w]) <= 5e-4
        assert abs(float(q["entropy"].split()[0]) - lens.entropy[r, w]) <= 5e-4
        assert q["rank of the final top-1"] == str(lens.final_rank[r, w])
        assert q["rank of the input token"] == str(lens.input_rank[r, w])
        if pos + 1 < len(lens.ids):
            assert q["rank of the true next token"] == str(lens.next_rank[r, w])
            assert abs(float(q["next-token cross-entropy"].split()[0]) - lens.next_xent[r, w]) <= 5e-4
        else:  # no next token
            assert "next token: – (end of the text)" in text
            assert q["rank of the true next token"] == q["next-token cross-entropy"] == "–"
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    assert not panel.is_displayed()
    assert requests(browser) == []
    quiet(browser)


def test_odd_tokens_stay_text_in_the_browser(browser, odd_lens, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, tmp_path / "odd.html", to_html(odd_lens, title=ODD))
    assert browser.execute_script("return document.querySelectorAll('#grid b, #x').length") == 0
    assert browser.title == ODD
    got = {(row, pos): text for row, pos, text, _ in cells(browser)}
    assert len(got) == 60 and got[ODD, odd_lens.start + 2] == shown(ODD)
    cell = [e for e in browser.find_elements(By.CSS_SELECTOR, "td[data-pos]")
            if e.get_attribute("data-row") == ODD and e.get_attribute("data-pos") == str(odd_lens.start + 2)]
    ActionChains(browser).move_to_element(cell[0]).perform()
    top = [tr.find_elements(By.TAG_NAME, "td")[0].text
           for tr in browser.find_elements(By.CSS_SELECTOR, "#panel tr.topk")]
    assert top[:2] == [shown(ODD)] * 2
    quiet(browser)


def test_long_windows_scroll_with_fixed_cells(browser, tiny_model, tmp_path):
    ids = tiny_model.encode(TEXT)  # 33 positions of 64 pixels: wider than the window
    long = gpt2np.logit_lens(tiny_model, tiny_model.forward(ids))
    open_page(browser, tmp_path / "long.html", to_html(long))
    widths, scroll, client = browser.execute_script("""const s = document.querySelector('.scroll');
        return [Array.from(document.querySelectorAll('td[data-pos]'), e => e.getBoundingClientRect().width),
                s.scrollWidth, s.clientWidth];""")
    assert len(widths) == len(long.rows) * len(ids)
    assert max(widths) - min(widths) < 0.01 and abs(widths[0] - CELL_PX) <= 2  # border spacing
    assert scroll > client >= 1000 and scroll >= CELL_PX * len(ids)
    quiet(browser)


def test_the_network_check_sees_a_fetch(browser, lens, tmp_path):
    """The checks above can fail: a page that asks for an image is caught by them."""
    text = to_html(lens).replace("</body>", '<img src="http://192.0.2.1/x.png" alt=""></body>')
    urls = open_page(browser, tmp_path / "fetching.html", text)
    assert "http://192.0.2.1/x.png" in urls
    browser.get_log("browser")  # the refused load is logged there; drop it
