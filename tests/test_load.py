"""Loading checkpoints: both layouts, dtypes, every bad input with its message, and downloads.

No test touches the network: downloads go through a fake ``huggingface_hub.snapshot_download``.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import pickle
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gpt2np
from gpt2np import weights
from gpt2np.weights import FILES, read_params

ROOT = Path(__file__).resolve().parents[1]


def flat(params) -> dict[str, np.ndarray]:
    """Params -> checkpoint names (official layout) -> arrays."""
    out = {"wte.weight": params.wte, "wpe.weight": params.wpe, "ln_f.weight": params.ln_f_weight,
           "ln_f.bias": params.ln_f_bias}
    for i, b in enumerate(params.h):
        for field, value in vars(b).items():
            stem, kind = field.rsplit("_", 1)
            if stem.startswith(("attn_", "mlp_")):
                stem = stem.replace("_", ".", 1)
            out[f"h.{i}.{stem}.{kind}"] = value
    return out


def rewrite_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    result = edit(tensors)  # edits in place, or returns a new dict
    if isinstance(result, dict):
        tensors = result
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# what loads, and what it loads


def test_loads_exactly_the_stored_tensors(tiny_checkpoint, tiny_model, tiny_config):
    assert tiny_model.config == tiny_config
    assert len(tiny_model.params.h) == tiny_config.n_layer
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))  # safetensors' own reader
    ours = flat(tiny_model.params)
    assert set(ours) | {k for k in stored if re.search(r"\.attn\.(masked_)?bias$", k)} == set(stored)
    for k, v in ours.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous, k
        np.testing.assert_array_equal(v, stored[k], err_msg=k)
    assert tiny_model.params.lm_head_weight is None


@pytest.mark.parametrize("readers", [1, 2, 3, 50])
def test_parallel_readers_load_exactly_the_stored_tensors(tiny_checkpoint, monkeypatch, readers):
    monkeypatch.setattr(weights, "_cores", lambda: readers)  # the file is read in this many parts
    params = gpt2np.load(tiny_checkpoint).params
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    for k, v in flat(params).items():
        np.testing.assert_array_equal(v, stored[k], err_msg=k)


@pytest.mark.parametrize("sizes,parts", [([1] * 6, 2), ([10, 1, 1, 1], 2), ([5], 4), ([], 2), ([0, 0, 0], 2),
                                         ([1] * 8, 3), ([3, 1, 4, 1, 5, 9, 2, 6], 4)])
def test_split_by_size(sizes, parts):
    items = list(range(len(sizes)))
    runs = weights._split_by_size(items, sizes, parts)
    assert [i for run in runs for i in run] == items  # every item once, in order
    assert 1 <= len(runs) <= parts and all(runs[:-1]) and (runs[-1] or not items)
    total, biggest, before = sum(sizes), max(sizes, default=0), 0
    for n, run in enumerate(runs):  # a run starts once the runs before it hold their share, and
        assert before >= total * n / parts  # ends at the next item past its own share
        assert sum(sizes[i] for i in run) <= total / parts + biggest
        before += sum(sizes[i] for i in run)


def test_official_file_has_mask_buffers_and_they_are_skipped(tiny_checkpoint, tiny_model):
    header_keys = load_file(str(tiny_checkpoint / "model.safetensors")).keys()
    assert "h.0.attn.bias" in header_keys and "h.0.attn.masked_bias" in header_keys
    assert not any(re.search(r"\.attn\.(masked_)?bias$", k) for k in flat(tiny_model.params))


def test_hf_layout_loads_identically_to_official(make_checkpoint):
    official = gpt2np.load(make_checkpoint(layout="official", seed=3))
    hf_folder = make_checkpoint(layout="hf", seed=3)
    names = load_file(str(hf_folder / "model.safetensors")).keys()
    assert all(k.startswith("transformer.") for k in names)
    assert not any(re.search(r"\.attn\.(masked_)?bias$", k) for k in names)
    assert "n_ctx" not in json.loads((hf_folder / "config.json").read_text())
    hf = gpt2np.load(hf_folder)
    assert hf.config == official.config
    a, b = flat(official.params), flat(hf.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert hf.params.lm_head_weight is None
    ids = np.arange(20)
    np.testing.assert_array_equal(hf.forward(ids).logits, official.forward(ids).logits)


def test_lm_head_equal_to_wte_is_dropped(make_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(make_checkpoint(layout="hf", seed=4))

    def add_tied_head(t):
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    rewrite_tensors(folder, add_tied_head)
    m = gpt2np.load(folder)
    assert m.params.lm_head_weight is None
    assert m.params.unembed is m.params.wte


def test_untied_lm_head_is_kept_and_used(make_checkpoint):
    folder = make_checkpoint(layout="hf", seed=5, untied_head=True)
    head = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    m = gpt2np.load(folder)
    assert m.params.lm_head_weight is not None
    np.testing.assert_array_equal(m.params.lm_head_weight, head)
    assert not np.array_equal(head, m.params.wte)
    tr = m.forward(np.arange(10))
    x = tr.resid[-1].astype(np.float64)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + m.config.layer_norm_epsilon)
    ref = (x * m.params.ln_f_weight + m.params.ln_f_bias) @ head.T.astype(np.float64)
    assert np.abs(tr.logits - ref).max() < 1e-5 * np.abs(ref).max()


def test_float16_tensors_are_converted(tiny_checkpoint, copy_checkpoint, tiny_model):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_tensors(folder, lambda t: {k: v.astype(np.float16) for k, v in t.items()})
    half = load_file(str(folder / "model.safetensors"))
    assert half["wte.weight"].dtype == np.float16
    m = gpt2np.load(folder)
    for k, v in flat(m.params).items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, half[k].astype(np.float32), err_msg=k)
    # float16 rounding only: close to the float32 model
    np.testing.assert_allclose(m.params.wte, tiny_model.params.wte, rtol=1e-3, atol=1e-6)


def write_safetensors_by_hand(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    """A safetensors file written from the format's definition: u64 header length, JSON header, data."""
    header, data, offset = {"__metadata__": {"format": "pt"}}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_bfloat16_tensors_are_converted(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    stored = load_file(str(folder / "model.safetensors"))
    # bfloat16 is the top 16 bits of a float32: keep those bits, so the expected values are exact
    expected = {k: (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for k, v in stored.items()}
    write_safetensors_by_hand(folder / "model.safetensors", {
        k: ("BF16", v.shape, (v.view(np.uint32) >> 16).astype("<u2").tobytes()) for k, v in expected.items()})
    m = gpt2np.load(folder)
    for k, v in flat(m.params).items():
        assert v.dtype == np.float32, k
        np.testing.assert_array_equal(v, expected[k], err_msg=k)
    assert np.abs(m.params.wte).max() > 0  # not all zeros


def test_unsupported_dtype_is_an_error(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_tensors(folder, lambda t: t.update({"wpe.weight": t["wpe.weight"].astype(np.int32)}))
    with pytest.raises(ValueError, match=r"tensor wpe.weight has dtype I32; gpt2np reads F32, F16, BF16, F64"):
        gpt2np.load(folder)


# ---------------------------------------------------------------------------------------------
# bad folders and files


@pytest.mark.parametrize("missing", FILES)
def test_missing_file_in_folder(tiny_checkpoint, copy_checkpoint, missing):
    folder = copy_checkpoint(tiny_checkpoint)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint folder .* is missing {re.escape(missing)}\.$"):
        gpt2np.load(folder)


def write_malicious_pickle(path: Path, sentinel: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))  # runs if anything ever unpickles the file
    path.write_bytes(pickle.dumps(Boom()))


def test_folder_with_only_pytorch_model_bin(tmp_path):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    sentinel = tmp_path / "unpickled"
    write_malicious_pickle(folder / "pytorch_model.bin", sentinel)
    with pytest.raises(FileNotFoundError, match=r"is missing config.json, model.safetensors, vocab.json, merges.txt\. "
                                                r"It has pytorch_model.bin, which gpt2np never reads: unpickling .*"
                                                r"arbitrary code\. Convert it once with transformers .*save_pretrained"):
        gpt2np.load(folder)
    assert not sentinel.exists()


def test_folder_with_pytorch_model_bin_instead_of_safetensors(tiny_checkpoint, copy_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint)
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "unpickled"
    write_malicious_pickle(folder / "pytorch_model.bin", sentinel)
    with pytest.raises(FileNotFoundError, match=r"is missing model.safetensors\. It has pytorch_model.bin, which "
                                                r"gpt2np never reads.*download the model.safetensors"):
        gpt2np.load(folder)
    assert not sentinel.exists()


def test_a_file_instead_of_a_folder(tiny_checkpoint):
    with pytest.raises(NotADirectoryError, match=r"model.safetensors is a file; pass the folder that holds config.json"):
        gpt2np.load(tiny_checkpoint / "model.safetensors")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(tiny_checkpoint, copy_checkpoint, keep):
    folder = copy_checkpoint(tiny_checkpoint)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"model.safetensors is truncated: {int(len(data) * keep)} bytes on disk, "
                                         rf"its header promises {len(data)}; .*download it again"):
        gpt2np.load(folder)


@pytest.mark.parametrize("content,message", [
    (b"", r"is truncated \(0 bytes\): not a safetensors file"),
    (b"\x10\x00\x00", r"is truncated \(3 bytes\)"),
    (b"PK\x03\x04 this is a zip file, not safetensors" * 3, r"is not a safetensors file \(header length \d+ for a "),
    (struct.pack("<Q", 12) + b"{not json!!}", r"has an unreadable safetensors header"),
])
def test_not_a_safetensors_file(tiny_checkpoint, copy_checkpoint, content, message):
    folder = copy_checkpoint(tiny_checkpoint)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        gpt2np.load(folder)


def test_tensor_of_wrong_shape(tiny_checkpoint, copy_checkpoint, tiny_config):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_tensors(folder, lambda t: t.update({"h.1.mlp.c_fc.weight": np.ascontiguousarray(t["h.1.mlp.c_fc.weight"].T)}))
    D, F = tiny_config.n_embd, tiny_config.d_mlp
    with pytest.raises(ValueError, match=rf"tensor h.1.mlp.c_fc.weight has shape \[{F}, {D}\], config.json implies "
                                         rf"\[{D}, {F}\]; the config and the weights do not belong together"):
        gpt2np.load(folder)


def test_config_that_does_not_fit_the_weights(tiny_checkpoint, copy_checkpoint, tiny_config):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_config(folder, n_positions=32, n_ctx=32)
    with pytest.raises(ValueError, match=rf"tensor wpe.weight has shape \[64, {tiny_config.n_embd}\], config.json "
                                         rf"implies \[32, {tiny_config.n_embd}\]"):
        gpt2np.load(folder)


def test_missing_tensors(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_tensors(folder, lambda t: t.pop("h.1.attn.c_proj.bias"))
    with pytest.raises(ValueError, match=r"lacks tensors h.1.attn.c_proj.bias that config.json \(n_layer=3\) requires"):
        gpt2np.load(folder)
    rewrite_config(folder, n_layer=5)  # two blocks more than stored: 25 tensors missing
    with pytest.raises(ValueError, match=r"lacks tensors h.1.attn.c_proj.bias, h.3.ln_1.weight, h.3.ln_1.bias and "
                                         r"22 more that config.json \(n_layer=5\) requires"):
        gpt2np.load(folder)


def test_extra_tensors(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_config(folder, n_layer=2)
    with pytest.raises(ValueError, match=r"holds tensors a GPT-2 does not have: h.2.\S+, .*check config.json \(n_layer\)"):
        gpt2np.load(folder)


@pytest.mark.parametrize("change,error,message", [
    ({"vocab_size": 399}, ValueError, r"the tokenizer has 400 tokens but config.json says vocab_size=399"),
    ({"activation_function": "gelu"}, ValueError, r'activation_function="gelu" is not implemented by gpt2np \(GPT-2.s tanh GELU only'),
    ({"n_head": 5}, ValueError, r"n_embd=48 is not divisible by n_head=5"),
    ({"n_embd": None}, ValueError, r"config.json lacks n_embd: is this a GPT-2 config.json\?"),
])
def test_bad_config(tiny_checkpoint, copy_checkpoint, change, error, message):
    folder = copy_checkpoint(tiny_checkpoint)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=message):
        gpt2np.load(folder)


def test_config_that_is_not_json(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    (folder / "config.json").write_text("n_layer: 3\n")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        gpt2np.load(folder)


# ---------------------------------------------------------------------------------------------
# names, offline, downloads (never the network)


@pytest.fixture
def no_network(monkeypatch):
    """Make any download attempt fail the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download: {args} {kwargs}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.fixture
def fake_hub(monkeypatch, tiny_checkpoint):
    """A fake ``snapshot_download`` over a repo that also holds other weight formats; it honours
    ``allow_patterns`` as the real one does. ``fake_hub.mode``: "ok", "nothing", "partial", "raise"."""
    import huggingface_hub

    repo = {f: (tiny_checkpoint / f).read_bytes() for f in FILES}
    repo |= {"pytorch_model.bin": b"pickle", "tf_model.h5": b"h5", "flax_model.msgpack": b"m", "64-8bits.tflite": b"t",
             "onnx/decoder_model.onnx": b"o", "README.md": b"# gpt2", "generation_config.json": b"{}"}

    class Hub:
        mode = "ok"
        calls: list = []

        def snapshot_download(self, repo_id, *, local_dir, allow_patterns=None, revision=None, **kwargs):
            self.calls.append({"repo_id": repo_id, "local_dir": Path(local_dir), "allow_patterns": allow_patterns,
                               "revision": revision, **kwargs})
            if self.mode == "raise":
                raise OSError("simulated: the hub answered 503")
            wanted = [f for f in repo if allow_patterns is None or any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
            if self.mode == "nothing":  # what the real one does when the hub is unreachable
                wanted = []
            if self.mode == "partial":
                wanted = wanted[:2]
            for f in wanted:
                (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / f).write_bytes(repo[f])
            return str(local_dir)

    hub = Hub()
    hub.calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.delenv("GPT2NP_REVISION", raising=False)
    monkeypatch.delenv("GPT2NP_OFFLINE", raising=False)
    return hub


def test_unknown_model_name(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"'gpt-5' is neither a checkpoint folder nor a known model name "
                                                r"\(gpt2, gpt2-medium, gpt2-large, gpt2-xl\)"):
        gpt2np.load("gpt-5", weights_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown model name 'gpt-5': choose one of gpt2, gpt2-medium"):
        gpt2np.download("gpt-5", root=tmp_path)


def test_offline_missing_checkpoint_fails_at_once(tmp_path, no_network):
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"gpt2-xl is not in {re.escape(str(tmp_path / 'gpt2-xl'))} \(missing "
                                                r"config.json, model.safetensors, vocab.json, merges.txt\) and "
                                                r"downloads are off"):
        gpt2np.load("openai-community/gpt2-xl", weights_dir=tmp_path, offline=True)
    assert time.perf_counter() - t0 < 1.0


def test_offline_by_environment_and_weights_dir_by_environment(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("GPT2NP_OFFLINE", "1")
    monkeypatch.setenv("GPT2NP_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match=rf"gpt2 is not in {re.escape(str(tmp_path / 'w' / 'gpt2'))} .*"
                                                r"downloads are off"):
        gpt2np.load("gpt2")


def test_offline_partial_checkpoint_names_what_is_missing(tmp_path, tiny_checkpoint, no_network):
    shutil.copytree(tiny_checkpoint, tmp_path / "gpt2-medium")
    (tmp_path / "gpt2-medium" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"gpt2-medium is not in .* \(missing model.safetensors\)"):
        gpt2np.load("gpt2-medium", weights_dir=tmp_path, offline=True)


def test_named_checkpoint_on_disk_loads_offline(tmp_path, tiny_checkpoint, tiny_model, no_network):
    shutil.copytree(tiny_checkpoint, tmp_path / "gpt2")
    for name in ("gpt2", "openai-community/gpt2"):
        m = gpt2np.load(name, weights_dir=tmp_path, offline=True)
        assert m.name == "gpt2" and m.path == tmp_path / "gpt2"
        np.testing.assert_array_equal(m.params.wte, tiny_model.params.wte)


def test_download_fetches_only_the_four_files(tmp_path, fake_hub, tiny_model):
    m = gpt2np.load("gpt2", weights_dir=tmp_path)
    assert len(fake_hub.calls) == 1
    call = fake_hub.calls[0]
    assert call["repo_id"] == "openai-community/gpt2"
    assert call["local_dir"] == tmp_path / "gpt2"
    assert sorted(call["allow_patterns"]) == sorted(["config.json", "model*.safetensors", "model.safetensors.index.json",
                                                     "vocab.json", "merges.txt"])  # the index and shards if sharded
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == sorted(FILES)
    np.testing.assert_array_equal(m.params.wte, tiny_model.params.wte)
    gpt2np.load("gpt2", weights_dir=tmp_path)  # complete now: no second download
    assert len(fake_hub.calls) == 1


def test_download_revision(tmp_path, fake_hub, monkeypatch):
    gpt2np.download("openai-community/gpt2-large", root=tmp_path, revision="0123abc")
    assert fake_hub.calls[-1]["revision"] == "0123abc"
    assert fake_hub.calls[-1]["repo_id"] == "openai-community/gpt2-large"
    monkeypatch.setenv("GPT2NP_REVISION", "feedbeef")
    gpt2np.download("gpt2-large", root=tmp_path)
    assert fake_hub.calls[-1]["revision"] == "feedbeef"


def test_download_that_returns_without_the_files(tmp_path, fake_hub):
    fake_hub.mode = "nothing"
    with pytest.raises(ConnectionError, match=r"downloading gpt2 into .* did not complete \(missing config.json, "
                                              r"model.safetensors, vocab.json, merges.txt\); check the network"):
        gpt2np.load("gpt2", weights_dir=tmp_path)
    fake_hub.mode = "partial"
    with pytest.raises(ConnectionError, match=r"did not complete \(missing vocab.json, merges.txt\)"):
        gpt2np.download("gpt2", root=tmp_path)


def test_download_that_raises(tmp_path, fake_hub):
    fake_hub.mode = "raise"
    with pytest.raises(ConnectionError, match=r"downloading gpt2-medium into .* failed: simulated: the hub answered 503") as e:
        gpt2np.load("gpt2-medium", weights_dir=tmp_path)
    assert isinstance(e.value.__cause__, OSError)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script(tmp_path, fake_hub, capsys):
    script = load_script("download")
    assert script.main(["gpt2", "openai-community/gpt2", "--weights-dir", str(tmp_path), "--revision", "abc"]) == 0
    assert [c["repo_id"] for c in fake_hub.calls] == ["openai-community/gpt2"]  # the same model once
    assert fake_hub.calls[0]["revision"] == "abc" and not missing(tmp_path / "gpt2")
    assert script.main(["gpt2", "--weights-dir", str(tmp_path)]) == 0
    assert len(fake_hub.calls) == 1 and "already complete" in capsys.readouterr().out
    assert script.main(["all", "--weights-dir", str(tmp_path)]) == 0
    assert [c["repo_id"] for c in fake_hub.calls[1:]] == [f"openai-community/{n}" for n in gpt2np.SIZES if n != "gpt2"]
    fake_hub.mode = "nothing"
    assert script.main(["gpt2", "--force", "--weights-dir", str(tmp_path / "other")]) == 1
    assert "did not complete" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        script.main(["gpt-5", "--weights-dir", str(tmp_path)])
    assert e.value.code == 2 and "unknown model name 'gpt-5'" in capsys.readouterr().err


def missing(folder: Path) -> list[str]:
    return [f for f in FILES if not (folder / f).is_file()]


# ---------------------------------------------------------------------------------------------
# bad token ids


@pytest.mark.parametrize("ids,error,message", [
    ([1.0, 2.0], TypeError, r"token ids must be integers, got dtype float64; use model.encode\(text\)"),
    (np.array([True, False]), TypeError, r"token ids must be integers, got dtype bool"),
    (["a", "b"], TypeError, r"token ids must be integers"),
    ("hello", TypeError, r"token ids must be integers"),
    ([[1, 2], [3, 4]], ValueError, r"token ids must be one sequence of shape \[T\], got shape \[2, 2\]"),
    (7, ValueError, r"token ids must be one sequence of shape \[T\], got shape \[\]"),
    ([], ValueError, r"token ids are empty"),
    (np.array([], np.int64), ValueError, r"token ids are empty: give at least one token"),
    (np.zeros(65, np.int64), ValueError, r"65 tokens exceed the context of 64 positions"),
    ([1, 2, 400], ValueError, r"token id 400 at position 2 is outside the vocabulary \[0, 400\)"),
    ([5, -1], ValueError, r"token id -1 at position 1 is outside the vocabulary"),
])
def test_bad_ids(tiny_model, ids, error, message):
    with pytest.raises(error, match=message):
        tiny_model.forward(ids)


def test_ids_at_the_limits_are_accepted(tiny_model):
    c = tiny_model.config
    tr = tiny_model.forward(np.full(c.n_positions, c.vocab_size - 1))
    assert tr.logits.shape == (c.n_positions, c.vocab_size)
    assert tiny_model.forward([0]).logits.shape == (1, c.vocab_size)


def test_read_params_reads_into_float32_without_the_tokenizer(tiny_checkpoint, tiny_config, tiny_model):
    p = read_params(tiny_checkpoint / "model.safetensors", tiny_config)
    np.testing.assert_array_equal(p.h[-1].mlp_c_proj_weight, tiny_model.params.h[-1].mlp_c_proj_weight)


# ---------------------------------------------------------------------------------------------
# safetensors headers that do not describe their file (the safetensors library refuses them too)


def rewrite_header(path: Path, edit, extra: bytes = b"") -> None:
    """Rewrite a safetensors file's header with ``edit(header)`` (in place), keep its data, append ``extra``."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:] + extra)


def last_tensor(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def share_bytes(a, b):
    """The later of two tensors of one size given the earlier one's data_offsets."""
    def edit(h):
        first, later = sorted([a, b], key=lambda k: h[k]["data_offsets"][0])
        h[later]["data_offsets"] = h[first]["data_offsets"]
    return edit


def set_offsets(name, offsets):
    def edit(h):
        h[name]["data_offsets"] = offsets(h)
    return edit


@pytest.mark.parametrize("edit,extra,message", [
    # a span shorter than the shape: read today as the next tensor's bytes, or zeros at the end
    (set_offsets("ln_f.bias", lambda h: [h["ln_f.bias"]["data_offsets"][0], h["ln_f.bias"]["data_offsets"][0] + 4]),
     b"", r"tensor ln_f.bias's data_offsets \[\d+, \d+\] hold 4 bytes, but shape \[48\] in F32 takes 192; "
          r"the header does not describe the file"),
    (lambda h: h["h.2.mlp.c_fc.bias"].update(dtype="F16"), b"",
     r"tensor h.2.mlp.c_fc.bias's data_offsets \[\d+, \d+\] hold 768 bytes, but shape \[192\] in F16 takes 384"),
    (lambda h: h["wpe.weight"].update(shape=[32, 48]), b"",
     r"tensor wpe.weight's data_offsets .* hold 12288 bytes, but shape \[32, 48\] in F32 takes 6144"),
    # end before begin
    (set_offsets("h.0.ln_1.bias", lambda h: h["h.0.ln_1.bias"]["data_offsets"][::-1]), b"",
     r"tensor h.0.ln_1.bias's data_offsets \[(\d+), \d+\] hold -192 bytes"),
    # two tensors on the same bytes
    (share_bytes("h.1.ln_2.bias", "h.1.ln_2.weight"), b"",
     r"tensor h.1.ln_2.(bias|weight)'s data_offsets \[\d+, \d+\] overlaps tensor h.1.ln_2.(bias|weight)'s, which "
     r"ends at \d+"),
    # a hole before the last tensor, the file as long as the header says
    (lambda h: h[last_tensor(h)].update(data_offsets=[o + 8 for o in h[last_tensor(h)]["data_offsets"]]), b"\0" * 8,
     r"tensor \S+'s data_offsets \[\d+, \d+\] starts 8 bytes after the end of tensor \S+'s"),
    # offsets past the end of the file
    (lambda h: h[last_tensor(h)].update(data_offsets=[o + 10**6 for o in h[last_tensor(h)]["data_offsets"]]), b"",
     r" is truncated: \d+ bytes on disk, its header promises \d+"),
    # bytes after the last tensor
    (lambda h: None, b"\0" * 16, r" has 16 bytes after its last tensor that the header does not describe"),
], ids=["short-span", "dtype", "shape", "reversed", "overlap", "gap", "past-the-end", "trailing-bytes"])
def test_header_that_does_not_describe_the_file(tiny_checkpoint, copy_checkpoint, edit, extra, message):
    folder = copy_checkpoint(tiny_checkpoint)
    path = folder / "model.safetensors"
    rewrite_header(path, edit, extra)
    with pytest.raises(Exception):  # the reference: the safetensors library refuses the file as well
        load_file(str(path))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}.*{message}") as e:
        gpt2np.load(folder)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message):
        gpt2np.api.check_folder(folder)


def test_header_entry_that_is_not_a_tensor(tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_header(folder / "model.safetensors", lambda h: h["wte.weight"].update(shape="big"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor wte.weight has an unreadable header entry"):
        gpt2np.load(folder)
    rewrite_header(folder / "model.safetensors", lambda h: h["wte.weight"].update(shape=[400, 48], dtype="F33"))
    with pytest.raises(ValueError, match=r"tensor wte.weight has dtype 'F33', which safetensors does not define"):
        gpt2np.load(folder)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints, as save_pretrained(..., max_shard_size=...) writes them


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, torch, transformers, tiny_checkpoint):
    """transformers' GPT2LMHeadModel of the tiny shape, saved in shards of at most 150 kB, and the model."""
    torch.manual_seed(0)
    c = json.loads((tiny_checkpoint / "config.json").read_text())
    config = transformers.GPT2Config(**{k: c[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")})
    ref = transformers.GPT2LMHeadModel(config).float().eval()
    folder = tmp_path_factory.mktemp("sharded")
    ref.save_pretrained(folder, max_shard_size="150KB")
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_checkpoint / f, folder / f)
    return folder, ref


def shard_names(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / weights.INDEX).read_text())["weight_map"].values()))


def test_sharded_checkpoint_loads_and_matches_transformers(sharded, reference_run, relative_error, monkeypatch):
    folder, ref = sharded
    shards = shard_names(folder)
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    assert shards == sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    headers = []
    read_header = weights.read_header
    monkeypatch.setattr(weights, "read_header", lambda path: headers.append(Path(path).name) or read_header(path))
    m = gpt2np.load(folder)
    assert sorted(headers) == shards  # every shard's header read once
    stored = {}
    for s in shards:
        stored |= {k.removeprefix("transformer."): v for k, v in load_file(str(folder / s)).items()}
    for k, v in flat(m.params).items():  # every tensor read from its shard, exactly
        np.testing.assert_array_equal(v, stored[k], err_msg=k)
    ids = np.arange(0, 400, 7)[:40]
    logits, _ = reference_run(ref, ids)
    assert relative_error(m.forward(ids).logits, logits) < 1e-5


@pytest.mark.parametrize("readers", [1, 3])
def test_sharded_checkpoint_with_parallel_readers(sharded, monkeypatch, readers):
    folder, _ = sharded
    monkeypatch.setattr(weights, "_cores", lambda: readers)
    m = gpt2np.load(folder)
    stored = {}
    for s in shard_names(folder):
        stored |= {k.removeprefix("transformer."): v for k, v in load_file(str(folder / s)).items()}
    for k, v in flat(m.params).items():
        np.testing.assert_array_equal(v, stored[k], err_msg=k)


def edit_index(folder: Path, edit) -> None:
    path = folder / weights.INDEX
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_sharded_checkpoint_missing_a_shard(sharded, copy_checkpoint):
    folder = copy_checkpoint(sharded[0])
    last = shard_names(folder)[-1]
    (folder / last).unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint folder .* is missing {re.escape(last)}\.$"):
        gpt2np.load(folder)
    with pytest.raises(FileNotFoundError, match=rf"index.json names shards that are not in the folder: {last}; "):
        read_params(folder / weights.INDEX, gpt2np.api.Config.from_json(folder / "config.json"))


def move_one(weight_map):
    """Put the first tensor of the first shard into the second shard."""
    first, second = sorted(set(weight_map.values()))[:2]
    name = next(k for k, v in weight_map.items() if v == first)
    weight_map[name] = second


@pytest.mark.parametrize("edit,message", [
    (move_one, r"index.json places tensor transformer\.\S+ in model-00002-of-\d+\.safetensors, which does not hold it; "
               r"the index and the shards do not belong together"),
    (lambda m: m.pop("transformer.h.1.mlp.c_fc.bias"),
     r"model-\d+-of-\d+\.safetensors holds tensor transformer.h.1.mlp.c_fc.bias, but model.safetensors.index.json "
     r"does not list it; the index and the shards do not belong together"),
])
def test_index_that_disagrees_with_the_shards(sharded, copy_checkpoint, edit, message):
    folder = copy_checkpoint(sharded[0])
    edit_index(folder, edit)
    with pytest.raises(ValueError, match=message):
        gpt2np.load(folder)


def test_index_tensor_in_two_shards(sharded, copy_checkpoint):
    folder = copy_checkpoint(sharded[0])
    first, second = shard_names(folder)[:2]
    a, b = load_file(str(folder / first)), load_file(str(folder / second))
    name = next(iter(a))
    b[name] = a[name]  # the second shard holds a copy: the index places it in only one of them
    save_file(b, str(folder / second), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{second} holds tensor {re.escape(name)}, but model.safetensors.index.json "
                                         rf"places it in {first}"):
        gpt2np.load(folder)


def test_index_that_is_not_an_index(sharded, copy_checkpoint):
    folder = copy_checkpoint(sharded[0])
    (folder / weights.INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=r"model.safetensors.index.json is not valid JSON"):
        gpt2np.load(folder)
    (folder / weights.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"wte.weight": "../model.bin"}}))
    with pytest.raises(ValueError, match=r"names shard '../model.bin': shards must be .safetensors files beside the index"):
        gpt2np.load(folder)


