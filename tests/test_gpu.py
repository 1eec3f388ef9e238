"""The GPU: choosing it, refusing it clearly, and (where CuPy and a GPU are usable) the same results on it.

The first part runs everywhere: CuPy is simulated with fake modules (missing, installed without a
usable GPU, a failing driver, and a working "GPU" backed by ``array_api_strict``). The second part
runs only where CuPy imports and a CUDA device is usable, and is skipped elsewhere.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import array_api_strict as xs
import numpy as np
import pytest

import gpt2np
from gpt2np import backend
from gpt2np.config import Config

from _strict import assert_same_result, host_conversion_blocked, is_strict


def _usable_cupy():
    try:
        return backend.gpu()
    except RuntimeError:
        return None


cp = _usable_cupy()
needs_gpu = pytest.mark.skipif(cp is None, reason="needs CuPy and a usable CUDA GPU")

IDS = np.array([0, 17, 399, 256, 5, 5, 42, 398, 1, 300, 12, 7], dtype=np.int64)  # [T = 12]


def fake_cupy(*, available: bool = True, count: int = 1, driver_error: str | None = None,
              version: int = 14) -> types.ModuleType:
    """A stand-in for ``cupy``: ``import cupy`` succeeds; arrays are ``array_api_strict`` arrays."""
    cupy = types.ModuleType("cupy")
    cupy.__version__ = f"{version}.0.0"
    if version >= 14:  # the array API functions CuPy 14 added to its main namespace
        cupy.permute_dims, cupy.concat, cupy.astype = xs.permute_dims, xs.concat, xs.astype

    def device_count():
        if driver_error:
            raise OSError(driver_error)  # CUDA errors come in several types
        return count

    cupy.cuda = types.SimpleNamespace(is_available=lambda: available,
                                      runtime=types.SimpleNamespace(getDeviceCount=device_count))
    cupy.float32 = np.float32
    cupy.zeros = lambda shape, dtype=None: types.SimpleNamespace(get=lambda: np.zeros(shape, dtype))
    cupy.asarray = xs.asarray
    return cupy


# ---------------------------------------------------------------------------------------------
# Runs everywhere


def test_missing_cupy_is_a_clear_error(monkeypatch, tiny_checkpoint):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    for call in (backend.gpu, lambda: backend.device_namespace("gpu"), lambda: backend.device_namespace("cuda"),
                 lambda: gpt2np.load(tiny_checkpoint, device="gpu")):
        with pytest.raises(RuntimeError, match=r'needs CuPy: pip install "gpt2np\[gpu\]"'):
            call()
    cpu = gpt2np.load(tiny_checkpoint)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        cpu.to("gpu")


@pytest.mark.parametrize("fake", [dict(available=False), dict(available=True, count=0)],
                         ids=["not-available", "no-device"])
def test_cupy_without_a_gpu_is_a_clear_error(monkeypatch, tiny_checkpoint, fake):
    """``import cupy`` succeeds on machines without a GPU: that must not count as a GPU."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(**fake))
    with pytest.raises(RuntimeError, match="no GPU is usable.*device='cpu'"):
        backend.gpu()
    with pytest.raises(RuntimeError, match="no GPU is usable"):
        gpt2np.load(tiny_checkpoint, device="gpu")


def test_cuda_driver_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver_error="cudaErrorInsufficientDriver"))
    with pytest.raises(RuntimeError, match="no GPU is usable.*cudaErrorInsufficientDriver"):
        backend.gpu()


def test_old_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(version=13))
    with pytest.raises(RuntimeError, match=r"CuPy 13.0.0 lacks permute_dims, concat, astype.*CuPy >= 14"):
        backend.gpu()


def test_gpu_error_comes_before_reading_anything(monkeypatch, tmp_path):
    """load(device="gpu") fails on the device first, not after reading gigabytes of weights."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="needs CuPy"):
        gpt2np.load(tmp_path / "no-such-checkpoint", device="gpu")


def test_unknown_device_is_an_error(tiny_checkpoint):
    for call in (lambda: backend.device_namespace("tpu"), lambda: gpt2np.load(tiny_checkpoint, device="tpu"),
                 lambda: gpt2np.load(tiny_checkpoint).to("tpu")):
        with pytest.raises(ValueError, match=r"unknown device 'tpu': use 'cpu' or 'gpu'"):
            call()
    assert backend.device_namespace("cpu") is np


def test_load_on_a_simulated_gpu(monkeypatch, tiny_checkpoint):
    """The whole device="gpu" plumbing, with a fake CuPy whose arrays are array_api_strict's."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    cpu = gpt2np.load(tiny_checkpoint)
    dev = gpt2np.load(tiny_checkpoint, device="gpu")
    assert dev.device == "gpu" and is_strict(dev.params.wte) and is_strict(dev.params.h[-1].mlp_c_proj_bias)
    assert cpu.to("gpu").device == "gpu"
    with host_conversion_blocked():
        tr = dev.forward(IDS, sublayers=True, patterns=True)
        home = tr.numpy()
    assert is_strict(tr.logits) and type(home.logits) is np.ndarray
    assert_same_result(home, cpu.forward(IDS, sublayers=True, patterns=True), rtol=1e-5)
    back = dev.to("cpu")
    assert back.device == "cpu" and type(back.params.wte) is np.ndarray
    np.testing.assert_array_equal(back.params.h[0].attn_c_attn_weight, cpu.params.h[0].attn_c_attn_weight)


