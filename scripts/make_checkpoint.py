#!/usr/bin/env python3
"""Write a random GPT-2 checkpoint of any shape, in the official layout or today's transformers layout.

The real weights cannot be fetched everywhere (not in CI, not offline), so tests and benchmarks
build their own checkpoints. Tensors are written with ``safetensors.numpy`` (independent of gpt2np's
reader); the tokenizer files are either copied from a folder (e.g. GPT-2's real vocab.json and
merges.txt for vocab_size 50257) or a small byte-level BPE vocabulary built here.

    python scripts/make_checkpoint.py weights/random-gpt2 --shape gpt2
    python scripts/make_checkpoint.py /tmp/tiny --layers 2 --heads 3 --embd 48 --vocab 400 --positions 64
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpt2np.config import SIZES, Config  # noqa: E402
from gpt2np.files import replacing, write_text  # noqa: E402  (a failed write never destroys an older file)
from gpt2np.tokenizer import EOT, byte_to_unicode  # noqa: E402

REAL_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
SAMPLE = ("Sometimes, when people say plasma, they mean a state of matter. Other times, when people say plasma "
          "they mean blood. We train GPT-3, an autoregressive language model with 175 billion parameters, "
          "and test its performance in the few-shot setting. The logit lens reads the residual stream. ")


def random_params(config: Config, seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Official-layout tensors (no prefix, no buffers), float32. ``scale`` > 1 gives GPT-2-like
    magnitudes: larger embeddings and output projections, so residuals grow through the blocks."""
    rng = np.random.default_rng(seed)
    D, F, V, P = config.n_embd, config.d_mlp, config.vocab_size, config.n_positions

    def normal(shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    t = {"wte.weight": normal((V, D), 0.02 * scale), "wpe.weight": normal((P, D), 0.01 * scale),
         "ln_f.weight": 1 + normal((D,), 0.1), "ln_f.bias": normal((D,), 0.02)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        t |= {h + "ln_1.weight": 1 + normal((D,), 0.1), h + "ln_1.bias": normal((D,), 0.02),
              h + "attn.c_attn.weight": normal((D, 3 * D), 0.02 * max(1.0, scale ** 0.5)),
              h + "attn.c_attn.bias": normal((3 * D,), 0.02),
              h + "attn.c_proj.weight": normal((D, D), 0.02 * scale), h + "attn.c_proj.bias": normal((D,), 0.02),
              h + "ln_2.weight": 1 + normal((D,), 0.1), h + "ln_2.bias": normal((D,), 0.02),
              h + "mlp.c_fc.weight": normal((D, F), 0.02), h + "mlp.c_fc.bias": normal((F,), 0.02),
              h + "mlp.c_proj.weight": normal((F, D), 0.02 * scale), h + "mlp.c_proj.bias": normal((D,), 0.02)}
    return t


def bpe_files(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """A valid GPT-2-style byte-level BPE: 256 byte tokens, vocab_size - 257 merges, then <|endoftext|>.

    Merges join two single-byte tokens, most frequent pairs of a sample text first; ids follow the
    merge order, as in GPT-2.
    """
    if vocab_size < 257:
        raise ValueError("vocab_size must be at least 257 (256 bytes and <|endoftext|>)")
    b2u = byte_to_unicode()
    vocab = {c: i for i, c in enumerate(b2u.values())}
    words = [(" " + w).encode() for w in SAMPLE.split()] + [w.encode() for w in SAMPLE.split()]
    counts = Counter(p for w in words for p in zip(w, w[1:]))
    pairs = [p for p, _ in counts.most_common()]
    seen = set(pairs)
    order = sorted(range(256), key=lambda b: (not chr(b).isalpha(), b))  # letters first
    pairs += [(a, b) for a in order for b in order if (a, b) not in seen]
    merges = []
    for a, b in pairs[:vocab_size - 257]:
        merges.append(f"{b2u[a]} {b2u[b]}")
        vocab[b2u[a] + b2u[b]] = len(vocab)
    if len(merges) < vocab_size - 257:
        raise ValueError(f"vocab_size {vocab_size} is larger than this simple BPE builder supports")
    vocab[EOT] = len(vocab)
    return vocab, merges


def write_tokenizer(folder: Path, vocab_size: int, tokenizer_dir: Path | None = None) -> None:
    if tokenizer_dir is None and vocab_size == 50257 and REAL_TOKENIZER.is_dir():
        tokenizer_dir = REAL_TOKENIZER
    if tokenizer_dir is not None:
        for f in ("vocab.json", "merges.txt"):
            with replacing(folder / f) as tmp:
                shutil.copyfile(Path(tokenizer_dir) / f, tmp)
        return
    vocab, merges = bpe_files(vocab_size)
    write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")


def write_checkpoint(folder: str | Path, config: Config, *, layout: str = "official", seed: int = 0,
                     scale: float = 1.0, tokenizer_dir: str | Path | None = None, untied_head: bool = False) -> Path:
    """Write config.json, model.safetensors, vocab.json and merges.txt for a random GPT-2.

    layout "official": names without prefix, causal-mask buffers h.{i}.attn.bias [1, 1, P, P] and
    h.{i}.attn.masked_bias stored, no lm_head, config.json with n_ctx.
    layout "hf": what ``GPT2LMHeadModel.save_pretrained`` writes today: "transformer." prefix, no
    buffers, no n_ctx. ``untied_head`` adds a separate random lm_head.weight (hf layout only).
    """
    if layout not in ("official", "hf"):
        raise ValueError("layout must be 'official' or 'hf'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_params(config, seed, scale)
    cfg = config.to_json()
    if layout == "official":
        P = config.n_positions
        mask = np.tril(np.ones((P, P), np.float32))[None, None]
        for i in range(config.n_layer):
            tensors[f"h.{i}.attn.bias"] = mask
            tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    else:
        tensors = {"transformer." + k: v for k, v in tensors.items()}
        if untied_head:
            rng = np.random.default_rng(seed + 1)
            tensors["lm_head.weight"] = (rng.standard_normal((config.vocab_size, config.n_embd), dtype=np.float32)
                                         * np.float32(0.02))
            cfg["tie_word_embeddings"] = False
        del cfg["n_ctx"]
    with replacing(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    del tensors
    write_text(folder / "config.json", json.dumps(cfg, indent=2) + "\n")
    write_tokenizer(folder, config.vocab_size, tokenizer_dir and Path(tokenizer_dir))
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--shape", choices=sorted(SIZES), help="copy the shape of an official checkpoint")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--positions", type=int, default=128)
    ap.add_argument("--layout", choices=("official", "hf"), default="official")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="larger values give GPT-2-like magnitudes")
    ap.add_argument("--tokenizer", type=Path, help="folder with vocab.json and merges.txt to copy")
    a = ap.parse_args(argv)
    config = SIZES[a.shape] if a.shape else Config(a.layers, a.heads, a.embd, a.positions, a.vocab)
    out = write_checkpoint(a.folder, config, layout=a.layout, seed=a.seed, scale=a.scale, tokenizer_dir=a.tokenizer)
    print(f"wrote {out} ({config.n_params:,} parameters, {a.layout} layout)")


if __name__ == "__main__":
    main()
