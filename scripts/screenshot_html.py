#!/usr/bin/env python3
"""The README's screenshot of the HTML view: a lens page opened in headless Chromium, a cell hovered.

    python scripts/screenshot_html.py --model weights/random-gpt2 --out docs/lens-html.png

Writes the page beside the screenshot (``.html``) with ``gpt2np lens``'s own code, opens it with Selenium
(Debian's chromium and chromium-driver), switches to the KL view, hovers one cell and saves a PNG.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gpt2np  # noqa: E402
from gpt2np.files import write_text  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint name or folder")
    ap.add_argument("--text", default=(ROOT / "examples" / "plasma.txt").read_text(encoding="utf-8").strip())
    ap.add_argument("--view", default="kl")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "lens-html.png")
    a = ap.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    m = gpt2np.load(a.model)
    lens = gpt2np.logit_lens(m, m.forward(m.encode(a.text)))
    page = a.out.with_suffix(".html")
    write_text(page, lens.to_html(view=a.view))
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,760", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(page.as_uri())
        cells = driver.find_elements(By.CSS_SELECTOR, f'[data-row="{lens.rows[len(lens.rows) // 2]}"][data-pos]')
        ActionChains(driver).move_to_element(cells[min(5, len(cells) - 1)]).perform()
        driver.save_screenshot(str(a.out))
    finally:
        driver.quit()
    print(f"wrote {a.out} and {page}")


if __name__ == "__main__":
    main()
