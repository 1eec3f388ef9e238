#!/usr/bin/env python3
"""Speed and memory of gpt2np against transformers (PyTorch, CPU), measured in the same run.

Random checkpoints of gpt2 and gpt2-xl shape are written once in the official layout (with the
causal-mask buffers, no ``transformer.`` prefix) into ``bench-out/`` and reused. Both libraries load
them through their real loaders: ``gpt2np.load(folder)`` and
``GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()`` with transformers' default
attention (``sdpa``), run under ``torch.inference_mode()``, as a user would.

Each implementation runs in its own worker process (loaded once), so the libraries' thread pools
never compete. Measured (each a median over ``--repeats`` runs; the implementations alternate run
by run and the order flips every repeat, so a busy machine slows both alike; one warm-up run each):

* forward with every residual stream kept, T = 128 and 1024: ``Model.forward(ids)`` against
  ``hf(ids, output_hidden_states=True)``;
* loading: time and peak resident memory above the post-import baseline, each load in a fresh
  process (``VmHWM`` reset through ``/proc/self/clear_refs``), reported relative to the file size;
* the lens against a torch lens and their peak memory (``scripts/bench_lens.py``, each in fresh
  processes), and generation tokens/s (``scripts/bench_generate.py``).

    python scripts/bench.py                          # gpt2 and gpt2-xl, T = 128 and 1024
    python scripts/bench.py --quick                  # gpt2 only, 3 repeats
    python scripts/bench.py --shapes gpt2 --seq 1024 --repeats 9 --json bench-out/bench.json

The targets of issue 5 are printed as met / not met. Timings on a machine shared with other work
are noisy: compare the ratio (both sides slowed alike) rather than the absolute seconds.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from gpt2np.config import SIZES, Config  # noqa: E402
from gpt2np.files import replacing, write_text  # noqa: E402
from bench_lens import _reset_peak, _status_kib, run_json  # noqa: E402  (scripts/ is on the path)

OUT = ROOT / "bench-out"
ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GPT2NP_OFFLINE")
TARGETS = {  # issue 5
    "forward_ratio": 1.0,  # gpt2np / transformers time, gpt2 shape, T = 1024
    "load_peak_over_file": 1.2,  # gpt2np loading a gpt2-xl-shaped checkpoint
    "lens_speedup": 1.7,  # torch lens time / gpt2np lens time, gpt2 shape, T = 1024
    "lens_memory_fraction": 0.1,  # gpt2np lens peak / torch lens peak
    "lens_blas_efficiency": 0.85,  # of NumPy's own matrix-product throughput on the same shapes
    "xl_lens_gib": 24.0,  # gpt2-xl, T = 1024, full lens with sub-rows
}


# ---------------------------------------------------------------------------------------------
# The machine


def machine() -> dict:
    """CPU model, cores, memory, BLAS (and its threads), library versions, relevant environment."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        info["memory_gib"] = round(int(mem["MemTotal"].split()[0]) / 2**20, 1)
    except (OSError, KeyError):
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads", "architecture",
                                                "threading_layer", "filepath")} for p in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    transformers=transformers.__version__)
    except ImportError:
        pass
    info["env"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return info


def describe_machine(m: dict) -> str:
    blas = m["blas"] if isinstance(m["blas"], str) else "; ".join(
        f"{b['internal_api']} {b['version']} ({b.get('architecture') or b.get('threading_layer')}) "
        f"{b['num_threads']} threads" for b in m["blas"])
    env = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none set"
    return (f"machine: {m['cpu']}, {m.get('usable_cpus', m['logical_cpus'])} usable cores, "
            f"{m.get('memory_gib', '?')} GiB\n"
            f"threads: {blas}; torch {m.get('torch_threads', '?')} threads\n"
            f"versions: numpy {m['numpy']}, torch {m.get('torch', '-')}, transformers {m.get('transformers', '-')}, "
            f"python {m['python']}\nenvironment: {env}")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _std(name: str) -> tuple[float, float]:
    """(mean, std) of a random tensor, as scripts/make_checkpoint.py draws them (scale 1)."""
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return 1.0, 0.1
    if name == "wpe.weight":
        return 0.0, 0.01
    return 0.0, 0.02


def write_random_checkpoint(folder: Path, config: Config, seed: int = 0) -> Path:
    """Write a random GPT-2 in the official layout, one tensor at a time.

    The same files as ``make_checkpoint.write_checkpoint(folder, config)`` would write (same names,
    shapes, mask buffers, config.json, the real tokenizer for vocab 50257; different random draws),
    but streamed: ``write_checkpoint`` holds every tensor and a serialised copy in memory, about
    twice the file (13 GB for gpt2-xl); this holds one tensor. The header is parsed and checked by
    both loaders when the benchmark runs.
    """
    from make_checkpoint import write_tokenizer

    from gpt2np.weights import expected_shapes

    folder.mkdir(parents=True, exist_ok=True)
    shapes = expected_shapes(config)
    P = config.n_positions
    for i in range(config.n_layer):  # the official files store the causal mask of every block
        shapes[f"h.{i}.attn.bias"] = (1, 1, P, P)
        shapes[f"h.{i}.attn.masked_bias"] = ()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(shapes):
        n = 4 * int(np.prod(shapes[name], dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    rng = np.random.default_rng(seed)
    write_text(folder / "config.json", json.dumps(config.to_json(), indent=2) + "\n")
    write_tokenizer(folder, config.vocab_size)
    # model.safetensors last, renamed into place once complete: a folder holding it is complete
    with replacing(folder / "model.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in sorted(shapes):
            if name.endswith(".attn.bias"):
                t = np.tril(np.ones((P, P), np.float32))
            elif name.endswith(".attn.masked_bias"):
                t = np.array(-1e4, np.float32)
            else:
                mean, std = _std(name)
                t = rng.standard_normal(shapes[name], dtype=np.float32)
                t *= np.float32(std)
                t += np.float32(mean)
            f.write(memoryview(np.ascontiguousarray(t)).cast("B"))
            del t
    return folder


def checkpoint(shape: str, out: Path = OUT) -> Path:
    """``bench-out/random-<shape>/``, written if missing (reused otherwise)."""
    folder = out / f"random-{shape}"
    files = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
    if all((folder / f).is_file() for f in files):
        return folder
    print(f"writing a random {shape}-shaped checkpoint into {folder} ...", flush=True)
    t0 = time.perf_counter()
    write_random_checkpoint(folder, SIZES[shape])
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


# ---------------------------------------------------------------------------------------------
# Timing helpers


def summary(seconds: dict[str, list[float]]) -> dict:
    return {n: {"median_s": statistics.median(s), "min_s": min(s), "seconds": s} for n, s in seconds.items()}


# ---------------------------------------------------------------------------------------------
# Forward pass


def _prepare(impl: str, folder: str):
    """In a worker process: load ``impl``'s model; return ``job(task, T) -> (run, logits_of)``.

    ``run()`` is the timed call; ``logits_of(output)`` its final logits ``[T, V]`` as NumPy.
    """
    ids_of = lambda T, V: np.random.default_rng(T).integers(0, V, T)  # the same tokens in every process
    if impl in ("gpt2np", "gpt2np_plain"):
        import gpt2np
        from gpt2np import model as plain

        m = gpt2np.load(folder)

        def job(task: str, T: int):
            ids = ids_of(T, m.config.vocab_size)
            if task == "forward":  # Model.forward: the fast path for NumPy; or the plain teaching path
                run = (lambda: plain.forward(m.params, m.config, ids)) if impl == "gpt2np_plain" else (
                    lambda: m.forward(ids))
                return run, lambda out: out.logits
            raise ValueError(f"unknown task {task!r}")
        return job
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()  # sdpa attention

    def job(task: str, T: int):
        ids = torch.as_tensor(ids_of(T, hf.config.vocab_size))[None]
        if task == "forward":
            def run():
                with torch.inference_mode():
                    return hf(ids, output_hidden_states=True)
            return run, lambda out: out.logits[0].numpy()
        raise ValueError(f"unknown task {task!r}")
    return job


def worker_main(impl: str, folder: str) -> None:
    """A worker process: load once, then answer one JSON request per line on stdin.

    Request ``{"task": "forward", "T": 1024, "logits": false}``; reply ``{"seconds": ...}`` (and the
    last row of the logits when asked, to check that the implementations agree).
    """
    job = _prepare(impl, folder)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        run, logits_of = job(req["task"], req["T"])
        gc.collect()
        t0 = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - t0
        reply = {"seconds": seconds}
        if req.get("logits"):
            reply["last_logits"] = np.asarray(logits_of(out)[-1], np.float64).tolist()
        del out
        print(json.dumps(reply), flush=True)


class Worker:
    """One implementation in its own process, so that the libraries' thread pools, allocators and
    caches never meet: each is measured as a user running only it would see it."""

    def __init__(self, impl: str, folder: Path):
        self.impl = impl
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", impl, str(folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.impl} worker process died (exit code {self.proc.wait()}); "
                               "its error is printed above")
        return json.loads(line)

    def __call__(self, task: str, T: int, logits: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"task": task, "T": T, "logits": logits}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def alternate(workers: dict[str, Worker], task: str, T: int, repeats: int, pause: float = 0.2) -> dict:
    """Time ``task`` at T in every worker ``repeats`` times, alternating workers and flipping the
    order every repeat, after one warm-up run each (which also returns the logits to compare)."""
    names = list(workers)
    warm = {n: workers[n](task, T, logits=True) for n in names}
    seconds = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            time.sleep(pause)  # let the other process's threads go idle
            seconds[n].append(workers[n](task, T)["seconds"])
    ref = np.asarray(warm["transformers"]["last_logits"])
    diffs = {n: float(np.abs(np.asarray(w["last_logits"]) - ref).max() / np.abs(ref).max())
             for n, w in warm.items() if n != "transformers"}
    return {"seconds": seconds, "logits_rel_diff": diffs}


def bench_forward(folder: Path, seq: list[int], repeats: int, plain: bool = False) -> list[dict]:
    """Forward with every residual stream kept: gpt2np ``Model.forward`` vs ``output_hidden_states``."""
    impls = ["gpt2np", "transformers"] + (["gpt2np_plain"] if plain else [])
    workers = {impl: Worker(impl, folder) for impl in impls}
    results = []
    try:
        for T in seq:
            a = alternate(workers, "forward", T, repeats)
            r = summary(a["seconds"])
            r = {"T": T, "repeats": repeats, "logits_max_rel_diff": a["logits_rel_diff"]["gpt2np"], **r,
                 "ratio": r["gpt2np"]["median_s"] / r["transformers"]["median_s"]}
            if plain:
                r["ratio_plain"] = r["gpt2np_plain"]["median_s"] / r["transformers"]["median_s"]
            results.append(r)
            print(f"  T={T}: gpt2np {r['gpt2np']['median_s']:.3f} s, transformers "
                  f"{r['transformers']['median_s']:.3f} s, ratio {r['ratio']:.2f}", flush=True)
    finally:
        for w in workers.values():
            w.close()
    return results


# ---------------------------------------------------------------------------------------------
# Loading, each in a fresh process


def load_child(impl: str, folder: str) -> dict:
    """Runs in a fresh process: import, note the resident memory, load, note the peak since then;
    then run one single-token forward pass and note the time and peak again.

    The second figure matters for transformers: it memory-maps model.safetensors, so its load
    returns before reading the weights, which are read from the file at first use.
    """
    if impl == "gpt2np":
        import gpt2np

        def load():
            return gpt2np.load(folder)

        def first_forward(m):
            return m.forward(np.zeros(1, np.int64))
    else:
        import torch
        import transformers
        from transformers import GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()

        def load():
            return GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()

        def first_forward(m):
            with torch.inference_mode():
                return m(torch.zeros((1, 1), dtype=torch.int64), output_hidden_states=True)
    gc.collect()
    reset = _reset_peak()  # VmHWM := the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    m = load()
    seconds = time.perf_counter() - t0
    peak, after = _status_kib("VmHWM"), _status_kib("VmRSS")
    first_forward(m)
    first = time.perf_counter() - t0
    first_peak = _status_kib("VmHWM")
    del m
    return {"seconds": seconds, "rss_before_kib": before, "peak_kib": peak, "rss_after_kib": after,
            "first_forward_seconds": first, "first_forward_peak_kib": first_peak, "peak_reset": reset}


def bench_load(folder: Path, repeats: int) -> dict:
    """Load time and peak memory of each implementation, every load in a fresh process."""
    size = (folder / "model.safetensors").stat().st_size
    with open(folder / "model.safetensors", "rb") as f:  # page cache warm for both
        while f.read(1 << 26):
            pass

    def child(impl):
        return run_json([sys.executable, __file__, "--load-child", impl, str(folder)], f"loading {folder} with {impl}")

    runs = {impl: [] for impl in ("gpt2np", "transformers")}
    for r in range(repeats):
        for impl in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            runs[impl].append(child(impl))
    result = {"file_bytes": size, "repeats": repeats}
    for impl, rs in runs.items():
        peak = [1024 * (x["peak_kib"] - x["rss_before_kib"]) for x in rs]
        result[impl] = {
            "median_s": statistics.median(x["seconds"] for x in rs), "seconds": [x["seconds"] for x in rs],
            "peak_bytes": max(peak), "peak_over_file": max(peak) / size,
            "resident_after_bytes": statistics.median(1024 * (x["rss_after_kib"] - x["rss_before_kib"]) for x in rs),
            "with_first_forward_median_s": statistics.median(x["first_forward_seconds"] for x in rs),
            "with_first_forward_peak_bytes": max(1024 * (x["first_forward_peak_kib"] - x["rss_before_kib"])
                                                 for x in rs),
            "peak_is_since_load": all(x["peak_reset"] for x in rs),
        }
    result["time_ratio"] = result["gpt2np"]["median_s"] / result["transformers"]["median_s"]
    return result


# ---------------------------------------------------------------------------------------------
# The lens (scripts/bench_lens.py) and generation (scripts/bench_generate.py)


def bench_lens(folder: Path, T: int, repeats: int) -> dict:
    """gpt2np's complete lens (every quantity of every view) against a straightforward torch lens
    (scripts/bench_lens.py: ln_f and the unembedding on every stacked hidden state, log_softmax, KL,
    ranks, top-k) at T, each in a fresh process; time, extra memory above the forward pass, and the
    fraction of NumPy's own matrix-product throughput on the lens's shapes."""
    from bench_lens import bench_lens as run

    print(f"{folder.name}: lens T={T} (gpt2np, torch lens, NumPy matmul) ...", flush=True)
    res = run(folder, T, repeats, sublayers=False, torch=True)
    g, t = res["gpt2np"], res["torch"]
    return {"gpt2np_s": g["seconds"], "torch_s": t["seconds"], "speedup": g["speedup_vs_torch"],
            "gpt2np_extra_mib": g["extra_bytes"] / 2**20, "torch_extra_mib": t["extra_bytes"] / 2**20,
            "memory_fraction": g["memory_fraction_of_torch"], "gflops": g["gflops"],
            "numpy_matmul_gflops": res["matmul"]["gflops"], "blas_efficiency": g["matmul_fraction"]}


def bench_lens_memory(folder: Path, T: int) -> dict:
    """The full lens with sub-rows at T (gpt2np only; the torch lens has no sub-rows): time, extra
    memory above the forward pass, and the whole process's peak (weights, trace and lens)."""
    from bench_lens import bench_lens as run

    print(f"{folder.name}: lens with sub-rows T={T} ...", flush=True)
    res = run(folder, T, 1, sublayers=True, torch=False)
    g = res["gpt2np"]
    return {"rows": g["rows"], "seconds": g["seconds"], "extra_mib": g["extra_bytes"] / 2**20,
            "peak_gib": g["peak_bytes"] / 2**30, "gflops": g["gflops"], "blas_efficiency": g["matmul_fraction"]}


def bench_generation(folder: Path, n_new: int, repeats: int) -> dict:
    """Tokens/s of greedy decoding (scripts/bench_generate.bench_generate)."""
    from bench_generate import bench_generate

    return bench_generate(folder, n_new=n_new, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# Report


def targets(results: dict) -> list[dict]:
    """Each target of issue 5 with its measured value and met / not met / not measured."""
    out = []

    def add(name, value, limit, met, fmt):
        out.append({"target": name, "value": value, "limit": limit,
                    "status": "not measured" if value is None else ("met" if met else "not met"),
                    "text": fmt})

    fwd = next((r for r in results.get("forward", {}).get("gpt2", []) if r["T"] == 1024), None)
    v = fwd and fwd["ratio"]
    add("forward T=1024 gpt2: gpt2np / transformers time", v, TARGETS["forward_ratio"],
        v is not None and v <= TARGETS["forward_ratio"], "<= {limit}")
    load = results.get("load", {}).get("gpt2-xl")
    v = load and load["gpt2np"]["peak_over_file"]
    add("loading gpt2-xl: gpt2np peak memory / file size", v, TARGETS["load_peak_over_file"],
        v is not None and v < TARGETS["load_peak_over_file"], "< {limit}")
    lens = results.get("lens", {}).get("gpt2") or {}
    v = lens.get("speedup")
    add("lens T=1024 gpt2: torch lens time / gpt2np lens time", v, TARGETS["lens_speedup"],
        v is not None and v >= TARGETS["lens_speedup"], ">= {limit}")
    v = lens.get("memory_fraction")
    add("lens T=1024 gpt2: gpt2np peak / torch lens peak", v, TARGETS["lens_memory_fraction"],
        v is not None and v <= TARGETS["lens_memory_fraction"], "<= {limit}")
    v = lens.get("blas_efficiency")
    add("lens T=1024 gpt2: fraction of NumPy matmul throughput", v, TARGETS["lens_blas_efficiency"],
        v is not None and v >= TARGETS["lens_blas_efficiency"], ">= {limit}")
    v = (results.get("lens_memory", {}).get("gpt2-xl") or {}).get("peak_gib")
    add("lens T=1024 gpt2-xl with sub-rows: peak GiB", v, TARGETS["xl_lens_gib"],
        v is not None and v <= TARGETS["xl_lens_gib"], "<= {limit}")
    return out


def report(results: dict) -> str:
    lines = [describe_machine(results["machine"]), ""]
    fwd = results.get("forward", {})
    if fwd:
        plain = any("gpt2np_plain" in r for rs in fwd.values() for r in rs)
        lines.append("forward, every residual stream kept (median seconds; transformers: sdpa attention, "
                     "output_hidden_states=True)")
        head = f"{'shape':<9}{'T':>6}{'gpt2np':>10}{'transformers':>14}{'ratio':>8}"
        lines.append(head + (f"{'plain':>10}{'ratio':>8}" if plain else "") + f"{'logits rel diff':>17}")
        for shape, rs in fwd.items():
            for r in rs:
                row = (f"{shape:<9}{r['T']:>6}{r['gpt2np']['median_s']:>10.3f}{r['transformers']['median_s']:>14.3f}"
                       f"{r['ratio']:>8.2f}")
                if plain:
                    row += f"{r['gpt2np_plain']['median_s']:>10.3f}{r['ratio_plain']:>8.2f}"
                lines.append(row + f"{r['logits_max_rel_diff']:>17.1e}")
        lines.append("")
    load = results.get("load", {})
    if load:
        lines.append("loading, each in a fresh process (median seconds; peak resident memory above the "
                     "post-import baseline, worst run;\n  '+ 1st forward': load and one single-token forward "
                     "pass, which is when transformers reads its memory-mapped weights)")
        lines.append(f"{'shape':<9}{'file GB':>9}{'impl':>14}{'seconds':>9}{'peak GB':>9}{'peak/file':>11}"
                     f"{'+ 1st forward s':>17}{'peak GB':>9}")
        for shape, r in load.items():
            for impl in ("gpt2np", "transformers"):
                x = r[impl]
                lines.append(f"{shape:<9}{r['file_bytes'] / 1e9:>9.2f}{impl:>14}{x['median_s']:>9.2f}"
                             f"{x['peak_bytes'] / 1e9:>9.2f}{x['peak_over_file']:>11.2f}"
                             f"{x['with_first_forward_median_s']:>17.2f}{x['with_first_forward_peak_bytes'] / 1e9:>9.2f}")
        lines.append("")
    for shape, x in results.get("lens", {}).items():
        lines.append(f"lens T=1024 {shape} (all quantities, 13 rows): gpt2np {x['gpt2np_s']:.2f} s, torch lens "
                     f"{x['torch_s']:.2f} s, ratio {x['speedup']:.2f}x; extra memory {x['gpt2np_extra_mib']:.0f} MiB "
                     f"vs {x['torch_extra_mib']:.0f} MiB; {x['gflops']:.0f} GFLOP/s = {x['blas_efficiency']:.0%} "
                     f"of NumPy's matmul ({x['numpy_matmul_gflops']:.0f} GFLOP/s)")
    for shape, x in results.get("lens_memory", {}).items():
        lines.append(f"lens T=1024 {shape} with sub-rows ({x['rows']} rows): {x['seconds']:.1f} s, "
                     f"{x['gflops']:.0f} GFLOP/s = {x['blas_efficiency']:.0%} of NumPy's matmul, extra memory "
                     f"{x['extra_mib']:.0f} MiB, process peak {x['peak_gib']:.2f} GiB")
    if results.get("lens") or results.get("lens_memory"):
        lines.append("")
    gen = results.get("generation")
    if gen:
        lines.append(f"generation (greedy, {gen['prompt_tokens']}-token prompt + {gen['new_tokens']} new): "
                     f"gpt2np {gen['gpt2np']['tokens_per_s']:.1f} tokens/s, transformers "
                     f"{gen['transformers']['tokens_per_s']:.1f} tokens/s")
        lines.append("")
    lines.append("targets (issue 5)")
    for t in results["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        lines.append(f"  [{t['status']:^12}] {t['target']}: {value} (target {t['text'].format(limit=t['limit'])})")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="gpt2,gpt2-xl", help="comma-separated sizes (default gpt2,gpt2-xl)")
    ap.add_argument("--seq", default="128,1024", help="comma-separated sequence lengths for the forward pass")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (default 5)")
    ap.add_argument("--load-repeats", type=int, default=3, help="fresh-process loads per implementation")
    ap.add_argument("--quick", action="store_true", help="gpt2 shape only, 3 repeats")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: forward,load,lens,generation")
    ap.add_argument("--plain", action="store_true", help="also time gpt2np's plain (teaching) forward pass")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for the random checkpoints (default bench-out/)")
    ap.add_argument("--json", type=Path, help="write every figure to this JSON file")
    ap.add_argument("--load-child", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.load_child:
        print(json.dumps(load_child(*a.load_child)))
        return
    if a.worker:
        worker_main(*a.worker)
        return
    shapes = ["gpt2"] if a.quick else [s for s in a.shapes.split(",") if s]
    for s in shapes:
        if s not in SIZES:
            ap.error(f"unknown shape {s!r}: choose from {', '.join(SIZES)}")
    seq = [int(t) for t in a.seq.split(",") if t]
    repeats = 3 if a.quick else a.repeats
    load_repeats = 2 if a.quick else a.load_repeats
    skip = set(a.skip.split(",")) - {""}

    results = {"machine": machine(), "settings": {"shapes": shapes, "seq": seq, "repeats": repeats,
                                                  "load_repeats": load_repeats,
                                                  "transformers_attention": "sdpa (the default)"},
               "forward": {}, "load": {}, "lens": {}, "lens_memory": {}, "generation": None}
    print(describe_machine(results["machine"]), flush=True)
    for shape in shapes:
        folder = checkpoint(shape, a.out)
        if "load" not in skip:
            print(f"{shape}: loading ({load_repeats} fresh processes each) ...", flush=True)
            results["load"][shape] = bench_load(folder, load_repeats)
        if "forward" not in skip:
            print(f"{shape}: forward ...", flush=True)
            results["forward"][shape] = bench_forward(folder, seq, repeats, plain=a.plain)
        if "lens" not in skip:
            if shape == "gpt2":  # the torch lens at gpt2-xl shape would need over 30 GB: not on this machine
                results["lens"][shape] = bench_lens(folder, 1024, repeats)
            results["lens_memory"][shape] = bench_lens_memory(folder, 1024)
    if "generation" not in skip and "gpt2" in shapes:
        print("gpt2: generation ...", flush=True)
        results["generation"] = bench_generation(checkpoint("gpt2", a.out), 64, repeats)
    results["targets"] = targets(results)
    print()
    print(report(results))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(a.json, json.dumps(results, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
