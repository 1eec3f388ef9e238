#!/usr/bin/env python3
"""Benchmark the logit lens: gpt2np against a straightforward torch lens, and against NumPy's own
matrix product on the same shapes (``[chunk, D] @ [D, V]``, timed in the lens's process before each
lens run, so that both see the machine in the same state).

Each measurement runs in a fresh worker process: the model is loaded, the forward pass is run
(not timed here: scripts/bench.py times it), the peak-RSS counter is reset (Linux
``/proc/self/clear_refs``), and then the lens is timed; "extra memory" is the lens's peak above the
resident size after the forward pass, as the lens specification defines it.

The torch lens is what a user would write with transformers: ``ln_f`` and the unembedding on every
hidden state (stacked), ``log_softmax``, KL(final || row) and KL(input || row), entropy, the ranks of
the final top-1, input and next tokens, top-5, next-token probability and cross-entropy: the same
quantities as ``gpt2np.logit_lens``.

    python scripts/bench_lens.py bench-out/random-gpt2 --seq 1024 [--sublayers] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    """``VmRSS`` (resident) or ``VmHWM`` (its peak) of this process, in KiB (0 where /proc has none)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current resident size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_json(cmd: list[str], what: str) -> dict:
    """Run ``cmd`` (a worker process of a benchmark script) and return the JSON on its last line of output."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(kind: str, path: str, T: int, sublayers: bool, repeats: int) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import gpt2np
    from gpt2np.config import Config

    # the torch worker loads the weights through transformers alone (_torch_lens)
    model = gpt2np.load(path) if kind == "gpt2np" else None
    config = model.config if model is not None else Config.from_json(Path(path) / "config.json")
    V, D = config.vocab_size, config.n_embd
    ids = np.random.default_rng(0).integers(0, V, T)
    out = {"kind": kind, "T": T, "sublayers": sublayers}
    matmul = None
    if kind == "gpt2np":  # NumPy's own product on the lens's shapes, [chunk, D] @ [D, V], timed between lens runs
        from gpt2np.lens import CHUNK
        x = np.random.default_rng(1).standard_normal((CHUNK, D), dtype=np.float32)
        z = np.empty((CHUNK, V), np.float32)
        WT = model.params.wte.T

        def product():
            t = time.perf_counter()
            for _ in range(4):
                np.matmul(x, WT, out=z)
            return (time.perf_counter() - t) / 4

        product()
        matmul = product
    if kind == "gpt2np":
        trace = model.forward(ids, sublayers=sublayers)
        run = lambda: gpt2np.logit_lens(model, trace, sublayers=sublayers)  # noqa: E731
    else:
        run = _torch_lens(path, ids, sublayers)
    run()  # warm-up
    out["forward_peak_bytes"] = _status_kib("VmHWM") * 1024  # the process so far: weights, trace, one lens
    times, extra, peaks, products = [], [], [], []
    for _ in range(repeats):
        if matmul is not None:
            products.append(matmul())
        base = _status_kib("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        lens = run()
        times.append(time.perf_counter() - t)
        extra.append((_status_kib("VmHWM") - base) * 1024)
        peaks.append(_status_kib("VmHWM") * 1024)
        del lens
    out["seconds"] = statistics.median(times)
    out["times"] = times
    out["extra_bytes"] = max(extra)
    out["peak_bytes"] = max([out["forward_peak_bytes"], *peaks])  # whole process, all of it included
    if kind == "gpt2np":
        R = len(gpt2np.lens.select_rows(model.config.n_layer, sublayers=sublayers))
        # the products the lens makes: one [T, D] @ [D, V] per row (the input and last rows' are also the
        # KL anchors', made once) and, per chunk, p @ W for the two anchors ([C, V] @ [V, D] each)
        out["rows"] = R
        out["flop"] = 2 * T * D * V * (R + 2)
        out["gflops"] = out["flop"] / out["seconds"] / 1e9
        out["matmul_seconds"] = statistics.median(products)
        out["matmul_gflops"] = 2 * CHUNK * D * V / out["matmul_seconds"] / 1e9
    return out


def _torch_lens(path: str, ids, sublayers: bool):
    import torch
    from transformers import GPT2LMHeadModel

    if sublayers:
        raise SystemExit("the torch lens has no sub-rows (transformers returns no resid_mid without hooks)")
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.as_tensor(ids)[None]
    with torch.inference_mode():
        hs = hf(x, output_hidden_states=True).hidden_states  # L+1 x [1, T, D]; the last is ln_f'd
    W = hf.lm_head.weight  # [V, D] (tied to wte)
    tok = torch.as_tensor(ids)
    nxt = torch.cat([tok[1:], tok[:1]])

    @torch.inference_mode()
    def run():
        ln = hf.transformer.ln_f
        h = torch.stack([ln(h[0]) for h in hs[:-1]] + [hs[-1][0]])  # [R, T, D]
        logits = h @ W.T  # [R, T, V]
        logp = logits.log_softmax(-1)
        lp_final, lp_input = logp[-1], logp[0]
        kl_final = (lp_final.exp() * (lp_final - logp)).sum(-1)
        kl_input = (lp_input.exp() * (lp_input - logp)).sum(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        final_top = logits[-1].argmax(-1)

        def rank(t):
            target = logits.gather(-1, t.expand(logits.shape[0], -1)[..., None])
            return (logits > target).sum(-1) + 1

        top = logits.topk(5, dim=-1)
        next_lp = logp.gather(-1, nxt.expand(logp.shape[0], -1)[..., None])[..., 0]
        return (kl_final, kl_input, entropy, rank(final_top), rank(tok), rank(nxt), top.values, top.indices,
                next_lp.exp(), -next_lp)

    return run


def bench_lens(path, T: int = 1024, repeats: int = 3, sublayers: bool = False, torch: bool = True) -> dict:
    """Run the lens benchmarks in fresh processes; return medians, extra memory and ratios."""
    kinds = ["gpt2np"] + (["torch"] if torch and not sublayers else [])
    res = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--worker", kind, str(path), "--seq", str(T), "--repeats", str(repeats)]
        if sublayers:
            cmd.append("--sublayers")
        res[kind] = run_json(cmd, f"the {kind} lens worker")
    g = res["gpt2np"]
    res["matmul"] = {"seconds": g["matmul_seconds"], "gflops": g["matmul_gflops"]}  # timed in the same process
    g["matmul_fraction"] = g["gflops"] / g["matmul_gflops"]
    if "torch" in res:
        g["speedup_vs_torch"] = res["torch"]["seconds"] / g["seconds"]
        g["memory_fraction_of_torch"] = g["extra_bytes"] / max(res["torch"]["extra_bytes"], 1)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sublayers", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.path, a.seq, a.sublayers, a.repeats)))
        return
    res = bench_lens(a.path, a.seq, a.repeats, a.sublayers, not a.no_torch)
    g = res["gpt2np"]
    print(f"lens T={a.seq} rows={g['rows']} sublayers={a.sublayers}: {g['seconds']:.2f} s, "
          f"{g['gflops']:.0f} GFLOP/s = {g['matmul_fraction']:.0%} of NumPy's matmul "
          f"({res['matmul']['gflops']:.0f} GFLOP/s), extra memory {g['extra_bytes'] / 2**20:.0f} MiB")
    if "torch" in res:
        t = res["torch"]
        print(f"torch lens: {t['seconds']:.2f} s, extra memory {t['extra_bytes'] / 2**20:.0f} MiB -> gpt2np is "
              f"{g['speedup_vs_torch']:.2f}x faster with {g['memory_fraction_of_torch']:.1%} of its memory")
    if a.json:
        sys.path.insert(0, str(ROOT))
        from gpt2np.files import write_text  # a failed write leaves an older report whole

        write_text(a.json, json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
