"""Reading a ``torch.save(state_dict, path)`` file into NumPy, without torch and without unpickling.

The format (torch >= 1.6) is a zip archive with one top-level folder (``archive/``, ``params/``, ...):

* ``<prefix>/data.pkl``: a pickle of the dict. Each tensor in it is the call
  ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)``
  and each ``storage`` is a *persistent id*, the tuple ``('storage', torch.FloatStorage, key, location,
  numel)``: the storage's class gives its dtype, ``key`` names its bytes.
* ``<prefix>/data/<key>``: the raw bytes of one storage, ``numel`` elements, little-endian.
* ``<prefix>/byteorder``: ``little`` or ``big`` (absent in files of torch < 1.10: little-endian).

Unpickling such a file runs whatever callable the pickle names (``os.system`` as easily as the tensor
rebuild), so it is never unpickled. Instead ``pickletools.genops`` lists the pickle's opcodes and a tiny
stack machine interprets the few that a state dict uses. A *global* (a name the pickle refers to) is
never imported: it stays a ``_Global`` name, and only ``OrderedDict``, ``_rebuild_tensor_v2`` and the
storage classes are accepted. Anything else (another global, another opcode, a value that is not a
tensor) is refused with a ValueError before any tensor data is read.

Each tensor is a view of its storage: ``size`` and ``stride`` (in elements) from ``storage_offset``;
several tensors may view one storage. The result is a copy of that view, C-contiguous, owning its
memory. bfloat16 becomes float32: a bfloat16 is the top 16 bits of a float32, so shifting its bits
into the high half of a uint32 gives the same number exactly. ``location`` (cpu, cuda:0) is ignored.
"""
from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Storage class in the persistent id -> dtype of its bytes (little-endian).
STORAGES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
            "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
            "ByteStorage": "u1", "BoolStorage": "u1"}
_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2")}
_GLOBALS |= {("torch", name) for name in STORAGES}
NOT_A_ZIP = ("is not a torch.save zip file: a legacy (pre-1.6) file or another format; "
             "re-save it with torch.save in a recent torch")


@dataclass(frozen=True)
class _Global:
    """A name the pickle refers to (``GLOBAL 'torch FloatStorage'``), kept as a name, never imported."""
    module: str
    name: str


@dataclass(frozen=True)
class _Storage:
    """A persistent id: ``numel`` elements of class ``kind`` (e.g. FloatStorage) in ``data/<key>``."""
    key: str
    kind: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    """A ``_rebuild_tensor_v2`` call: a view of ``storage``, offset, shape and strides in elements."""
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _OrderedDict(dict):
    """What ``OrderedDict()`` builds: a dict that may carry a ``_metadata`` attribute (ignored)."""


class _Refused(Exception):
    """Something a state dict of tensors does not hold; becomes ``ValueError('<path>: refused: ...')``."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file written by ``torch.save(state_dict, path)``: tensor name -> NumPy array.

    Dtypes are kept (float32, float16, float64, int64, int32, int16, int8, uint8, bool) except bfloat16,
    read as float32. Every check is made, and anything foreign refused, before tensor data is read.

    Examples
    --------
    >>> state = read_state_dict("params.pt")   # doctest: +SKIP
    >>> state["0.weight"].shape                # (D, D)
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} {NOT_A_ZIP}") from None
    with archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            found = "none" if not pickles else ", ".join(sorted(pickles))
            raise ValueError(f"{path} holds no single <folder>/data.pkl (found {found}): not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").strip() if prefix + "byteorder" in names else b"little"
        if order != b"little":
            raise ValueError(f"{path} was written big-endian (its byteorder file says so); re-save it on a "
                             "little-endian machine")
        try:
            state = _interpret(archive.read(prefix + "data.pkl"))
        except _Refused as e:
            raise ValueError(f"{path}: refused: {e} (only tensors are read; nothing is unpickled)") from None
        storages: dict[str, _Storage] = {}  # key -> storage; views of one storage must agree on it
        for t in state.values():
            if storages.setdefault(t.storage.key, t.storage) != t.storage:
                raise ValueError(f"{path}: storage {t.storage.key} is read as both {t.storage} and "
                                 f"{storages[t.storage.key]}: the file is damaged")
        for s in storages.values():
            entry, want = f"{prefix}data/{s.key}", s.numel * np.dtype(STORAGES[s.kind]).itemsize
            if entry not in names:
                raise ValueError(f"{path} lacks {entry}, the bytes of storage {s.key}: the file is damaged")
            if archive.getinfo(entry).file_size != want:
                raise ValueError(f"{path} is truncated or damaged: {entry} holds {archive.getinfo(entry).file_size}"
                                 f" bytes, its {s.numel} elements of {s.kind} take {want}; save it again")
        arrays = {key: _decode(archive.read(f"{prefix}data/{key}"), s.kind) for key, s in storages.items()}
    return {name: _view(arrays[t.storage.key], t) for name, t in state.items()}


def _decode(raw: bytes, kind: str) -> np.ndarray:
    """A storage's bytes as a 1-D array of its dtype (read-only; bfloat16 -> float32, bool -> bool)."""
    a = np.frombuffer(raw, STORAGES[kind])
    if kind == "BFloat16Storage":  # the top half of a float32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a != 0 if kind == "BoolStorage" else a