def test_sharded_checkpoint_makes_the_checks_of_one_file(sharded, copy_checkpoint, tiny_config):
    folder = copy_checkpoint(sharded[0])
    shard = (folder / weights.INDEX).read_text() and json.loads((folder / weights.INDEX).read_text())["weight_map"][
        "transformer.h.1.mlp.c_fc.weight"]
    t = load_file(str(folder / shard))
    t["transformer.h.1.mlp.c_fc.weight"] = np.ascontiguousarray(t["transformer.h.1.mlp.c_fc.weight"].T)
    save_file(t, str(folder / shard), metadata={"format": "pt"})
    D, F = tiny_config.n_embd, tiny_config.d_mlp
    with pytest.raises(ValueError, match=rf"{re.escape(shard)}: tensor h.1.mlp.c_fc.weight has shape \[{F}, {D}\], "
                                         rf"config.json implies \[{D}, {F}\]; the config and the weights do not belong"):
        gpt2np.load(folder)
    rewrite_config(folder, n_layer=4)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json lacks tensors h.3.ln_1.weight, .* that "
                                         r"config.json \(n_layer=4\) requires"):
        gpt2np.load(folder)


def test_folder_with_both_one_file_and_shards_is_ambiguous(sharded, tiny_checkpoint, copy_checkpoint):
    folder = copy_checkpoint(sharded[0])
    shutil.copyfile(tiny_checkpoint / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"holds both model.safetensors and model.safetensors.index.json, so its "
                                         r"weights are ambiguous; delete one of them"):
        gpt2np.load(folder)


