"""The README's screenshot of the lens page (docs/lens-html.png): a tiny random checkpoint, its lens as
``gpt2np.html.to_html``, opened in headless Chromium with one cell hovered.

    python scripts/screenshot_html.py docs/lens-html.png

Needs chromium, chromium-driver (``apt-get install chromium chromium-driver``) and selenium (the
``test`` extra). The checkpoint uses GPT-2's real tokenizer files where they are (``--tokenizer``,
default ../shared/data/gpt2-tokenizer beside the repository), else a small byte-level vocabulary: the
weights are random, so the guesses are nonsense; the picture shows the layout. The PNG is reduced to
256 colours (a few tens of kilobytes).
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import REAL_TOKENIZER, write_checkpoint  # noqa: E402

import gpt2np  # noqa: E402
from gpt2np.config import Config  # noqa: E402
from gpt2np.files import write_bytes  # noqa: E402
from gpt2np.html import to_html  # noqa: E402

TEXT = "Sometimes, when people say plasma, they mean a state of matter. Other times"


def browser(width: int, height: int):
    """Headless Chromium with a fixed window, behind a proxy that refuses every connection."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        sys.exit("screenshot_html.py needs chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                "--proxy-server=127.0.0.1:9", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", default=str(ROOT / "docs" / "lens-html.png"), help="the PNG to write")
    p.add_argument("--tokenizer", default=str(REAL_TOKENIZER) if (REAL_TOKENIZER / "vocab.json").is_file() else None,
                   help="folder with vocab.json and merges.txt (default: GPT-2's, where present)")
    p.add_argument("--view", default="ranks", help="the view shown (default ranks: random weights vary most there)")
    p.add_argument("--scale", type=float, default=4.0, help="weights' scale (larger: more contrast; default 4)")
    p.add_argument("--size", default="1200x800", help="window size in pixels, WIDTHxHEIGHT")
    args = p.parse_args(argv)
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    width, height = (int(x) for x in args.size.split("x"))
    vocab = 50257 if args.tokenizer else 400
    config = Config(n_layer=6, n_head=4, n_embd=64, n_positions=64, vocab_size=vocab)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp) / "random", config, seed=0, scale=args.scale,
                                  tokenizer_dir=args.tokenizer)
        model = gpt2np.load(folder)
        ids = model.encode(TEXT)
        lens = gpt2np.logit_lens(model, model.forward(ids))
        page = Path(tmp) / "lens.html"
        page.write_text(to_html(lens, view=args.view, title="logit lens of a tiny random checkpoint (6 blocks)"),
                        encoding="utf-8")
        d = browser(width, height)
        try:
            d.get(page.as_uri())
            cell = d.find_element(By.CSS_SELECTOR, 'td[data-row="1"][data-pos="3"]')  # the panel below it
            ActionChains(d).move_to_element(cell).perform()
            png = d.get_screenshot_as_png()  # what save_screenshot writes
        finally:
            d.quit()
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buf, format="PNG", optimize=True)
    write_bytes(args.out, buf.getvalue())
    shot = Image.open(io.BytesIO(png))
    print(f"wrote {args.out} ({len(buf.getvalue()) / 1024:.0f} KB, {shot.width} x {shot.height} pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
