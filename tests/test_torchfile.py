"""torchfile.read_state_dict against torch: files written by torch.save, compared with torch.load(weights_only=True);
read with torch and pickle unusable; foreign objects and damaged files refused, their code never run."""
from __future__ import annotations

import os
import pickle
import pickletools
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gpt2np.torchfile import read_state_dict

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]


def expected(tensor) -> np.ndarray:
    """torch's own values as NumPy: bfloat16 widened to float32 by torch, everything else as is."""
    return tensor.float().numpy() if str(tensor.dtype) == "torch.bfloat16" else tensor.numpy()


def read_blind(path, monkeypatch) -> dict:
    """read_state_dict with pickle's loaders raising and ``import torch`` failing."""
    def refuse(*a, **k):
        raise AssertionError("unpickling is not allowed")

    with monkeypatch.context() as m:
        for name in ("load", "loads", "Unpickler", "_Unpickler", "_load", "_loads"):
            m.setattr(pickle, name, refuse, raising=False)
        m.setitem(sys.modules, "torch", None)
        return read_state_dict(path)


def check_against_torch(torch, path, got, want=None):
    """``got`` equals ``want``, by default torch's own safe reading of ``path``: names, dtypes, shapes, values."""
    want = torch.load(path, weights_only=True) if want is None else want
    assert list(got) == list(want)
    for k, t in want.items():
        ref = expected(t)
        assert got[k].dtype == ref.dtype and got[k].shape == ref.shape, k
        assert np.array_equal(got[k], ref), k
        assert got[k].flags.c_contiguous and got[k].flags.owndata, k


def rewrite(path: Path, changes: dict) -> None:
    """Rewrite the zip at ``path``: an entry whose name ends with a key of ``changes`` gets its bytes (None: removed)."""
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            new = next((v for k, v in changes.items() if n.endswith(k)), data)
            if new is not None:
                z.writestr(n, new)


@pytest.mark.parametrize("protocol", [2, 4])
def test_every_dtype_matches_torch_load(torch, tmp_path, monkeypatch, protocol):
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in DTYPES:
        x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 50
        state[name] = (x > 0) if name == "bool" else x.to(getattr(torch, name))
    state["bf16_exact"] = torch.tensor([1.0, -2.5, 3.0e38, 1e-40, float("inf")], dtype=torch.bfloat16)
    path = tmp_path / "all.pt"
    torch.save(state, path, pickle_protocol=protocol)  # 4: FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE
    got = read_blind(path, monkeypatch)
    # torch's weights_only loader has no FRAME opcode: protocol 4 is compared with the tensors saved
    check_against_torch(torch, path, got, want=None if protocol == 2 else state)
    assert got["bfloat16"].dtype == np.float32 and got["bool"].dtype == np.bool_
    assert got["bf16_exact"].tolist() == [1.0, -2.5, float(state["bf16_exact"][2]), float(state["bf16_exact"][3]),
                                          float("inf")]


def test_views_offsets_shared_storages_scalars_and_empty_tensors(torch, tmp_path, monkeypatch):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "base": base,
        "transpose": base.T,  # strides (1, 10): a view of the same storage
        "step": base[::2, 1::3],  # storage offset 1, strides (20, 3)
        "tail": base.reshape(-1)[3:],  # storage offset 3
        "column": base[:, 7],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "empty_view": base[6:],  # size 0 at offset 60, the storage's end
        "other": torch.arange(5, dtype=torch.int64)[1:4],
    }
    path = tmp_path / "views.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path) as z:  # one storage for every view of base, so the views are really shared
        assert sum("/data/" in n for n in z.namelist()) == 4
    got = read_blind(path, monkeypatch)
    check_against_torch(torch, path, got)
    assert got["transpose"].shape == (10, 6) and got["step"].tolist() == base[::2, 1::3].tolist()
    assert got["scalar"].shape == () and got["empty"].shape == (0, 4) and got["empty_view"].shape == (0, 10)
    got["base"][0, 0] = -1.0  # each array owns its memory: writing one leaves the views of its storage alone
    assert got["transpose"][0, 0] == 0.0 and got["tail"][0] == 3.0


