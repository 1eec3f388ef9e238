"""The result of the logit lens: the ``Lens`` arrays, their derived views, and their ``.npz`` / ``.json`` files.

Made by ``gpt2np.logit_lens`` (or its definition, ``gpt2np.lens.logit_lens``); read back with
``Lens.load``. Files hold no pickles: ``.npz`` is NumPy arrays plus one JSON string of metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Lens:
    """Logit-lens results for rows R (depth order) and window positions W = end - start.

    Arrays over (row, position) are ``[R, W]``; ``top_*`` are ``[R, W, k]``. At the last position of
    the sequence the next token is unknown: ``next_rank`` is -1, ``next_prob`` and ``next_xent`` NaN.
    """

    rows: tuple  # R labels: "input", "0.attn", "0", ...
    ids: np.ndarray  # [T] the whole sequence
    tokens: np.ndarray  # [T] display strings of ids
    start: int
    end: int
    top_ids: np.ndarray  # [R, W, k] int64
    top_logits: np.ndarray  # [R, W, k] float32
    top_probs: np.ndarray  # [R, W, k] float64
    top_tokens: np.ndarray  # [R, W, k] display strings
    final_ids: np.ndarray  # [W] the final distribution's top-1 token
    final_rank: np.ndarray  # [R, W] rank of the final top-1 under the row (1 = top)
    kl_final: np.ndarray  # [R, W] KL(final || row), nats
    kl_input: np.ndarray  # [R, W] KL(input || row), nats
    input_rank: np.ndarray  # [R, W] rank of the input token under the row
    entropy: np.ndarray  # [R, W] nats
    next_rank: np.ndarray  # [R, W] rank of the true next token (-1 where unknown)
    next_prob: np.ndarray  # [R, W] its probability (NaN where unknown)
    next_xent: np.ndarray  # [R, W] its cross-entropy -log p, nats (NaN where unknown)
    lock_in: np.ndarray  # [W] index of the first row from which top-1 == final top-1 to the last row
    settings: dict = field(default_factory=dict)

    # --- derived views -------------------------------------------------------------------------
    @property
    def positions(self) -> np.ndarray:
        """``[W]`` absolute positions of the window."""
        return np.arange(self.start, self.end)

    @property
    def input_ids(self) -> np.ndarray:
        return self.ids[self.start:self.end]

    @property
    def next_ids(self) -> np.ndarray:
        """``[W]`` true next token ids, -1 at the last position of the sequence."""
        return next_ids(self.ids, self.start, self.end)

    @property
    def top1(self) -> np.ndarray:
        """``[R, W]`` top-1 token of each cell."""
        return self.top_ids[..., 0]

    @property
    def matches_final(self) -> np.ndarray:
        """``[R, W]`` bool: the cell's top-1 equals the final top-1 (the post's outlines)."""
        return self.top1 == self.final_ids[None, :]

    @property
    def final_correct(self) -> np.ndarray:
        """``[W]`` bool: the final top-1 equals the true next token (the post's ``*``)."""
        return self.final_ids == self.next_ids

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain Python (lists, numbers, strings; NaN as None) ready for ``json.dumps``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist() if v.dtype.kind != "f" else np.where(np.isnan(v), None, v).tolist()
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def save(self, path: str | Path) -> Path:
        """Save to ``.npz`` (compressed, no pickle) or ``.json``, chosen by the extension."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict()))
            return path
        if path.suffix.lower() != ".npz":
            raise ValueError(f"cannot save a lens as {path.suffix or 'a file without extension'}: use .npz or .json")
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {"rows": list(self.rows), "start": self.start, "end": self.end, "settings": self.settings}
        with open(path, "wb") as f:  # a file object: NumPy would append ".npz" to a path ending ".NPZ"
            np.savez_compressed(f, __meta__=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Lens":
        """Load a lens saved with ``save`` (``.npz`` or ``.json``)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            kinds = {f.name: f for f in fields(cls)}
            args = {}
            for name, v in raw.items():
                if name not in kinds:
                    continue
                if name in ("rows",):
                    args[name] = tuple(v)
                elif name in ("start", "end", "settings"):
                    args[name] = v
                else:
                    args[name] = _from_json_list(name, v)
            return cls(**args)
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        return cls(rows=tuple(meta["rows"]), start=meta["start"], end=meta["end"], settings=meta["settings"],
                   **arrays)


def next_ids(ids: np.ndarray, start: int, end: int) -> np.ndarray:
    """``[end - start]`` the token after each position of the window, -1 after the sequence's last."""
    nxt = np.full(end - start, -1, np.int64)
    avail = ids[start + 1:end + 1]
    nxt[:len(avail)] = avail
    return nxt


_INT_FIELDS = {"ids", "top_ids", "final_ids", "final_rank", "input_rank", "next_rank", "lock_in"}
_STR_FIELDS = {"tokens", "top_tokens"}


def _from_json_list(name: str, v) -> np.ndarray:
    if name in _INT_FIELDS:
        return np.asarray(v, np.int64)
    if name in _STR_FIELDS:
        return np.asarray(v, dtype=str)
    a = np.asarray(v, dtype=object)
    a = np.where(a == None, np.nan, a)  # noqa: E711  (JSON null -> NaN)
    return a.astype(np.float32 if name == "top_logits" else np.float64)

