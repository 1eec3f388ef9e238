#!/usr/bin/env python3
"""Time to draw and save a lens figure (PNG, 150 dpi) for windows of 10, 100 and 1,000 positions, beside
the time the lens itself took (the peer, same run), at gpt2 shape.

    python scripts/bench_render.py                       # random gpt2 weights in bench-out/
    python scripts/bench_render.py --positions 10,100,1000,3000 --view kl

Reported per window: the lens's seconds, the figure's seconds (build + savefig), the figure's size in
inches and pixels, and whether its cells carry text (windows up to ``plot.TEXT_POSITIONS`` positions).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import gpt2np  # noqa: E402
from gpt2np import plot as P  # noqa: E402
from gpt2np.config import SIZES  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=ROOT / "bench-out" / "random-gpt2")
    ap.add_argument("--positions", default="10,100,1000")
    ap.add_argument("--view", default="kl")
    ap.add_argument("--dpi", type=int, default=150)
    a = ap.parse_args(argv)
    if not (a.folder / "model.safetensors").is_file():
        from bench import write_random_checkpoint
        write_random_checkpoint(a.folder, SIZES["gpt2"])
    m = gpt2np.load(a.folder)
    ids = np.random.default_rng(0).integers(0, 50000, 1024)
    tr = m.forward(ids)
    print(f"gpt2 shape, view {a.view}, PNG at {a.dpi} dpi; cell text up to {P.TEXT_POSITIONS} positions, "
          f"figures at most {P.MAX_WIDTH:g} inches wide")
    print(f"{'positions':>9} {'lens s':>8} {'figure s':>9} {'inches':>13} {'pixels':>13}  cell text")
    with tempfile.TemporaryDirectory() as tmp:
        for T in map(int, a.positions.split(",")):
            t0 = time.perf_counter()
            lens = gpt2np.logit_lens(m, tr, end=T) if T <= len(ids) else gpt2np.logit_lens(m, m.forward(
                np.resize(ids, T)))
            t1 = time.perf_counter()
            fig = P.plot_lens(lens, a.view)
            with warnings.catch_warnings():  # tokens in scripts the font lacks are drawn as boxes
                warnings.filterwarnings("ignore", message="Glyph .* missing from")
                P.save_figure(fig, Path(tmp) / "f.png", dpi=a.dpi)
            t2 = time.perf_counter()
            w, h = fig.get_size_inches()
            print(f"{T:>9} {t1 - t0:>8.2f} {t2 - t1:>9.2f} {w:>6.1f} x {h:<5.1f} {round(w * a.dpi):>6} x "
                  f"{round(h * a.dpi):<5}  {'yes' if P.has_text(lens) else 'no'}")


if __name__ == "__main__":
    main()