def test_download_of_a_sharded_repository(tmp_path, sharded, monkeypatch):
    """A hub repo whose weights are sharded: the index and every shard come down, nothing else."""
    import huggingface_hub

    folder, _ = sharded
    repo = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    repo |= {"pytorch_model-00001-of-00002.bin": b"pickle", "pytorch_model.bin.index.json": b"{}",
             "tf_model.h5": b"h5", "onnx/model.onnx": b"o", "README.md": b"# gpt2"}
    calls, drop = [], []

    def snapshot_download(repo_id, *, local_dir, allow_patterns=None, revision=None, **kwargs):
        calls.append(allow_patterns)
        for f, data in repo.items():
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns) and f not in drop:
                (Path(local_dir) / f).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / f).write_bytes(data)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("GPT2NP_OFFLINE", raising=False)
    m = gpt2np.load("gpt2", weights_dir=tmp_path / "w")
    assert len(calls) == 1
    got = sorted(p.name for p in (tmp_path / "w" / "gpt2").iterdir())
    assert got == sorted(["config.json", "vocab.json", "merges.txt", weights.INDEX, *shard_names(folder)])
    np.testing.assert_array_equal(m.params.wte, gpt2np.load(folder).params.wte)
    drop.append(shard_names(folder)[-1])  # the hub answers without one shard
    with pytest.raises(ConnectionError, match=rf"did not complete \(missing {shard_names(folder)[-1]}\)"):
        gpt2np.download("gpt2-medium", root=tmp_path / "w")


