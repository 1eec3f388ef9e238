"""The CPU proof that the forward pass is backend-clean: it runs unchanged on ``array_api_strict``
(the Python array API standard and nothing more), with implicit conversion to NumPy forbidden as on
CuPy, and gives the NumPy results. Any NumPy-only call on the hot path fails here, without a GPU."""
from __future__ import annotations

import math

import array_api_strict as xs
import numpy as np
import pytest

import gpt2np
from gpt2np import backend
from gpt2np import model as M
from gpt2np.config import Config

from _strict import StrictArray, assert_same_result, host_conversion_blocked, is_strict, strict_model

CHECKPOINTS = {
    # tied head, official layout, default init
    "tied": (Config(n_layer=2, n_head=3, n_embd=48, n_positions=64, vocab_size=400), dict(scale=1.0)),
    # separate lm_head, today's transformers layout, GPT-2-like magnitudes
    "untied": (Config(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=400),
               dict(scale=4.0, layout="hf", untied_head=True, seed=1)),
}
FIELDS = ("ids", "resid", "logits", "resid_mid", "attn_out", "mlp_out", "pattern")


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def tiny(request, make_checkpoint):
    config, kw = CHECKPOINTS[request.param]
    return gpt2np.load(make_checkpoint(config, **kw))


@pytest.fixture(scope="module")
def ids():
    return np.array([0, 17, 399, 256, 5, 5, 42, 398, 1, 300, 12, 7], dtype=np.int64)  # [T = 12]


# ---------------------------------------------------------------------------------------------
# The forward pass through array_api_strict


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "sublayers+patterns"])
def test_forward_on_strict_matches_numpy(tiny, ids, extras):
    want = tiny.forward(ids, sublayers=extras, patterns=extras)
    sm = strict_model(tiny)
    with host_conversion_blocked():
        got = sm.forward(ids, sublayers=extras, patterns=extras)
    for name in FIELDS:
        value = getattr(got, name)
        assert (value is None) == (getattr(want, name) is None), name
        assert value is None or is_strict(value), f"{name} left the strict namespace: {type(value)}"
    assert (got.resid_mid is None) == (not extras) and (got.pattern is None) == (not extras)
    assert_same_result(got.numpy(), want, rtol=1e-5)
    assert got.resid_pre.shape == want.resid_pre.shape and is_strict(got.resid_post)


def test_forward_function_on_strict_arrays(tiny, ids):
    """``model.forward`` itself (below the Model API) with strict params and strict ids."""
    sm = strict_model(tiny)
    with host_conversion_blocked():
        got = M.forward(sm.params, sm.config, xs.asarray(ids, dtype=xs.int64), sublayers=True, patterns=True)
    assert_same_result(got.numpy(), M.forward(tiny.params, tiny.config, ids, sublayers=True, patterns=True))


def test_forward_needs_no_newer_standard_than_2024_12(tiny, ids):
    """2024.12 is the first revision with Python scalars in ``where`` (the causal mask uses one);
    nothing later (2025.12) may be relied on."""
    with xs.ArrayAPIStrictFlags(api_version="2024.12"), host_conversion_blocked():
        got = strict_model(tiny).forward(ids, sublayers=True, patterns=True)
    assert_same_result(got.numpy(), tiny.forward(ids, sublayers=True, patterns=True))


@pytest.mark.parametrize("ns", ["numpy", "strict"])
def test_forward_stays_float32(tiny, ids, ns):
    """No silent float64 promotion anywhere (creation functions, Python scalars, masks)."""
    m = tiny if ns == "numpy" else strict_model(tiny)
    tr = m.forward(ids, sublayers=True, patterns=True)
    f32 = np.float32 if ns == "numpy" else xs.float32
    i64 = np.int64 if ns == "numpy" else xs.int64
    for name in FIELDS:
        assert getattr(tr, name).dtype == (i64 if name == "ids" else f32), name


