"""Checkpoints: find or download a GPT-2 folder, and read its ``model.safetensors`` into NumPy.

A checkpoint folder holds ``config.json``, ``model.safetensors``, ``vocab.json`` and ``merges.txt``.
Two tensor layouts are accepted (see ``shared/reference/gpt2-facts.md``): the official one
(``wte.weight``, ``h.0.attn.c_attn.weight``, causal-mask buffers ``h.*.attn.bias`` stored) and the
one ``GPT2LMHeadModel.save_pretrained`` writes (every name prefixed ``transformer.``, no buffers).

The reader parses the safetensors header itself and reads each tensor straight into its final
NumPy array with ``readinto``: no intermediate copy, so loading peaks at about one copy of the weights.
(The file is not memory-mapped: the official files' data starts at an odd offset, and matrix products
on misaligned float32 views ran 30% slower.) Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .backend import usable_cores
from .config import SIZES, Config

FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
HUB_PREFIX = "openai-community/"
WEIGHTS_ENV = "GPT2NP_WEIGHTS"
OFFLINE_ENV = "GPT2NP_OFFLINE"
# Pin a revision with GPT2NP_REVISION (a commit hash) for reproducible downloads; default: main.
REVISION_ENV = "GPT2NP_REVISION"


@dataclass(frozen=True)
class Block:
    """One transformer block, fields named after the checkpoint's ``h.{i}.<name>`` with dots as _.

    Weight matrices are stored ``[in, out]`` (Conv1D): ``y = x @ W + b``.
    """

    ln_1_weight: np.ndarray  # [D]
    ln_1_bias: np.ndarray  # [D]
    attn_c_attn_weight: np.ndarray  # [D, 3D], columns [q | k | v]
    attn_c_attn_bias: np.ndarray  # [3D]
    attn_c_proj_weight: np.ndarray  # [D, D]
    attn_c_proj_bias: np.ndarray  # [D]
    ln_2_weight: np.ndarray  # [D]
    ln_2_bias: np.ndarray  # [D]
    mlp_c_fc_weight: np.ndarray  # [D, F]
    mlp_c_fc_bias: np.ndarray  # [F]
    mlp_c_proj_weight: np.ndarray  # [F, D]
    mlp_c_proj_bias: np.ndarray  # [D]


@dataclass(frozen=True)
class Params:
    """All parameters of a GPT-2. ``lm_head_weight`` is None when the head is tied to ``wte``."""

    wte: np.ndarray  # [V, D] token embedding, also the unembedding
    wpe: np.ndarray  # [n_positions, D] position embedding
    h: tuple[Block, ...]  # L blocks
    ln_f_weight: np.ndarray  # [D]
    ln_f_bias: np.ndarray  # [D]
    lm_head_weight: np.ndarray | None = None  # [V, D] only for untied checkpoints

    @property
    def unembed(self) -> np.ndarray:
        """[V, D] matrix whose transpose maps the final stream to logits."""
        return self.wte if self.lm_head_weight is None else self.lm_head_weight

    def map(self, fn) -> "Params":
        """Apply ``fn`` to every array (e.g. move to another device)."""
        blocks = tuple(Block(*(fn(getattr(b, f.name)) for f in fields(Block))) for b in self.h)
        head = None if self.lm_head_weight is None else fn(self.lm_head_weight)
        return Params(fn(self.wte), fn(self.wpe), blocks, fn(self.ln_f_weight), fn(self.ln_f_bias), head)


def expected_shapes(c: Config) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, official layout (no prefix, no buffers)."""
    D, F, V = c.n_embd, c.d_mlp, c.vocab_size
    shapes = {"wte.weight": (V, D), "wpe.weight": (c.n_positions, D), "ln_f.weight": (D,), "ln_f.bias": (D,)}
    per_block = {
        "ln_1.weight": (D,), "ln_1.bias": (D,),
        "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
        "ln_2.weight": (D,), "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
        "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
    }
    for i in range(c.n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in per_block.items()})
    return shapes


# ---------------------------------------------------------------------------------------------
# Finding and downloading checkpoints


def canonical_name(name: str) -> str | None:
    """'gpt2-xl' or 'openai-community/gpt2-xl' -> 'gpt2-xl'; anything else -> None."""
    short = name[len(HUB_PREFIX):] if name.startswith(HUB_PREFIX) else name
    return short if short in SIZES else None


