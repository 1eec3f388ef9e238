#!/usr/bin/env python3
"""Throughput of gpt2np.corpus_stats: serially against the single-text lens on the same tokens, and on a
2-worker Dask LocalCluster (one thread each) against the serial run with two threads, in one run.

    python scripts/bench_corpus.py bench-out/random-gpt2 --docs 8 --tokens 1024
    python scripts/bench_corpus.py bench-out/random-gpt2 --json bench-out/corpus.json

The documents are random token ids decoded to text (GPT-2 checkpoints with random weights in
``bench-out/``, as ``scripts/bench.py`` writes them). Reported: tokens per second of each way, the ratios
the issue targets (corpus_stats / lens >= 0.9; Dask local:2 / serial >= 0.9), and the BLAS kernel that ran.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gpt2np  # noqa: E402
from gpt2np.files import write_text  # noqa: E402


def blas() -> str:
    try:
        from threadpoolctl import threadpool_info
        return "; ".join(f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}) {p['num_threads']} threads"
                         for p in threadpool_info())
    except ImportError:
        return "threadpoolctl not installed"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per document (one window each)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    m = gpt2np.load(a.folder)
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(a.docs):  # texts whose encoding is at most one window long
        ids = m.encode(m.decode(rng.integers(0, 50000, a.tokens)))[:a.tokens]
        texts.append(m.decode(ids))
    tokens = sum(len(m.encode(t)) for t in texts)
    gpt2np.corpus_stats(m, texts[:1])  # warm up

    lens_s = serial_s = 0.0
    serial = None
    for i, t in enumerate(texts):  # alternating, document by document, the order flipped each time
        def lens():
            gpt2np.logit_lens(m, m.forward(m.encode(t)), k=1)

        def stats():
            return gpt2np.corpus_stats(m, [t])

        for which in ((lens, stats) if i % 2 == 0 else (stats, lens)):
            t0 = time.perf_counter()
            part = which()
            if which is lens:
                lens_s += time.perf_counter() - t0
            else:
                serial_s += time.perf_counter() - t0
                serial = part if serial is None else serial.merge(part)

    import distributed
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        gpt2np.corpus_stats(m, texts[:2], client=client)  # workers load the model (not timed)
        t0 = time.perf_counter()
        dask = gpt2np.corpus_stats(m, texts, client=client)
        dask_s = time.perf_counter() - t0
    assert dask.positions == serial.positions, (dask.positions, serial.positions)
    print("max relative difference of the KL sums, Dask vs serial:",
          float(np.max(np.abs(dask.kl_final - serial.kl_final)) / np.max(np.abs(serial.kl_final))))

    out = {"blas": blas(), "model": a.folder.name, "documents": a.docs, "tokens": tokens,
           "lens_tok_s": tokens / lens_s, "corpus_stats_tok_s": tokens / serial_s, "dask_local2_tok_s": tokens / dask_s,
           "corpus_over_lens": lens_s / serial_s, "dask_over_serial": serial_s / dask_s}
    print(f"BLAS: {out['blas']}")
    print(f"{a.folder.name}, {a.docs} documents, {tokens} tokens:")
    print(f"  single-text lens      {out['lens_tok_s']:8.1f} tokens/s")
    print(f"  corpus_stats, serial  {out['corpus_stats_tok_s']:8.1f} tokens/s  ({out['corpus_over_lens']:.2f} of the "
          "lens's rate; target >= 0.9)")
    print(f"  corpus_stats, Dask local:2 (1 thread each)  {out['dask_local2_tok_s']:8.1f} tokens/s  "
          f"({out['dask_over_serial']:.2f} of serial with 2 threads; target >= 0.9)")
    if a.json:
        write_text(a.json, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
