#!/usr/bin/env python3
"""The GPU figures: forward pass and full logit lens at gpt2-xl shape on CuPy, against CuPy's own product.

Run through ``scripts/gpu_check.sh`` (which installs CuPy and runs the GPU tests first). Writes one JSON:
the card, CuPy and CUDA versions, the forward pass's time, the lens's time and achieved FLOP/s, and the
FLOP/s of CuPy's float32 ``[chunk, D] @ [D, V]`` product on the same arrays, timed in the same process.
The checkpoint has random weights of the real shape (the real weights are not needed for speed).

    python scripts/gpu_check.py --out bench-out/gpu_check.json
    python scripts/gpu_check.py --shape tiny --device cpu --out /tmp/x.json   # a dry run of this script
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

import gpt2np  # noqa: E402
from gpt2np import backend  # noqa: E402
from gpt2np.config import SIZES, Config  # noqa: E402
from gpt2np.files import write_text  # noqa: E402
from make_checkpoint import write_checkpoint  # noqa: E402

TINY = Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=512)


def timed(fn, sync, repeats: int) -> list[float]:
    """Seconds of ``fn()`` each time, the device synchronised before and after."""
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def card(xp) -> dict:
    """The GPU's name, memory and the CUDA/CuPy versions (empty on the CPU)."""
    if xp is np:
        return {"name": platform.processor() or platform.machine(), "device": "cpu"}
    dev = xp.cuda.Device()
    props = xp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"name": name, "device": "gpu", "memory_bytes": int(props["totalGlobalMem"]),
            "compute_capability": dev.compute_capability, "cupy": xp.__version__,
            "cuda_runtime": xp.cuda.runtime.runtimeGetVersion(), "cuda_driver": xp.cuda.runtime.driverGetVersion()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-xl", choices=[*SIZES, "tiny"])
    ap.add_argument("--T", type=int, default=1024, help="positions (at most the context)")
    ap.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, help="an existing checkpoint folder (default: a random one in a temp folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "gpu_check.json")
    args = ap.parse_args(argv)
    config = TINY if args.shape == "tiny" else SIZES[args.shape]
    T = min(args.T, config.n_positions)
    xp = backend.device_namespace(args.device)
    sync = (lambda: xp.cuda.Stream.null.synchronize()) if xp is not np else (lambda: None)
    report = {"card": card(xp), "shape": args.shape, "T": T, "repeats": args.repeats,
              "numpy": np.__version__, "python": platform.python_version()}

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        if folder is None:
            t = time.perf_counter()
            folder = Path(tmp) / args.shape
            write_checkpoint(folder, config, scale=4.0)
            report["write_checkpoint_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        model = gpt2np.load(folder, device=args.device)
        sync()
        report["load_seconds"] = time.perf_counter() - t
        cfg = model.config
        D, V = cfg.n_embd, cfg.vocab_size
        ids = np.random.default_rng(0).integers(0, V, T)

        model.forward(ids)  # warm-up: CuPy compiles its kernels on first use
        fwd = timed(lambda: model.forward(ids), sync, args.repeats)
        report["forward"] = {"seconds": statistics.median(fwd), "times": fwd}

        for sublayers in (False, True):
            trace = model.forward(ids, sublayers=sublayers)
            checks = gpt2np.self_check(model, trace)
            gpt2np.logit_lens(model, trace, sublayers=sublayers)  # warm-up
            times = timed(lambda: gpt2np.logit_lens(model, trace, sublayers=sublayers), sync, args.repeats)
            R = len(gpt2np.lens.select_rows(cfg.n_layer, sublayers=sublayers))
            # one [T, D] @ [D, V] product per row, and the two anchors' p @ W ([T, V] @ [V, D] each)
            flop = 2 * T * D * V * (R + 2)
            s = statistics.median(times)
            report["lens_sublayers" if sublayers else "lens"] = {
                "rows": R, "seconds": s, "times": times, "flop": flop, "tflops": flop / s / 1e12,
                "self_check": checks}
            del trace

        # CuPy's (or NumPy's) own product on the lens's shapes, timed in the same process
        chunk = min(gpt2np.lens.CHUNK, T)
        x = xp.asarray(np.random.default_rng(1).standard_normal((chunk, D), dtype=np.float32))
        WT = xp.permute_dims(model.params.unembed, (1, 0))
        x @ WT
        prod = timed(lambda: x @ WT, sync, 10)
        s = statistics.median(prod)
        report["matmul"] = {"shape": [chunk, D, V], "seconds": s, "tflops": 2 * chunk * D * V / s / 1e12}
        for key in ("lens", "lens_sublayers"):
            report[key]["fraction_of_matmul"] = report[key]["tflops"] / report["matmul"]["tflops"]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(report, indent=2))  # written beside, then renamed: an older report stays whole
    c = report["card"]
    print(f"{c['name']}: {args.shape}, T = {T}: forward {report['forward']['seconds']:.3f} s; "
          f"lens {report['lens']['seconds']:.3f} s ({report['lens']['tflops']:.1f} TFLOP/s, "
          f"{report['lens']['fraction_of_matmul']:.0%} of the product's {report['matmul']['tflops']:.1f}); "
          f"with sub-rows {report['lens_sublayers']['seconds']:.3f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