# ---------------------------------------------------------------------------------------------
# a vocabulary larger than the tokenizer's: an added pad token, an unembedding padded to 64


@pytest.fixture(scope="module")
def padded(tmp_path_factory, torch, transformers, real_tokenizer_dir):
    """``padded(kind)``: (folder, transformers model) of a small GPT-2 with the real tokenizer, its embedding
    resized as users do: "pad" adds [PAD] (V = 50258, tokenizer saved by transformers beside the
    weights), "64" pads V to a multiple of 64 (V = 50304, vocab.json and merges.txt only)."""
    made = {}

    def make(kind):
        if kind in made:
            return made[kind]
        torch.manual_seed(1)
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
        ref = transformers.GPT2LMHeadModel(config)
        folder = tmp_path_factory.mktemp(f"vocab-{kind}")
        if kind == "pad":
            tok = transformers.GPT2Tokenizer.from_pretrained(str(real_tokenizer_dir))
            tok.add_special_tokens({"pad_token": "[PAD]"})
            ref.resize_token_embeddings(len(tok))
            tok.save_pretrained(str(folder))
        else:
            ref.resize_token_embeddings(50257, pad_to_multiple_of=64)
            for f in ("vocab.json", "merges.txt"):
                shutil.copyfile(real_tokenizer_dir / f, folder / f)
        ref.save_pretrained(folder)
        made[kind] = folder, ref.float().eval()
        return made[kind]
    return make