def test_generation_path_with_past_on_strict(tiny):
    """The KV-cache path generation uses: a prefix, then one more token with ``past`` and ``start``,
    equals the full sequence, on strict arrays."""
    p, c = strict_model(tiny).params, tiny.config
    ids = xs.asarray([3, 1, 4, 1, 5, 9, 2], dtype=xs.int64)
    eps, blk = c.layer_norm_epsilon, p.h[0]
    with host_conversion_blocked():
        x = M.layer_norm(M.embed(p, ids), blk.ln_1_weight, blk.ln_1_bias, eps)  # [T, D]
        full, full_pattern, _, _ = M.attention(x, blk, c.n_head, c.attn_scale(0))
        head, _, past, _ = M.attention(x[:-1, :], blk, c.n_head, c.attn_scale(0))
        last, last_pattern, (k, v), _ = M.attention(x[-1:, :], blk, c.n_head, c.attn_scale(0), past=past)
        emb = M.embed(p, ids[-1:], start=6)  # [1, D]
    assert is_strict(last) and k.shape == (c.n_head, 7, c.d_head)
    np.testing.assert_allclose(np.from_dlpack(last), np.from_dlpack(full)[-1:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.from_dlpack(head), np.from_dlpack(full)[:-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.from_dlpack(last_pattern), np.from_dlpack(full_pattern)[:, -1:, :], atol=1e-6)
    np.testing.assert_array_equal(np.from_dlpack(emb), np.from_dlpack(M.embed(p, ids))[-1:])


def test_generation_on_strict_matches_numpy(tiny, ids):
    """Greedy and seeded sampling give the same tokens, and scoring the same log-probabilities."""
    sm = strict_model(tiny)
    with host_conversion_blocked():
        greedy = sm.generate(ids, 8, temperature=0)
        sampled = sm.generate(ids, 8, temperature=0.8, top_k=50, top_p=0.9, seed=3)
        logprobs = sm.score(ids)
    np.testing.assert_array_equal(greedy, tiny.generate(ids, 8, temperature=0))
    np.testing.assert_array_equal(sampled, tiny.generate(ids, 8, temperature=0.8, top_k=50, top_p=0.9, seed=3))
    assert type(logprobs) is np.ndarray and logprobs.dtype == np.float64
    np.testing.assert_allclose(logprobs, tiny.score(ids), rtol=1e-6, atol=1e-6)


def test_operations_on_strict_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 8)) * 3).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    sx, sw, sb = xs.asarray(x), xs.asarray(w), xs.asarray(b)
    with host_conversion_blocked():
        got = {"layer_norm": M.layer_norm(sx, sw, sb, 1e-5), "norm_only": M.layer_norm(sx, None, None, 1e-5),
               "gelu_new": M.gelu_new(sx), "softmax": M.softmax(sx), "softmax0": M.softmax(sx, axis=0)}
    want = {"layer_norm": M.layer_norm(x, w, b, 1e-5), "norm_only": M.layer_norm(x, None, None, 1e-5),
            "gelu_new": M.gelu_new(x), "softmax": M.softmax(x), "softmax0": M.softmax(x, axis=0)}
    assert all(is_strict(v) for v in got.values())
    assert_same_result({k: np.from_dlpack(v) for k, v in got.items()}, want, rtol=1e-6)


def test_host_conversion_blocked_catches_numpy_calls():
    """The guard itself: a NumPy function on a strict array fails inside it, works outside."""
    a = xs.asarray([1.0, 2.0], dtype=xs.float32)
    with host_conversion_blocked(), pytest.raises(TypeError):
        np.exp(a)
    with host_conversion_blocked():
        np.testing.assert_array_equal(backend.to_numpy(a), [1.0, 2.0])  # the explicit way back works
    np.testing.assert_array_equal(np.asarray(a), [1.0, 2.0])  # restored afterwards


# ---------------------------------------------------------------------------------------------
# The Model API with non-NumPy parameters


