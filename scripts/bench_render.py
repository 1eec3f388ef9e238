#!/usr/bin/env python3
"""Time to draw and save a lens figure (PNG, 150 dpi) for windows of 10, 100 and 1,000 positions, beside
the time the lens itself took (the peer, same run), at gpt2 shape.

    python scripts/bench_render.py                       # random gpt2 weights in bench-out/
    python scripts/bench_render.py --positions 10,32,96,1000 --sublayers --formats png,svg,pdf

Reported per window: the lens's seconds, the figure's seconds (build + savefig) for each format, the
figure's size in inches and pixels, its panels, and whether its cells carry text (``plot.layout``: at
most ``plot.TEXT_POSITIONS`` positions and ``plot.TEXT_CELLS`` cells).
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
    ap.add_argument("--sublayers", action="store_true", help="the l.attn rows too (25 rows instead of 13)")
    ap.add_argument("--formats", default="png", help="comma-separated: png, svg, pdf (default png)")
    a = ap.parse_args(argv)
    if not (a.folder / "model.safetensors").is_file():
        from bench import write_random_checkpoint
        write_random_checkpoint(a.folder, SIZES["gpt2"])
    m = gpt2np.load(a.folder)
    formats = a.formats.split(",")
    longest = max(map(int, a.positions.split(",")))
    ids = np.random.default_rng(0).integers(0, 50000, max(1024, longest))[:m.config.n_positions]
    tr = m.forward(ids, sublayers=a.sublayers)
    print(f"gpt2 shape, view {a.view}, {a.dpi} dpi; figures at most {P.MAX_WIDTH:g} inches wide; cell text in panels "
          f"of <= {P.PANEL_POSITIONS} positions, up to {P.TEXT_POSITIONS} positions and {P.TEXT_CELLS} cells")
    print(f"{'positions':>9} {'rows':>4} {'lens s':>7} " + "".join(f"{f + ' s':>7}" for f in formats)
          + f" {'inches':>13} {'pixels':>13} {'panels':>6}  cell text")
    with tempfile.TemporaryDirectory() as tmp:
        for T in map(int, a.positions.split(",")):
            t0 = time.perf_counter()
            lens = gpt2np.logit_lens(m, tr, end=T, sublayers=a.sublayers)
            seconds = [time.perf_counter() - t0]
            for f in formats:  # a new figure each time: build + save
                t0 = time.perf_counter()
                fig = P.plot_lens(lens, a.view)
                with warnings.catch_warnings():  # tokens in scripts the font lacks are drawn as boxes
                    warnings.filterwarnings("ignore", message="Glyph .* missing from")
                    P.save_figure(fig, Path(tmp) / f"f.{f}", dpi=a.dpi)
                seconds.append(time.perf_counter() - t0)
            w, h = fig.get_size_inches()
            lay = P.layout(T, len(lens.rows))
            print(f"{T:>9} {len(lens.rows):>4} {seconds[0]:>7.2f} " + "".join(f"{s:>7.2f}" for s in seconds[1:])
                  + f" {w:>6.1f} x {h:<5.1f} {round(w * a.dpi):>6} x {round(h * a.dpi):<5} {len(lay.panels):>6}  "
                  + ("yes" if lay.text else "no (overview)"))


if __name__ == "__main__":
    main()