@pytest.mark.parametrize("kind,V", [("pad", 50258), ("64", 50304)])
def test_vocabulary_larger_than_the_tokenizer(padded, reference_run, relative_error, kind, V):
    folder, ref = padded(kind)
    m = gpt2np.load(folder)
    assert m.config.vocab_size == V and m.params.wte.shape == (V, 32)
    ids = np.array([15496, 995, 50256, V - 1, 11, V - 2, 0])
    logits, _ = reference_run(ref, ids)
    assert logits.shape == (7, V)
    got = m.forward(ids).logits
    assert got.shape == (7, V) and relative_error(got, logits) < 1e-5  # every column, as transformers computes it


def test_added_pad_token_reads_as_its_text(padded, transformers):
    folder, _ = padded("pad")
    m = gpt2np.load(folder)
    tok = transformers.GPT2Tokenizer.from_pretrained(str(folder))
    text = "Hello[PAD] world<|endoftext|>[PAD]"
    ids = m.encode(text)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"] and 50257 in ids.tolist()
    assert m.decode(ids) == tok.decode(ids.tolist()) == text
    assert m.tokens([50257, 15496]) == ["[PAD]", "Hello"]


def test_ids_without_text_read_as_their_number(padded):
    folder, _ = padded("64")
    m = gpt2np.load(folder)
    assert m.tokens([15496, 50257, 50303]) == ["Hello", "<id 50257>", "<id 50303>"]
    assert m.decode([15496, 50300, 995]) == "Hello<id 50300> world"
    lens = gpt2np.logit_lens(m, m.forward([15496, 50300, 995]), k=2)
    assert lens.tokens.tolist() == ["Hello", "<id 50300>", " world"]  # what tables and figures show
    for i, t in zip(lens.top_ids.reshape(-1), lens.top_tokens.reshape(-1)):
        assert t == (f"<id {i}>" if i >= 50257 else m.tokens([i])[0])


