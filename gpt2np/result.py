"""The result of the logit lens: the ``Lens`` arrays, their derived views, and their ``.npz`` / ``.json`` files.

Made by ``gpt2np.logit_lens`` (or its definition, ``gpt2np.lens.logit_lens``); read back with
``Lens.load``. Files hold no pickles: ``.npz`` is NumPy arrays plus one JSON string of metadata.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import numpy as np

from .files import replacing


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

    # --- checks --------------------------------------------------------------------------------
    def __post_init__(self):
        """Check every field against the documented shapes and dtype kinds; store ``start``, ``end``
        and ``settings`` as plain Python values (so that every lens can be saved)."""
        set_ = partial(object.__setattr__, self)
        rows = self.rows
        if isinstance(rows, str) or not isinstance(rows, (tuple, list)) or not rows \
                or not all(isinstance(r, str) for r in rows):
            raise ValueError(f"Lens rows must be a non-empty sequence of row labels (strings), got {rows!r:.80}")
        set_("rows", tuple(str(r) for r in rows))
        for name in _ARRAY_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, np.ndarray):
                raise ValueError(f"Lens {name} must be a NumPy array, got {type(v).__name__}")
            want = "integer" if name in _INT_FIELDS else "string" if name in _STR_FIELDS else "float"
            if v.dtype.kind not in {"integer": "iu", "string": "U", "float": "f"}[want]:
                raise ValueError(f"Lens {name} must hold {want}s, got dtype {v.dtype}")
        T = self.ids.shape[0] if self.ids.ndim == 1 else None
        if T is None or T == 0:
            raise ValueError(f"Lens ids must have shape [T] with T >= 1, got {list(self.ids.shape)}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise ValueError(f"Lens {name} must be an integer, got {v!r}")
            set_(name, int(v))
        if not 0 <= self.start < self.end <= T:
            raise ValueError(f"Lens window start={self.start}, end={self.end} must satisfy "
                             f"0 <= start < end <= {T} (the length of ids)")
        R, W, k = len(self.rows), self.end - self.start, self.top_ids.shape[-1] if self.top_ids.ndim else 0
        if k < 1:
            raise ValueError(f"Lens top_ids must have shape [R, W, k] with k >= 1, got {list(self.top_ids.shape)}")
        shapes = {"ids": (T,), "tokens": (T,), "final_ids": (W,), "lock_in": (W,)}
        shapes.update({n: (R, W, k) for n in ("top_ids", "top_logits", "top_probs", "top_tokens")})
        for name in _ARRAY_FIELDS:
            want = shapes.get(name, (R, W))
            got = getattr(self, name).shape
            if got != want:
                dims = "[T]" if name in ("ids", "tokens") else "[W]" if len(want) == 1 else \
                    "[R, W, k]" if len(want) == 3 else "[R, W]"
                raise ValueError(f"Lens {name} has shape {list(got)}, but {R} rows, a window of {W} positions "
                                 f"and k={k} (from top_ids) need {dims} = {list(want)}")
        if not isinstance(self.settings, dict):
            raise ValueError(f"Lens settings must be a dict, got {type(self.settings).__name__}")
        set_("settings", _plain(self.settings, "settings"))

    # --- pages ---------------------------------------------------------------------------------
    def to_html(self, *, view: str = "logits", title: str | None = None, vmin=None, vmax=None) -> str:
        """The lens as one self-contained HTML page (every view, a panel per cell): ``gpt2np.html.to_html``."""
        from .html import to_html  # lazily: html.py imports plot.py (matplotlib)

        return to_html(self, view=view, title=title, vmin=vmin, vmax=vmax)

    def _repr_html_(self) -> str:
        """In a notebook: the page of ``to_html`` in a sandboxed iframe, so its script and style stay its own."""
        import html

        height = min(900, 330 + 23 * (len(self.rows) + 3))  # the grid, the header and room for the panel
        return (f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" sandbox="allow-scripts" '
                f'style="width:100%;height:{height}px;border:0" title="logit lens"></iframe>')

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
        """Save to ``.npz`` (compressed, no pickle) or ``.json``, chosen by the extension.

        The file is written beside ``path`` and renamed over it when complete (``files.replacing``):
        a failure leaves an earlier file at ``path`` as it was.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".json"):
            raise ValueError(f"cannot save a lens as {path.suffix or 'a file without extension'}: use .npz or .json")
        with replacing(path) as tmp:
            if suffix == ".json":
                tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
            else:
                arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
                meta = {"rows": list(self.rows), "start": self.start, "end": self.end, "settings": self.settings}
                with open(tmp, "wb") as f:  # a file object: NumPy would append ".npz" to a path ending ".NPZ"
                    np.savez_compressed(f, __meta__=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Lens":
        """Load a lens saved with ``save`` (``.npz`` or ``.json``).

        Every field must be there with the shape its rows and window imply and the documented dtype
        kind; otherwise a ValueError names the file and the field.
        """
        path = Path(path)
        try:
            raw = _read_json(path) if path.suffix.lower() == ".json" else _read_npz(path)
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"cannot read {path} as a saved lens: {e}") from None


