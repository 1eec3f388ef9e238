"""The lens as one HTML page (gpt2np/html.py): its markup, then the page in a real headless Chromium
(Selenium with Debian's chromium and chromium-driver): cells and tokens, the view switch, the hover
panel, and no network request."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import gpt2np
from gpt2np import cli
from gpt2np.plot import VIEWS

from conftest import reference_required

TEXT = "The logit lens <b>reads</b> & the \"residual\" stream.\nIt scrolls"


@pytest.fixture(scope="module")
def lens(tiny_model):
    m = tiny_model
    return gpt2np.logit_lens(m, m.forward(m.encode(TEXT)), k=3)


def shown(token: str) -> str:
    """A token as the grid writes it, by this test's own rule: space ·, newline ↵, tab ⇥, return ⏎, other control
    characters as \\xNN."""
    out = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥").replace("\r", "⏎")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", out) or "∅"


def test_the_page_has_every_cell_escaped_and_nothing_external(lens):
    page = lens.to_html()
    cells = re.findall(r'<td data-row="([^"]*)" data-pos="(\d+)"[^>]*>([^<]*)</td>', page)
    R, W = len(lens.rows), lens.end - lens.start
    assert len(cells) == R * W
    assert {(r, int(p)) for r, p, _ in cells} == {(r, p) for r in lens.rows for p in range(lens.start, lens.end)}
    assert "<b>reads</b>" not in page  # the text's markup is escaped, never markup of the page
    assert not re.search(r"(https?:)?//[a-z0-9]", page.split("<script>")[0], re.I)
    assert not re.search(r'\b(src|href)\s*=|@import|url\(', page, re.I)  # no resource of any kind
    assert page == gpt2np.html.to_html(lens) and "<iframe srcdoc=" in lens._repr_html_()
    with pytest.raises(ValueError, match="unknown view"):
        lens.to_html("colours")


def test_the_command_line_writes_a_page(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "lens.html"
    assert cli.main(["lens", TEXT, "--model", str(tiny_checkpoint), "--out", str(out), "--view", "kl",
                     "--save", str(tmp_path / "l.npz")]) == 0, capsys.readouterr().err
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert cli.main(["plot", str(tmp_path / "l.npz"), "--out", str(tmp_path / "again.html"), "--view", "kl"]) == 0
    assert (tmp_path / "again.html").read_bytes() == out.read_bytes()  # the saved lens gives the same page
    assert cli.main(["plot", str(tmp_path / "l.npz"), "--out", str(tmp_path / "x.htm")]) == 2
    assert "unsupported file type .htm" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
    except ImportError as e:
        pytest.fail(f"the browser tests need selenium ({e}): pip install -e '.[test]'", pytrace=False)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        msg = "the browser tests need Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        if reference_required():  # CI (.ci/run) installs them: there a missing browser is a failure
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
              "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):  # any fetch would fail, and be seen
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_in_chromium_cells_views_hover_and_no_network(browser, lens, tiny_model, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = tmp_path / "lens.html"
    page.write_text(lens.to_html(view="logits"), encoding="utf-8")
    browser.get_log("performance")  # drop what came before
    browser.get(page.as_uri())
    cells = browser.find_elements(By.CSS_SELECTOR, "[data-row][data-pos]")
    assert len(cells) == len(lens.rows) * (lens.end - lens.start)
    # each cell's text is its top-1 token, decoded here by the model's tokenizer
    got = {(c.get_attribute("data-row"), int(c.get_attribute("data-pos"))): c.get_attribute("textContent")
           for c in cells}
    for r, row in enumerate(lens.rows):
        for w in range(lens.end - lens.start):
            assert got[row, lens.start + w] == shown(tiny_model.decode([int(lens.top_ids[r, w, 0])])), (row, w)

    def colours():
        return browser.execute_script("return Array.from(document.querySelectorAll('[data-pos]'))"
                                      ".map(e => getComputedStyle(e).backgroundColor)")

    before = colours()
    for view in VIEWS:  # every view can be switched to and shows its own colour bar
        browser.find_element(By.CSS_SELECTOR, f'button[data-view="{view}"]').click()
        legend = browser.find_element(By.CSS_SELECTOR, f'[data-legend="{view}"]')
        assert legend.is_displayed() and VIEWS[view].title.split()[0] in legend.text
    browser.find_element(By.CSS_SELECTOR, 'button[data-view="ranks"]').click()
    after = colours()
    assert after != before and len(set(after)) > 1

    # hovering a cell shows its top-k tokens and probabilities
    row, w = lens.rows[1], 2
    cell = browser.find_element(By.CSS_SELECTOR, f'[data-row="{row}"][data-pos="{lens.start + w}"]')
    panel = browser.find_element(By.ID, "panel")
    assert not panel.is_displayed()
    ActionChains(browser).move_to_element(cell).perform()
    assert panel.is_displayed()
    text = panel.text
    assert f"row {row} · position {lens.start + w}" in text
    for i in range(3):
        assert shown(tiny_model.decode([int(lens.top_ids[1, w, i])])) in text
        assert f"{lens.top_probs[1, w, i]:.4f}" in text
    assert f"{lens.kl_final[1, w]:.3f}" in text

    # nothing was fetched: no resource entries, no network request but the page itself
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    urls = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url")
            for e in browser.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
    assert [u for u in urls if u and u != page.as_uri()] == []
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no script error


def test_a_long_window_scrolls_instead_of_shrinking(browser, tiny_model, tmp_path):
    m = tiny_model
    ids = np.arange(64) % 200
    lens = gpt2np.logit_lens(m, m.forward(ids), k=1)
    page = tmp_path / "long.html"
    page.write_text(lens.to_html(), encoding="utf-8")
    browser.get(page.as_uri())
    width = browser.execute_script("return document.querySelector('[data-pos]').getBoundingClientRect().width")
    scroll = browser.execute_script("var s = document.querySelector('.scroll'); return [s.scrollWidth, s.clientWidth]")
    assert width >= 40 and scroll[0] > scroll[1]  # cells keep their width; the grid scrolls sideways