@pytest.mark.parametrize("ids,bad,position", [([15496, 50304], 50304, 1), ([-1], -1, 0), ([10**6, 3], 10**6, 0)])
def test_decode_of_an_id_outside_the_model(padded, tiny_model, ids, bad, position):
    m = gpt2np.load(padded("64")[0])
    with pytest.raises(ValueError, match=rf"token id {bad} at position {position} is outside the vocabulary "
                                         r"\[0, 50304\)"):
        m.decode(ids)
    with pytest.raises(ValueError, match=rf"token id {bad} at position {position} is outside the vocabulary \[0, 50304\)"):
        m.tokens(ids)
    with pytest.raises(ValueError, match=r"token id 400 at position 0 is outside the vocabulary \[0, 400\)"):
        tiny_model.decode([400])


# ---------------------------------------------------------------------------------------------
# check_folder: every check of load, no tensor data read


def break_shape(folder):
    rewrite_tensors(folder, lambda t: t.update({"ln_f.bias": t["ln_f.bias"][:10].copy()}))


def break_header(folder):
    rewrite_header(folder / "model.safetensors", lambda h: h["wte.weight"].update(dtype="F16"))


@pytest.mark.parametrize("damage", [
    lambda f: rewrite_config(f, vocab_size=300), lambda f: rewrite_config(f, n_layer=4), break_shape, break_header,
    lambda f: (f / "merges.txt").write_text("#version: 0.2\nq z\n"), lambda f: (f / "config.json").write_text("{"),
    lambda f: (f / "vocab.json").unlink(), lambda f: (f / weights.INDEX).write_text("{}"),
], ids=["vocab", "n_layer", "shape", "header", "merges", "config", "no-vocab", "ambiguous"])
def test_check_folder_fails_as_load_fails(tiny_checkpoint, copy_checkpoint, damage):
    folder = copy_checkpoint(tiny_checkpoint)
    damage(folder)
    with pytest.raises((ValueError, OSError)) as loading:
        gpt2np.load(folder)
    with pytest.raises(type(loading.value)) as checking:
        gpt2np.api.check_folder(folder)
    assert str(checking.value) == str(loading.value)


def test_check_folder_reads_no_tensor_data(tiny_checkpoint, monkeypatch, tiny_config):
    def refuse(*args):
        raise AssertionError("check_folder read tensor data")
    monkeypatch.setattr(weights, "_read_into", refuse)
    assert gpt2np.api.check_folder(tiny_checkpoint) == tiny_config
    with pytest.raises(AssertionError, match="read tensor data"):
        gpt2np.load(tiny_checkpoint)