def test_a_module_state_dict_with_metadata(torch, tmp_path, monkeypatch):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))])
    state = layers.state_dict()
    assert hasattr(state, "_metadata")  # written with a BUILD, which the reader must accept and ignore
    path = tmp_path / "params.pt"
    torch.save(state, path)
    with zipfile.ZipFile(path) as z:
        assert b"_metadata" in z.read("params/data.pkl")
    got = read_blind(path, monkeypatch)
    assert list(got) == ["0.weight", "0.bias", "1.0.weight"]
    check_against_torch(torch, path, got)


class RunsACommand:
    """Pickles as ``os.system("touch <marker>")``: unpickling it would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_foreign_objects_are_refused_and_never_run(torch, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": RunsACommand(marker)}, path)
    with zipfile.ZipFile(path) as z:  # the pickle really names os.system
        assert b"system" in z.read("evil/data.pkl")
    with pytest.raises(ValueError, match=r"evil\.pt: refused: it holds a (posix|nt)\.system \(only tensors are "
                                         r"read; nothing is unpickled\)"):
        read_state_dict(path)
    assert not marker.exists()

    torch.save({"w": torch.zeros(2), "p": Path("x")}, path)
    with pytest.raises(ValueError, match=r"refused: it holds a pathlib\.\w*Path"):
        read_state_dict(path)
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="refused: it holds a list, not a state dict"):
        read_state_dict(path)
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ValueError, match="refused: its entry 'step' holds an int, not a tensor"):
        read_state_dict(path)
    torch.save({"w": torch.zeros(2), "lr": 0.5}, path)
    with pytest.raises(ValueError, match="refused: it uses the pickle opcode BINFLOAT"):
        read_state_dict(path)
    torch.save({"w": torch.nn.Parameter(torch.zeros(2))}, path)  # rebuilt by another function: refused
    with pytest.raises(ValueError, match=r"refused: it holds a torch\._utils\._rebuild_parameter"):
        read_state_dict(path)


def test_other_formats_and_damaged_files_are_refused(torch, tmp_path):
    not_zip = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, not_zip, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy\.pt is not a torch\.save zip file: a legacy \(pre-1\.6\) file"):
        read_state_dict(not_zip)
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("folder/notes.txt", "hello")
    with pytest.raises(ValueError, match=r"holds no single <folder>/data\.pkl \(found none\)"):
        read_state_dict(other)

    def saved(name, **tensors):
        path = tmp_path / name
        torch.save(tensors, path)
        return path

    path = saved("deleted.pt", a=torch.zeros(3), b=torch.ones(2))
    rewrite(path, {"data/1": None})
    with pytest.raises(ValueError, match=r"deleted\.pt lacks deleted/data/1, the bytes of storage 1"):
        read_state_dict(path)
    path = saved("short.pt", a=torch.zeros(3), b=torch.ones(2))
    rewrite(path, {"data/0": b"\0" * 8})
    with pytest.raises(ValueError, match=r"short\.pt is truncated or damaged: short/data/0 holds 8 bytes, its 3 "
                                         r"elements of FloatStorage take 12"):
        read_state_dict(path)
    path = saved("big.pt", a=torch.zeros(3))
    rewrite(path, {"/byteorder": b"big"})
    with pytest.raises(ValueError, match="was written big-endian"):
        read_state_dict(path)


def test_a_view_past_the_end_of_its_storage_is_refused(torch, tmp_path):
    """A crafted file whose tensor would read beyond its storage (as_strided would read foreign memory)."""
    path = tmp_path / "past.pt"
    torch.save({"a": torch.arange(4.0)[1:4]}, path)  # offset 1, size 3, in a storage of 4
    name = "past/data.pkl"
    with zipfile.ZipFile(path) as z:
        data = bytearray(z.read(name))
    ops = list(pickletools.genops(bytes(data)))
    at = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    op, arg, pos = ops[at + 1]  # the storage offset
    assert (op.name, arg) == ("BININT1", 1)
    data[pos + 1] = 2  # offset 2: elements 2, 3 and 4 of a storage of 4
    rewrite(path, {name: bytes(data)})
    with pytest.raises(ValueError, match=r"refused: a tensor of size \(3,\), stride \(1,\) from offset 2 reads "
                                         r"element 4 of storage 0, which has 4"):
        read_state_dict(path)