def test_model_forward_takes_ids_of_any_namespace(tiny, ids):
    sm = strict_model(tiny)
    want = tiny.forward(ids).logits
    for given in (ids, ids.tolist(), ids.astype(np.int32), xs.asarray(ids), xs.asarray(ids, dtype=xs.int32)):
        tr = sm.forward(given)
        assert is_strict(tr.ids) and tr.ids.dtype == xs.int64
        np.testing.assert_allclose(np.from_dlpack(tr.logits), want, rtol=1e-5, atol=1e-6)


def test_model_forward_checks_strict_ids(tiny):
    sm = strict_model(tiny)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sm.forward(xs.asarray([1, 400]))
    with pytest.raises(TypeError, match="must be integers"):
        sm.forward(xs.asarray([1.0, 2.0]))
    with pytest.raises(ValueError, match="one sequence"):
        sm.forward(xs.asarray([[1, 2]]))


def test_trace_numpy_brings_everything_home(tiny, ids):
    tr = strict_model(tiny).forward(ids, sublayers=True, patterns=True)
    with host_conversion_blocked():
        home = tr.numpy()
    for name in FIELDS:
        assert type(getattr(home, name)) is np.ndarray, name
    assert home.numpy().resid is home.resid  # NumPy passes through without a copy
    plain = strict_model(tiny).forward(ids).numpy()
    assert plain.pattern is None and plain.resid_mid is None


def test_to_numpy():
    a = np.arange(3.0, dtype=np.float32)
    assert backend.to_numpy(a) is a and backend.to_numpy(None) is None
    s = np.float32(2.5)  # NumPy reductions return scalars
    assert backend.to_numpy(s) is s and backend.to_numpy(3) == 3
    got = backend.to_numpy(xs.asarray([[1.0, 2.0]], dtype=xs.float32))
    assert type(got) is np.ndarray and got.dtype == np.float32 and got.shape == (1, 2)


def test_namespace_follows_the_arrays():
    assert backend.namespace(np.zeros(2)) is np
    assert backend.namespace(xs.asarray([1.0])) is xs
    assert backend.is_numpy(np.zeros(2)) and not backend.is_numpy(xs.asarray([1.0]))
    with pytest.raises(TypeError, match="expected an array.*got list"):
        backend.namespace([1.0, 2.0])


def test_to_cpu_round_trip(tiny, ids):
    assert tiny.device == "cpu" and tiny.to("cpu") is tiny
    back = strict_model(tiny).to("cpu")
    assert back.device == "cpu"
    for a, b in zip(_leaves(back.params), _leaves(tiny.params)):
        assert type(a) is np.ndarray and a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert_same_result(back.forward(ids), tiny.forward(ids), rtol=0)


def test_strict_model_keeps_values_and_structure(tiny):
    sm = strict_model(tiny)
    assert sm.config is tiny.config and sm.tokenizer is tiny.tokenizer
    assert (sm.params.lm_head_weight is None) == (tiny.params.lm_head_weight is None)
    leaves = _leaves(sm.params)
    assert len(leaves) == len(_leaves(tiny.params)) == 4 + 12 * tiny.config.n_layer + (
        tiny.params.lm_head_weight is not None)
    assert all(isinstance(a, StrictArray) and a.dtype == xs.float32 for a in leaves)


def _leaves(params) -> list:
    out = []
    params.map(lambda a: out.append(a) or a)
    return out


def test_attention_scale_is_one_over_sqrt_head_width():
    """A guard on a Python-scalar constant in the hot path: the same number on both namespaces."""
    q = np.ones((1, 2, 64), np.float32)
    k = np.stack([np.zeros(64), np.ones(64)])[None].astype(np.float32)  # [1, 2, 64]
    v = np.eye(2, 64, dtype=np.float32)[None]
    scale = Config(n_layer=1, n_head=1, n_embd=64).attn_scale(0)
    _, pattern = M.attend(xs.asarray(q), xs.asarray(k), xs.asarray(v), scale)
    p = np.from_dlpack(pattern)[0, 1]  # query 1 sees key 0 (score 0) and key 1 (score 64 / 8 = 8)
    np.testing.assert_allclose(p, [1 / (1 + math.exp(8)), 1 / (1 + math.exp(-8))], rtol=1e-5)
