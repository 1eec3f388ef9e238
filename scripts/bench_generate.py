#!/usr/bin/env python3
"""Tokens per second of greedy decoding: gpt2np's KV-cache ``generate`` against transformers' ``generate``.

Both run the same random checkpoint (gpt2's shape by default, written by make_checkpoint.py into a
temporary folder unless ``--path`` names one), the same 16-token prompt and the same number of new
tokens, greedy, float32, on the CPU. Each repeat times the two implementations one after the other
(alternating, so a busy machine slows both alike), after one warm-up run of each; the median is
reported. The time covers the whole call: prefill of the prompt and every step.

    python scripts/bench_generate.py                      # gpt2 shape, 64 new tokens, 3 repeats
    python scripts/bench_generate.py --path weights/gpt2 --out bench_generate.json

``bench_generate(path, n_new=64, repeats=3) -> dict`` is the function a larger benchmark calls.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from make_checkpoint import REAL_TOKENIZER, write_checkpoint  # noqa: E402

import gpt2np  # noqa: E402
from gpt2np.config import SIZES  # noqa: E402
from gpt2np.files import write_text  # noqa: E402

PROMPT_LEN = 16


def bench_generate(path, n_new: int = 64, repeats: int = 3) -> dict:
    """Time greedy generation of ``n_new`` tokens after a 16-token prompt with gpt2np and transformers.

    Parameters
    ----------
    path : folder of a GPT-2 checkpoint (config.json, model.safetensors, vocab.json, merges.txt)
    n_new : new tokens per run
    repeats : timed runs of each implementation (alternating, after one warm-up each)

    Returns
    -------
    dict with the shape, the settings, per-implementation ``seconds`` (every run), ``median_s`` and
    ``tokens_per_s``, the speed ratio, and whether both produced the same tokens.
    """
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = gpt2np.load(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(path), attn_implementation="eager",
                                                      dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly n_new tokens, like gpt2np
    hf.generation_config.pad_token_id = 0
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, PROMPT_LEN)
    ids_t = torch.as_tensor(ids)[None]
    mask = torch.ones_like(ids_t)

    def run_gpt2np(n):
        return model.generate(ids, n, temperature=0)

    def run_transformers(n):
        with torch.inference_mode():
            out = hf.generate(ids_t, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return out[0, PROMPT_LEN:].numpy()

    runs = {"gpt2np": run_gpt2np, "transformers": run_transformers}
    tokens = {name: fn(n_new) for name, fn in runs.items()}  # warm-up, and the tokens to compare
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(n_new)
            seconds[name].append(time.perf_counter() - t0)
    c = model.config
    result = {
        "benchmark": "generate", "checkpoint": str(path),
        "shape": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size},
        "prompt_tokens": PROMPT_LEN, "new_tokens": n_new, "repeats": repeats, "decoding": "greedy, float32, CPU",
        "torch_threads": torch.get_num_threads(),
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "same_tokens": bool(np.array_equal(tokens["gpt2np"], tokens["transformers"])),
    }
    for name, s in seconds.items():
        med = statistics.median(s)
        result[name] = {"seconds": s, "median_s": med, "tokens_per_s": n_new / med}
    result["speed_ratio_gpt2np_over_transformers"] = (result["gpt2np"]["tokens_per_s"]
                                                      / result["transformers"]["tokens_per_s"])
    return result


def table(r: dict) -> str:
    """The result as a small text table."""
    rows = [f"greedy generation, {r['prompt_tokens']}-token prompt + {r['new_tokens']} new tokens, "
            f"median of {r['repeats']} (shape L={r['shape']['n_layer']} D={r['shape']['n_embd']})",
            f"{'implementation':<14} {'median s':>9} {'tokens/s':>9} {'ms/token':>9}"]
    for name in ("gpt2np", "transformers"):
        x = r[name]
        rows.append(f"{name:<14} {x['median_s']:>9.3f} {x['tokens_per_s']:>9.1f} "
                    f"{1000 * x['median_s'] / r['new_tokens']:>9.1f}")
    rows.append(f"gpt2np / transformers speed: {r['speed_ratio_gpt2np_over_transformers']:.2f}x; "
                f"same tokens: {r['same_tokens']}")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, help="checkpoint folder (default: a random one of --shape, made here)")
    ap.add_argument("--shape", choices=sorted(SIZES), default="gpt2")
    ap.add_argument("--n-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench_generate.json"), help="where to write the JSON")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        path = a.path
        if path is None:
            tok = REAL_TOKENIZER if REAL_TOKENIZER.is_dir() else None
            path = write_checkpoint(Path(tmp) / f"random-{a.shape}", SIZES[a.shape], tokenizer_dir=tok)
        r = bench_generate(path, n_new=a.n_new, repeats=a.repeats)
        if a.path is None:
            r["checkpoint"] = f"random {a.shape}-shaped checkpoint (make_checkpoint.py, seed 0, temporary)"
    print(table(r))
    write_text(a.out, json.dumps(r, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
