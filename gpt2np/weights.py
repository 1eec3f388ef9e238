"""Checkpoints: find or download a GPT-2 folder, and read its ``model.safetensors`` into NumPy.

A checkpoint folder holds ``config.json``, ``model.safetensors``, ``vocab.json`` and ``merges.txt``.
The weights may instead be sharded, as ``save_pretrained(..., max_shard_size=...)`` writes them:
``model-00001-of-0000N.safetensors`` and so on, and ``model.safetensors.index.json`` naming the shard
of every tensor. The tokenizer may instead be ``tokenizer.json`` alone (see ``tokenizer.py``).
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
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .backend import usable_cores
from .config import SIZES, Config

FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")  # an official checkpoint
INDEX = "model.safetensors.index.json"  # the tensor -> shard map of a sharded checkpoint
# What a download fetches: the four files, or the index and its shards where the weights are sharded.
DOWNLOAD_PATTERNS = ("config.json", "model*.safetensors", INDEX, "vocab.json", "merges.txt")
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
    """The files a checkpoint folder lacks, [] when it is complete: config.json; model.safetensors, or
    every shard its model.safetensors.index.json names; vocab.json and merges.txt, or tokenizer.json."""
    folder = Path(folder)
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if (folder / INDEX).is_file():
        missing += [f for f in dict.fromkeys(read_index(folder / INDEX).values()) if not (folder / f).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    if not (folder / "tokenizer.json").is_file():
        missing += [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    return missing


def weights_path(folder: Path) -> Path:
    """What ``read_params`` reads in a checkpoint folder: model.safetensors, or the index of its shards.

    A folder holding both model.safetensors and an index is refused: either could be the weights.
    """
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        return folder / "model.safetensors"
    if (folder / "model.safetensors").is_file():
        raise ValueError(f"{folder} holds both model.safetensors and {INDEX}, so its weights are ambiguous; "
                         "delete one of them (model.safetensors, or the index and its shards)")
    return folder / INDEX


def checkpoint_files(folder: Path) -> list[str]:
    """The names of the checkpoint files present in ``folder``: config, weights (or index and shards),
    tokenizer files."""
    folder = Path(folder)
    try:
        shards = list(dict.fromkeys(read_index(folder / INDEX).values())) if (folder / INDEX).is_file() else []
    except ValueError:  # an unreadable index: its shards are unknown
        shards = []
    names = ["config.json", "model.safetensors", INDEX, *shards, "vocab.json", "merges.txt", "tokenizer.json",
             "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"]
    return [f for f in names if (folder / f).is_file()]


def read_index(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a ``model.safetensors.index.json``."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download it again") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{path} has no weight_map from tensor names to shard files: not a safetensors index")
    for shard in weight_map.values():
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ValueError(f"{path} names shard {shard!r}: shards must be .safetensors files beside the index")
    return weight_map


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

    Only ``config.json``, ``model.safetensors``, ``vocab.json`` and ``merges.txt`` are fetched (or, for
    a sharded repository, its ``model.safetensors.index.json`` and ``model-*.safetensors`` shards):
    the hub repos also hold five other weight formats of the same size.
    """
    short = canonical_name(name)
    if short is None:
        raise ValueError(f"unknown model name {name!r}: choose one of {', '.join(SIZES)}")
    from huggingface_hub import snapshot_download  # imported only when a download is asked for

    folder = weights_dir(root) / short
    folder.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(HUB_PREFIX + short, local_dir=folder, allow_patterns=list(DOWNLOAD_PATTERNS),
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
    if "model.safetensors" in missing and any(folder.glob("pytorch_model*.bin")):
        hint = (" It has pytorch_model.bin, which gpt2np never reads: unpickling a .bin file can run "
                "arbitrary code. Convert it once with transformers (model.save_pretrained(folder)) "
                "or download the model.safetensors of the same repository.")
    raise FileNotFoundError(f"checkpoint folder {folder} is missing {', '.join(missing)}.{hint}")


# ---------------------------------------------------------------------------------------------
# Reading model.safetensors (or its shards)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# Bytes per element of every safetensors dtype: each tensor's data span must match its shape.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class Stored:
    """Where one tensor lies: its file, the byte offset of its data in that file, its dtype and shape."""

    path: Path
    offset: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> tuple[dict, int]:
    """Return (tensor name -> {dtype, shape, data_offsets}, byte offset where the data begins).

    The header is checked as the safetensors library checks it: every tensor's ``data_offsets`` span
    exactly its shape times its dtype's size, and the spans tile the data, no gap, no overlap, to the
    end of the file.
    """
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
    if not isinstance(header, dict):
        raise ValueError(f"{path} has an unreadable safetensors header; download it again")
    header.pop("__metadata__", None)
    spans = sorted((_span(path, k, t), k) for k, t in header.items())  # [((begin, end), name)] in file order
    end = max((e for (_, e), _ in spans), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: {size} bytes on disk, its header promises {8 + n + end}; "
                         "the download was probably interrupted, delete the file and download it again")
    previous, at = None, 0
    for (begin, stop), k in spans:
        if begin != at:
            after = f"tensor {previous}'s" if previous else "the header"
            what = (f"overlaps tensor {previous}'s, which ends at {at}" if begin < at else
                    f"starts {begin - at} bytes after the end of {after}")
            raise ValueError(f"{path}: tensor {k}'s data_offsets [{begin}, {stop}] {what}; "
                             "the header does not describe the file: download it again")
        previous, at = k, stop
    if 8 + n + end < size:
        raise ValueError(f"{path} has {size - 8 - n - end} bytes after its last tensor that the header does not "
                         "describe: not a valid safetensors file; download it again")
    return header, 8 + n


def _span(path: Path, name: str, info) -> tuple[int, int]:
    """A header entry's data_offsets, checked against its dtype and shape."""
    entry = info if isinstance(info, dict) else {}
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    counts = (shape if isinstance(shape, list) else [None]) + (offsets if isinstance(offsets, list) else [None])
    if not all(type(x) is int and x >= 0 for x in counts) or len(offsets) != 2:
        raise ValueError(f"{path}: tensor {name} has an unreadable header entry {info!r}; download the file again")
    if dtype not in _ITEMSIZE:
        raise ValueError(f"{path}: tensor {name} has dtype {dtype!r}, which safetensors does not define; "
                         "download the file again")
    begin, end = offsets
    need = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != need:
        raise ValueError(f"{path}: tensor {name}'s data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                         f"{shape} in {dtype} takes {need}; the header does not describe the file: download it again")
    return begin, end


def _read_into(f, t: Stored, out: np.ndarray, name: str) -> None:
    """Read one tensor into ``out`` (float32, final shape), converting from f16/bf16/f64 if needed."""
    dtype = _DTYPES[t.dtype]
    f.seek(t.offset)
    raw = out if dtype is np.float32 else np.empty(out.shape, dtype)
    if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
        raise ValueError(f"{t.path} is truncated at tensor {name}: the file shrank while it was read")
    if raw is out:
        return
    if t.dtype == "BF16":  # bfloat16 is the top half of a float32
        out[...] = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out[...] = raw


def stored_tensors(path: str | Path, config: Config) -> dict[str, Stored]:
    """Every check ``read_params`` makes, without reading any tensor data: official name -> ``Stored``.

    ``path`` is ``model.safetensors`` or a ``model.safetensors.index.json``; for an index, every shard
    it names must exist, every tensor it names must be in its shard, and every tensor in the shards in
    the index. Then the names, shapes and dtypes must be those of a GPT-2 of ``config``.
    """
    path = Path(path)
    headers = {path: read_header(path)} if path.name != INDEX else _shard_headers(path)
    tensors: dict[str, Stored] = {}
    for file, (header, start) in headers.items():
        for key, info in header.items():
            name = key.removeprefix("transformer.")
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "h" and parts[2] == "attn" and parts[3] in ("bias", "masked_bias"):
                continue  # causal-mask buffers, not parameters
            tensors[name] = Stored(file, start + info["data_offsets"][0], info["dtype"], tuple(info["shape"]))
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
    elif not config.tie_word_embeddings:
        raise ValueError(f"{path} has no lm_head.weight, but config.json says tie_word_embeddings=false (a "
                         "separate head); transformers would start that head at random: add the head's tensor "
                         "or set tie_word_embeddings to true")
    for k, want in shapes.items():
        t = tensors[k]
        if t.shape != want:
            raise ValueError(f"{t.path}: tensor {k} has shape {list(t.shape)}, config.json implies {list(want)}; "
                             "the config and the weights do not belong together")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{t.path}: tensor {k} has dtype {t.dtype}; gpt2np reads F32, F16, BF16, F64")
    return {k: tensors[k] for k in shapes}


def _shard_headers(index: Path) -> dict[Path, tuple[dict, int]]:
    """The header of every shard an index names, each checked against the index both ways."""
    weight_map = read_index(index)
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shards that are not in the folder: {', '.join(missing)}; "
                                "download them again")
    headers = {index.parent / s: read_header(index.parent / s) for s in shards}
    for name, shard in weight_map.items():
        if name not in headers[index.parent / shard][0]:
            raise ValueError(f"{index} places tensor {name} in {shard}, which does not hold it; "
                             "the index and the shards do not belong together")
    for file, (header, _) in headers.items():
        for name in header:
            if weight_map.get(name) != file.name:
                where = f"places it in {weight_map[name]}" if name in weight_map else "does not list it"
                raise ValueError(f"{file} holds tensor {name}, but {index.name} {where}; "
                                 "the index and the shards do not belong together")
    return headers


def read_params(path: str | Path, config: Config) -> Params:
    """Read ``model.safetensors`` or the shards of a ``model.safetensors.index.json`` (either layout)
    into float32 ``Params``, after every check of ``stored_tensors``.

    Mask buffers (``h.*.attn.bias``, ``h.*.attn.masked_bias``) are skipped by name, an optional
    ``transformer.`` prefix is stripped, and ``lm_head.weight`` is kept only when present and
    different from ``wte.weight``.
    """
    tensors = stored_tensors(path, config)
    arrays = {k: np.empty(t.shape, np.float32) for k, t in tensors.items()}

    def read(names):  # in file order, so each reader goes through each file sequentially
        f = None
        try:
            for k in names:
                if f is None or f.name != str(tensors[k].path):
                    if f is not None:
                        f.close()
                    f = open(tensors[k].path, "rb")
                _read_into(f, tensors[k], arrays[k], k)
        finally:
            if f is not None:
                f.close()

    # Most of a load's time is the kernel giving the new arrays their memory (page faults), not the
    # reading: a few threads, each reading one contiguous part of the file, do that in parallel
    # (gpt2-xl on 2 cores: 1 to 8 s, median 6.9 s in scripts/bench.py, against 8 to 15 s, median
    # 11.6 s, with one reader; the spread is the machine's). readinto releases the GIL.
    ordered = sorted(arrays, key=lambda k: (str(tensors[k].path), tensors[k].offset))
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