def weights_dir(root: str | Path | None = None) -> Path:
    """Where named checkpoints live: the argument, else $GPT2NP_WEIGHTS, else ./weights."""
    return Path(root or os.environ.get(WEIGHTS_ENV) or "weights")


def missing_files(folder: Path) -> list[str]:
    return [f for f in FILES if not (folder / f).is_file()]


def resolve(name_or_path: str | Path, *, root: str | Path | None = None, offline: bool | None = None,
            download_missing: bool = True) -> Path:
    """Return the folder holding a complete checkpoint, downloading an official one if needed.

    Parameters
    ----------
    name_or_path : a folder with the four checkpoint files, or one of gpt2, gpt2-medium,
        gpt2-large, gpt2-xl (optionally prefixed ``openai-community/``).
    root : folder for named checkpoints (default ``$GPT2NP_WEIGHTS`` or ``./weights``).
    offline : never touch the network; a missing checkpoint is an immediate error.
        Default: True when the environment variable GPT2NP_OFFLINE is set to 1.
    """
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    path = Path(name_or_path).expanduser()
    name = canonical_name(str(name_or_path))
    if path.is_dir() and (name is None or not missing_files(path)):
        return _check_folder(path)
    if name is None:
        if path.exists():
            raise NotADirectoryError(f"{path} is a file; pass the folder that holds {', '.join(FILES)}")
        known = ", ".join(SIZES)
        raise FileNotFoundError(f"{str(name_or_path)!r} is neither a checkpoint folder nor a known model name "
                                f"({known}); check the spelling or pass a folder path")
    folder = weights_dir(root) / name
    if not missing_files(folder):
        return _check_folder(folder)
    if offline or not download_missing:
        raise FileNotFoundError(
            f"{name} is not in {folder} (missing {', '.join(missing_files(folder))}) and downloads are off; "
            f"run `gpt2np download {name}` where the Hugging Face hub is reachable, or pass a folder path")
    return download(name, root=root)


def download(name: str, *, root: str | Path | None = None, revision: str | None = None) -> Path:
    """Download the four files of an official checkpoint into ``<root>/<name>/`` (progress bars on).

    Only ``config.json``, ``model.safetensors``, ``vocab.json`` and ``merges.txt`` are fetched:
    the hub repos also hold five other weight formats of the same size.
    """
    short = canonical_name(name)
    if short is None:
        raise ValueError(f"unknown model name {name!r}: choose one of {', '.join(SIZES)}")
    from huggingface_hub import snapshot_download  # imported only when a download is asked for

    folder = weights_dir(root) / short
    folder.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(HUB_PREFIX + short, local_dir=folder, allow_patterns=list(FILES),
                          revision=revision or os.environ.get(REVISION_ENV) or None)
    except Exception as e:  # the hub's exceptions vary by version; keep the cause attached
        raise ConnectionError(f"downloading {short} into {folder} failed: {e}") from e
    # snapshot_download returns the folder even when the hub was unreachable: check ourselves.
    if missing_files(folder):
        raise ConnectionError(f"downloading {short} into {folder} did not complete (missing "
                              f"{', '.join(missing_files(folder))}); check the network and run it again")
    return folder


def _check_folder(folder: Path) -> Path:
    missing = missing_files(folder)
    if not missing:
        return folder
    hint = ""
    if "model.safetensors" in missing and (folder / "pytorch_model.bin").exists():
        hint = (" It has pytorch_model.bin, which gpt2np never reads: unpickling a .bin file can run "
                "arbitrary code. Convert it once with transformers (model.save_pretrained(folder)) "
                "or download the model.safetensors of the same repository.")
    raise FileNotFoundError(f"checkpoint folder {folder} is missing {', '.join(missing)}.{hint}")