def _view(storage: np.ndarray, t: _Tensor) -> np.ndarray:
    """The tensor as a C-contiguous copy of its view of ``storage`` (bounds checked by ``_interpret``)."""
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[t.offset:], t.size, tuple(s * item for s in t.stride),
                                           writeable=False)
    return view.copy(order="C")


def _interpret(data: bytes) -> dict[str, _Tensor]:
    """Run the opcodes of ``data.pkl`` on a stack machine that knows only what a state dict needs."""
    stack: list = []
    marks: list[list] = []  # the stacks saved by MARK: TUPLE, SETITEMS and APPENDS pop back to them
    memo: dict[int, object] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                break
            if name == "MARK":
                marks.append(stack)
                stack = []
            elif name in ("BININT", "BININT1", "BININT2", "LONG1", "BINUNICODE", "SHORT_BINUNICODE"):
                stack.append(arg)
            elif name in ("NEWFALSE", "NEWTRUE", "NONE"):
                stack.append({"NEWFALSE": False, "NEWTRUE": True, "NONE": None}[name])
            elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE"):
                stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple}[name]())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                items = [stack.pop() for _ in range(int(name[-1]))]
                stack.append(tuple(reversed(items)))
            elif name in ("TUPLE", "SETITEMS", "APPENDS"):
                items, stack = stack, marks.pop()
                if name == "TUPLE":
                    stack.append(tuple(items))
                elif name == "SETITEMS":
                    stack[-1].update(zip(items[::2], items[1::2]))
                else:
                    stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
            elif name == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif name in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                module, qualname = arg.split(" ", 1) if name == "GLOBAL" else (stack.pop(-2), stack.pop())
                if (module, qualname) not in _GLOBALS:
                    raise _Refused(f"it holds {_describe(_Global(module, qualname))}")
                stack.append(_Global(module, qualname))
            elif name == "BINPERSID":
                stack.append(_storage(stack.pop()))
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                stack.append(_reduce(fn, args))
            elif name == "BUILD":
                state = stack.pop()
                if not (isinstance(stack[-1], _OrderedDict) and isinstance(state, dict) and set(state) <= {"_metadata"}):
                    raise _Refused(f"it sets the state of {_describe(stack[-1])} (a BUILD beyond _metadata)")
            else:
                raise _Refused(f"it uses the pickle opcode {name}, which a state dict of tensors does not need")
    except (IndexError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise _Refused(f"data.pkl is damaged ({type(e).__name__}: {e})") from None
    if len(stack) != 1 or marks:
        _damaged()
    top = stack[0]
    if not isinstance(top, dict):
        raise _Refused(f"it holds {_describe(top)}, not a state dict (a dict of tensors)")
    for key, value in top.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise _Refused(f"its entry {key!r} holds {_describe(value)}, not a tensor")
    return dict(top)


def _storage(pid) -> _Storage:
    """``('storage', torch.XStorage, key, location, numel)`` -> ``_Storage``."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Global)
            and pid[1].module == "torch" and isinstance(pid[2], str) and isinstance(pid[3], str)
            and type(pid[4]) is int and pid[4] >= 0):
        raise _Refused(f"it holds a persistent id {pid!r}, not a storage of torch.save")
    return _Storage(pid[2], pid[1].name, pid[4])


def _reduce(fn, args):
    """The two calls a state dict makes: ``OrderedDict()`` and ``_rebuild_tensor_v2(...)``."""
    if fn == _Global("collections", "OrderedDict") and args == ():
        return _OrderedDict()
    if fn != _Global("torch._utils", "_rebuild_tensor_v2") or not isinstance(args, tuple) or len(args) < 6:
        raise _Refused(f"it calls {_describe(fn)} on {_describe(args)}")
    storage, offset, size, stride, _, hooks = args[:6]  # args[6:] (metadata) ignored
    ints = lambda xs: isinstance(xs, tuple) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    if not (isinstance(storage, _Storage) and ints((offset,)) and ints(size) and ints(stride)
            and len(size) == len(stride) and hooks == {}):
        raise _Refused(f"it rebuilds a tensor from {args!r}")
    end = offset + sum((n - 1) * s for n, s in zip(size, stride))  # the last element the view reads
    if 0 not in size and end >= storage.numel:
        raise _Refused(f"a tensor of size {size}, stride {stride} from offset {offset} reads element {end} "
                       f"of storage {storage.key}, which has {storage.numel}")
    return _Tensor(storage, offset, size, stride)


def _describe(x) -> str:
    """'a pathlib.PosixPath', 'an int', 'a dict': what a refusal names."""
    what = (f"{x.module}.{x.name}" if isinstance(x, _Global) else
            {_Storage: "bare storage", _OrderedDict: "dict"}.get(type(x), type(x).__name__))
    return ("an " if what[0] in "aeiou" else "a ") + what


def _damaged():
    raise _Refused("data.pkl is damaged (its opcodes do not build one object)")