def _read_json(path: Path) -> dict:
    """The fields of a ``.json`` lens, arrays converted to their documented dtypes."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"the file holds a JSON {type(raw).__name__}, not an object of lens fields")
    args = {}
    for f in fields(Lens):
        if f.name not in raw:
            raise ValueError(f"field {f.name} is missing")
        v = raw[f.name]
        if f.name in _ARRAY_FIELDS:
            try:
                v = _from_json_list(f.name, v)
            except (ValueError, TypeError) as e:
                raise ValueError(f"field {f.name} is not a regular array of "
                                 f"{'integers' if f.name in _INT_FIELDS else 'strings' if f.name in _STR_FIELDS else 'numbers'}"
                                 f" ({_one_line(e)})") from None
        args[f.name] = v
    return args


def _read_npz(path: Path) -> dict:
    """The fields of a ``.npz`` lens: its arrays and the JSON string ``__meta__`` (rows, window, settings)."""
    damaged = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)  # what np.load raises on bad bytes
    try:
        z = np.load(path, allow_pickle=False)
    except OSError:
        if not path.is_file():
            raise
        raise ValueError("not a .npz file (a zip of NumPy arrays)") from None
    except damaged as e:
        raise ValueError(f"not a .npz file ({_one_line(e)})") from None
    with z:
        if "__meta__" not in z.files:
            raise ValueError("its __meta__ entry (rows, window and settings) is missing")
        try:
            meta = json.loads(str(z["__meta__"]))
        except damaged as e:
            raise ValueError(f"its __meta__ entry is not a JSON string ({_one_line(e)})") from None
        if not isinstance(meta, dict):
            raise ValueError("its __meta__ entry is not a JSON object")
        args = {}
        for f in fields(Lens):
            if f.name not in (z.files if f.name in _ARRAY_FIELDS else meta):
                raise ValueError(f"field {f.name} is missing")
            if f.name not in _ARRAY_FIELDS:
                args[f.name] = meta[f.name]
                continue
            try:
                args[f.name] = z[f.name]
            except damaged as e:
                raise ValueError(f"field {f.name} cannot be read ({_one_line(e)})") from None
        return args


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _plain(v, where: str):
    """``v`` as plain Python (NumPy scalars to int, float, bool, str; tuples to lists), or a TypeError."""
    if v is None or type(v) in (bool, int, float, str):
        return v
    if isinstance(v, np.generic) and v.dtype.kind in "biufU":  # np.int64, np.float32, np.bool_, np.str_
        return v.item()
    for kind in (bool, int, float, str):  # other subclasses (an IntEnum, a str subclass)
        if isinstance(v, kind):
            return kind(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        for key in v:
            if not isinstance(key, str):
                raise TypeError(f"Lens {where} has the key {key!r}: keys must be strings (they are saved as JSON)")
        return {key: _plain(x, f"{where}[{key!r}]") for key, x in v.items()}
    raise TypeError(f"Lens {where} = {v!r:.60} ({type(v).__name__}) is not a plain value (number, string, bool, "
                    "None, list or dict), so it could not be saved")


def next_ids(ids: np.ndarray, start: int, end: int) -> np.ndarray:
    """``[end - start]`` the token after each position of the window, -1 after the sequence's last."""
    nxt = np.full(end - start, -1, np.int64)
    avail = ids[start + 1:end + 1]
    nxt[:len(avail)] = avail
    return nxt


_INT_FIELDS = {"ids", "top_ids", "final_ids", "final_rank", "input_rank", "next_rank", "lock_in"}
_STR_FIELDS = {"tokens", "top_tokens"}
_ARRAY_FIELDS = ("ids", "tokens", "top_ids", "top_logits", "top_probs", "top_tokens", "final_ids", "final_rank",
                 "kl_final", "kl_input", "input_rank", "entropy", "next_rank", "next_prob", "next_xent", "lock_in")


def _from_json_list(name: str, v) -> np.ndarray:
    """A field's JSON list as its array: integers as int64, strings as str, numbers (null = NaN) as float;
    a value of another kind is an error, never converted (1.5 is not read as the id 1)."""
    if name in _INT_FIELDS:
        a = np.asarray(v)
        if a.dtype.kind not in "iu":
            raise ValueError(f"dtype {a.dtype}")
        return a.astype(np.int64)
    if name in _STR_FIELDS:
        a = np.asarray(v)
        if a.dtype.kind != "U":
            raise ValueError(f"dtype {a.dtype}")
        return a
    a = np.asarray(v, dtype=object)
    if not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in a.reshape(-1)):
        raise ValueError("values other than numbers and null")
    a = np.where(a == None, np.nan, a)  # noqa: E711  (JSON null -> NaN)
    return a.astype(np.float32 if name == "top_logits" else np.float64)