# ---------------------------------------------------------------------------------------------
# Reading model.safetensors

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_header(path: Path) -> tuple[dict, int]:
    """Return (tensor name -> {dtype, shape, data_offsets}, byte offset where the data begins)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): not a safetensors file; download it again")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"{path} is not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} has an unreadable safetensors header; download it again") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes on disk, its header promises {8 + n + end}; "
                         "the download was probably interrupted, delete the file and download it again")
    return header, 8 + n


def _read_into(f, start: int, info: dict, out: np.ndarray, name: str, path: Path) -> None:
    """Read one tensor into ``out`` (float32, final shape), converting from f16/bf16/f64 if needed."""
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; gpt2np reads F32, F16, BF16, F64")
    f.seek(start + info["data_offsets"][0])
    if dtype is np.float32:
        f.readinto(memoryview(out).cast("B"))
        return
    raw = np.empty(out.shape, dtype)
    f.readinto(memoryview(raw).cast("B"))
    if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
        out[...] = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out[...] = raw


def read_params(path: str | Path, config: Config) -> Params:
    """Read ``model.safetensors`` (either layout) into float32 ``Params``, checking every shape.

    Mask buffers (``h.*.attn.bias``, ``h.*.attn.masked_bias``) are skipped by name, an optional
    ``transformer.`` prefix is stripped, and ``lm_head.weight`` is kept only when present and
    different from ``wte.weight``.
    """
    path = Path(path)
    header, start = read_header(path)
    tensors: dict[str, dict] = {}
    for key, info in header.items():
        name = key.removeprefix("transformer.")
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias"):
            continue  # causal-mask buffers, not parameters
        tensors[name] = info
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{path} lacks tensors {', '.join(missing[:3])}{more} that config.json "
                         f"(n_layer={config.n_layer}) requires; is it a GPT-2 checkpoint of this config?")
    unknown = [k for k in tensors if k not in shapes and k != "lm_head.weight"]
    if unknown:
        raise ValueError(f"{path} holds tensors a GPT-2 does not have: {', '.join(unknown[:3])}; "
                         "check config.json (n_layer) and the file")
    if "lm_head.weight" in tensors:
        shapes["lm_head.weight"] = shapes["wte.weight"]
    for k, want in shapes.items():
        got = tuple(tensors[k]["shape"])
        if got != want:
            raise ValueError(f"{path}: tensor {k} has shape {list(got)}, config.json implies {list(want)}; "
                             "the config and the weights do not belong together")

    arrays = {k: np.empty(s, np.float32) for k, s in shapes.items()}

    def read(names):  # in file order, so each reader goes through the file sequentially
        with open(path, "rb") as f:
            for k in names:
                _read_into(f, start, tensors[k], arrays[k], k, path)

    # Most of a load's time is the kernel giving the new arrays their memory (page faults), not the
    # reading: a few threads, each reading one contiguous part of the file, do that in parallel
    # (gpt2-xl on 2 cores: 1 to 8 s, median 6.9 s in scripts/bench.py, against 8 to 15 s, median
    # 11.6 s, with one reader; the spread is the machine's). readinto releases the GIL.
    ordered = sorted(arrays, key=lambda k: tensors[k]["data_offsets"][0])
    parts = _split_by_size(ordered, [arrays[k].nbytes for k in ordered], _cores())
    with ThreadPoolExecutor(len(parts)) as pool:
        for done in [pool.submit(read, names) for names in parts]:
            done.result()  # re-raises a reader's error

    head = arrays.pop("lm_head.weight", None)
    if head is not None and np.array_equal(head, arrays["wte.weight"]):
        head = None  # tied: one matrix, as in the official checkpoints
    keys = _block_keys()
    blocks = tuple(Block(*(arrays[f"h.{i}.{k}"] for k in keys)) for i in range(config.n_layer))
    return Params(arrays["wte.weight"], arrays["wpe.weight"], blocks, arrays["ln_f.weight"],
                  arrays["ln_f.bias"], head)


def _cores() -> int:
    """Reader threads: one per usable core, at most 4 (more do not read faster)."""
    return min(4, usable_cores())


def _split_by_size(items: list, sizes: list[int], parts: int) -> list[list]:
    """``items`` cut, in order, into at most ``parts`` consecutive runs of about equal total size."""
    total, out, acc = sum(sizes), [[]], 0
    for item, size in zip(items, sizes):
        if len(out) < parts and out[-1] and acc >= total * len(out) / parts:
            out.append([])
        out[-1].append(item)
        acc += size
    return out


def _block_keys() -> list[str]:
    """Block field names rewritten as checkpoint keys: 'attn_c_attn_weight' -> 'attn.c_attn.weight'."""
    out = []
    for f in fields(Block):
        n = f.name
        stem, kind = n.rsplit("_", 1)  # kind is weight or bias
        if stem.startswith(("attn_", "mlp_")):
            stem = stem.replace("_", ".", 1)
        out.append(f"{stem}.{kind}")
    return out