def test_cupy_is_imported_only_when_the_gpu_is_asked_for(tiny_checkpoint):
    modules = ["gpt2np"] + [f"gpt2np.{m}" for m in ("lens", "generate", "plot", "cli")
                            if importlib.util.find_spec(f"gpt2np.{m}") is not None]
    code = (f"import sys, {', '.join(modules)}\n"
            f"m = gpt2np.load({str(tiny_checkpoint)!r})\n"
            "m.forward([1, 2, 3], sublayers=True, patterns=True).numpy()\n"
            "m.to('cpu')\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported on the CPU path'\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------------------------------------
# Needs CuPy and a GPU

GPU_RTOL = 1e-4  # cuBLAS sums in another order than NumPy's BLAS; relative to each field's largest value


def _on_gpu(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


@pytest.fixture(scope="module", params=["tiny", "wider"])
def pair(request, make_checkpoint):
    """(cpu model, gpu model) of the same checkpoint."""
    if cp is None:
        pytest.skip("needs CuPy and a usable CUDA GPU")
    if request.param == "tiny":
        folder = make_checkpoint()
    else:  # GPT-2-like magnitudes and widths where cuBLAS picks real tiled kernels
        folder = make_checkpoint(Config(n_layer=4, n_head=8, n_embd=512, n_positions=256, vocab_size=2000),
                                 scale=4.0, seed=2)
    return gpt2np.load(folder), gpt2np.load(folder, device="gpu")


def _ids(model, T=None):
    T = T or model.config.n_positions
    return np.random.default_rng(0).integers(0, model.config.vocab_size, T).astype(np.int64)


@needs_gpu
def test_gpu_weights(pair):
    cpu, gpu = pair
    assert gpu.device == "gpu" and gpu.to("gpu") is gpu
    for a, b in zip(_leaves(gpu.params), _leaves(cpu.params)):
        assert _on_gpu(a)
        host = cp.asnumpy(a)
        assert host.dtype == np.float32 and host.shape == b.shape
        np.testing.assert_array_equal(host, b)  # a copy, bit for bit
    back = gpu.to("cpu")
    assert back.device == "cpu"
    for a, b in zip(_leaves(back.params), _leaves(cpu.params)):
        assert type(a) is np.ndarray
        np.testing.assert_array_equal(a, b)
    assert _on_gpu(cpu.to("gpu").params.wte)


@needs_gpu
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "sublayers+patterns"])
def test_forward_on_gpu_matches_cpu(pair, extras):
    cpu, gpu = pair
    ids = _ids(cpu)
    want = cpu.forward(ids, sublayers=extras, patterns=extras)
    got = gpu.forward(ids, sublayers=extras, patterns=extras)
    for name in ("ids", "resid", "logits", "resid_mid", "attn_out", "mlp_out", "pattern"):
        value = getattr(got, name)
        assert (value is None) == (getattr(want, name) is None), name
        assert value is None or _on_gpu(value), name
    home = got.numpy()
    assert type(home.logits) is np.ndarray
    assert_same_result(home, want, rtol=GPU_RTOL)  # also: same dtypes (float32, ids int64)
    np.testing.assert_array_equal(home.logits.argmax(-1), want.logits.argmax(-1))


@needs_gpu
def test_generation_on_gpu_matches_cpu(pair):
    cpu, gpu = pair
    ids = _ids(cpu, 16)
    np.testing.assert_array_equal(gpu.generate(ids, 8, temperature=0), cpu.generate(ids, 8, temperature=0))
    got = gpu.score(ids)
    assert type(got) is np.ndarray
    np.testing.assert_allclose(got, cpu.score(ids), rtol=GPU_RTOL, atol=GPU_RTOL)


@needs_gpu
def test_lens_on_gpu_matches_cpu(pair):
    """The definition's loop on CuPy (what gpt2np.logit_lens runs there) against the fast NumPy path."""
    cpu, gpu = pair
    ids = _ids(cpu)
    for kw in (dict(), dict(sublayers=True, norm="norm"), dict(decoder_blocks=1, start=3, end=40)):
        got = gpt2np.logit_lens(gpu, gpu.forward(ids, sublayers=True), **kw)
        want = gpt2np.logit_lens(cpu, cpu.forward(ids, sublayers=True), **kw)
        # integer fields (top ids, ranks) exactly: a near-tie flipped by rounding would show here
        assert_same_result(got, want, rtol=GPU_RTOL)
    checks = gpt2np.self_check(gpu, gpu.forward(ids))
    assert max(checks.values()) < GPU_RTOL, checks


@needs_gpu
def test_heads_and_attribution_on_gpu_match_cpu(pair):
    """Per-head outputs and direct logit attribution from a GPU trace against the CPU's."""
    cpu, gpu = pair
    ids = _ids(cpu, 40)
    got, want = gpu.forward(ids, sublayers=True, heads=True), cpu.forward(ids, sublayers=True, heads=True)
    assert _on_gpu(got.heads)
    np.testing.assert_allclose(cp.asnumpy(got.heads), want.heads, rtol=GPU_RTOL, atol=GPU_RTOL * float(
        np.abs(want.heads).max()))
    a, b = gpt2np.attribute(gpu, got, 7, versus=3, heads=True), gpt2np.attribute(cpu, want, 7, versus=3, heads=True)
    assert a.labels == b.labels
    np.testing.assert_allclose(a.shares, b.shares, rtol=0, atol=GPU_RTOL * float(np.abs(b.shares).max()))


def _leaves(params) -> list:
    out = []
    params.map(lambda a: out.append(a) or a)
    return out
