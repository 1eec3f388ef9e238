#!/usr/bin/env python3
"""The cost of fitting a tuned lens: tokens per second of the ridge fit and of the KL fit, against the
forward pass with every stream kept (the peer both must run), at gpt2 shape, in one run.

    python scripts/bench_tune.py                      # gpt2 shape, random weights in bench-out/
    python scripts/bench_tune.py --tokens 4096 --json bench-out/tune.json

The checkpoint is random (``scripts/bench.py``'s writer, official layout, gpt2 shape), the corpus random
token ids. Each measurement reads the same ``--tokens`` tokens in windows of ``--window``: the forward
pass alone, ``fit_ridge`` (forward, then the float64 sums of every row; one solve at the end, included),
and ``fit_kl`` with ``--kl-steps`` steps from the identity (forward, then for every row the translator, ln_f,
the unembedding, the softmax, and their gradient back to A and b). Reported: tokens per second of each,
their ratio to the forward pass, the paper's schedule (250 steps x 2**18 tokens) in hours at the measured
KL rate, and the BLAS kernel that ran (threadpoolctl).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import gpt2np  # noqa: E402
from gpt2np.config import SIZES  # noqa: E402
from gpt2np.files import write_text  # noqa: E402
from gpt2np.tuned_fit import fit_kl, fit_ridge  # noqa: E402
from bench_corpus import blas  # noqa: E402  (the BLAS kernel that ran, as threadpoolctl reports it)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=ROOT / "bench-out" / "random-gpt2")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens each measurement reads (default 2048)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--kl-steps", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    if not (a.folder / "model.safetensors").is_file():
        from bench import write_random_checkpoint
        write_random_checkpoint(a.folder, SIZES["gpt2"])
    m = gpt2np.load(a.folder)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, a.tokens).astype(np.int32)  # [N]
    m.forward(ids[:64])  # warm up

    def forward():
        for s in range(0, a.tokens, a.window):
            m.forward(ids[s:s + a.window])

    def ridge():
        fit_ridge(m, None, ids=ids, window=a.window)

    def kl():
        fit_kl(m, None, ids=ids, init="identity", steps=a.kl_steps, tokens_per_step=a.tokens // a.kl_steps,
               window=a.window)

    seconds = {}
    for name, fn in (("forward", forward), ("ridge", ridge), ("kl", kl)):
        t0 = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - t0
    rate = {k: a.tokens / v for k, v in seconds.items()}
    paper = 250 * 2 ** 18 / rate["kl"] / 3600
    result = {"tokens": a.tokens, "window": a.window, "seconds": seconds, "tokens_per_s": rate,
              "ratio_to_forward": {k: rate[k] / rate["forward"] for k in ("ridge", "kl")},
              "paper_schedule_hours_at_kl_rate": paper, "blas": blas(), "cpu": platform.processor() or platform.machine()}
    print(f"gpt2 shape, {a.tokens} tokens in windows of {a.window}; BLAS: {result['blas']}")
    for k in ("forward", "ridge", "kl"):
        extra = "" if k == "forward" else f"  ({rate[k] / rate['forward']:.2f} of the forward pass)"
        print(f"{k:>8}: {rate[k]:8.1f} tokens/s  {seconds[k]:7.1f} s{extra}")
    print(f"the paper's schedule (250 steps x 2**18 tokens) at this KL rate: {paper:,.0f} hours")
    if a.json:
        write_text(a.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
