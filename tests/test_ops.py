"""Properties of each operation of the forward pass, against mathematics computed in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpt2np.config import Config
from gpt2np.model import attend, gelu_new, layer_norm, softmax


def rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# softmax


def test_softmax_rows_sum_to_one_and_match_float64():
    x = rng().standard_normal((5, 7, 11)).astype(np.float32) * 4
    p = softmax(x)
    assert p.dtype == np.float32 and p.shape == x.shape
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-6)
    x64 = x.astype(np.float64)
    ref = np.exp(x64) / np.exp(x64).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-7)


def test_softmax_other_axis():
    x = rng(1).standard_normal((4, 6)).astype(np.float32)
    np.testing.assert_allclose(softmax(x, axis=0), softmax(x.T).T, rtol=1e-6, atol=1e-7)


def test_softmax_is_shift_invariant():
    x = rng(2).standard_normal((3, 9)).astype(np.float32)
    for shift in (-50.0, 7.0, 1000.0):
        np.testing.assert_allclose(softmax(x + np.float32(shift)), softmax(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("big", [1e3, 1e4, 1e30])
def test_softmax_is_stable_for_large_inputs(big):
    x = np.array([[big, big, -big], [big, 0.0, big * 0.5]], np.float32)
    with np.errstate(over="raise", invalid="raise"):  # no overflow, no NaN (underflow to 0 is fine)
        p = softmax(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(p[1], [1.0, 0.0, 0.0], atol=1e-7)


def test_softmax_of_equal_masked_values_is_uniform():
    # a row where everything is the (finite) mask value must not give NaN
    x = np.full((1, 4), -1e10, np.float32)
    np.testing.assert_allclose(softmax(x), 0.25, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# LayerNorm


def test_layer_norm_without_gain_has_mean_zero_and_unit_variance():
    x = (rng(3).standard_normal((6, 64)) * 30 + 5).astype(np.float32)
    y = layer_norm(x, None, None, 1e-5)
    assert y.dtype == np.float32
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(y64.mean(-1), 0.0, atol=1e-6)
    np.testing.assert_allclose(y64.var(-1), 1.0, rtol=1e-5)  # biased variance, eps negligible here


def test_layer_norm_matches_float64_formula():
    g = rng(4)
    x = (g.standard_normal((2, 5, 48)) * 10).astype(np.float32)
    w = (1 + 0.3 * g.standard_normal(48)).astype(np.float32)
    b = (0.1 * g.standard_normal(48)).astype(np.float32)
    eps = 1e-5
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)  # biased
    ref = (x64 - mu) / np.sqrt(var + eps) * w + b  # eps inside the root, then gain and bias
    np.testing.assert_allclose(layer_norm(x, w, b, eps), ref, rtol=1e-5, atol=1e-5)


def test_layer_norm_eps_is_inside_the_square_root():
    # tiny variance: eps dominates; eps outside the root (x / (std + eps)) would give a very different value
    x = np.array([[0.0, 2e-3]], np.float32)
    y = layer_norm(x, None, None, 1e-5)
    ref = np.array([-1e-3, 1e-3]) / math.sqrt(1e-6 + 1e-5)
    np.testing.assert_allclose(y[0], ref, rtol=1e-5)


def test_layer_norm_of_constant_row_is_the_bias():
    x = np.full((2, 8), 3.5, np.float32)
    b = np.arange(8, dtype=np.float32)
    y = layer_norm(x, np.full(8, 2.0, np.float32), b, 1e-5)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, np.broadcast_to(b, (2, 8)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gelu_new


def gelu_tanh64(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf64(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


POINTS = [-10.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.5, -0.1, 0.0, 1e-3, 0.1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 50.0]


def test_gelu_new_known_values():
    x = np.array(POINTS, np.float32)
    ref = np.array([gelu_tanh64(float(v)) for v in x])
    y = gelu_new(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    # a few values worked out by hand from the formula (float64)
    np.testing.assert_allclose(gelu_new(np.array([0.0, 1.0, -1.0], np.float32)),
                               [0.0, 0.8411919906082768, -0.15880800939172324], rtol=1e-6)


def test_gelu_new_is_not_the_erf_gelu():
    grid = np.linspace(-6, 6, 24001)
    gap64 = max(abs(gelu_tanh64(float(v)) - gelu_erf64(float(v))) for v in grid)
    assert 4.6e-4 < gap64 < 4.8e-4  # the two definitions differ by up to ~4.7e-4
    y = gelu_new(grid.astype(np.float32)).astype(np.float64)
    erf = np.array([gelu_erf64(float(v)) for v in grid.astype(np.float32)])
    tanh = np.array([gelu_tanh64(float(v)) for v in grid.astype(np.float32)])
    assert np.max(np.abs(y - erf)) > 4e-4  # gpt2np follows tanh, not erf
    assert np.max(np.abs(y - tanh)) < 2e-6


# ---------------------------------------------------------------------------------------------
# causal attention


def attend_ref(q, k, v):
    """float64 reference: the T queries are the last T of the S key positions."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    H, T, d = q.shape
    S = k.shape[1]
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
    future = np.arange(S)[None, :] > np.arange(S - T, S)[:, None]
    scores = np.where(future, -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v, p


@pytest.mark.parametrize("H,T,S,d", [(3, 7, 7, 16), (1, 1, 1, 8), (2, 3, 10, 4)])
def test_attend_is_causal(H, T, S, d):
    g = rng(5)
    q = g.standard_normal((H, T, d)).astype(np.float32) * 3
    k = g.standard_normal((H, S, d)).astype(np.float32) * 3
    v = g.standard_normal((H, S, d)).astype(np.float32)
    out, pattern = attend(q, k, v, 1 / math.sqrt(d))
    assert out.shape == (H, T, d) and pattern.shape == (H, T, S)
    assert out.dtype == np.float32 and pattern.dtype == np.float32
    future = np.arange(S)[None, :] > np.arange(S - T, S)[:, None]  # [T, S]
    assert np.all(pattern[:, future] == 0.0)  # exactly zero, not just small
    assert np.all(pattern[:, ~future] > 0.0)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=0, atol=1e-6)
    ref_out, ref_p = attend_ref(q, k, v)
    np.testing.assert_allclose(pattern, ref_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)


def test_attend_ignores_future_values():
    g = rng(6)
    q, k, v = (g.standard_normal((2, 6, 8)).astype(np.float32) for _ in range(3))
    out, _ = attend(q, k, v, 0.125)
    k2, v2 = k.copy(), v.copy()
    k2[:, 4:] += 100.0
    v2[:, 4:] -= 100.0
    out2, _ = attend(q, k2, v2, 0.125)
    np.testing.assert_array_equal(out2[:, :4], out[:, :4])
    assert not np.allclose(out2[:, 4:], out[:, 4:])


def test_attend_first_position_copies_its_value():
    g = rng(7)
    q, k, v = (g.standard_normal((4, 5, 8)).astype(np.float32) * 10 for _ in range(3))
    out, pattern = attend(q, k, v, 0.125)
    assert np.all(pattern[:, 0, 0] == 1.0)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)


def test_attend_uses_one_over_sqrt_head_size():
    # two keys with scores 0 and 8*sqrt(d)/sqrt(d) = 8 after scaling: p = [1, e^8] / (1 + e^8)
    d = 16
    scale = Config(n_layer=1, n_head=2, n_embd=2 * d).attn_scale(0)  # GPT-2's own: 1 / sqrt(d)
    q = np.zeros((1, 2, d), np.float32)
    q[0, 1, 0] = 8.0 * math.sqrt(d) / 4.0
    k = np.zeros((1, 2, d), np.float32)
    k[0, 1, 0] = 4.0
    v = np.eye(2, d, dtype=np.float32)[None]
    _, pattern = attend(q, k, v, scale)
    np.testing.assert_allclose(pattern[0, 1], [1 / (1 + math.exp(8)), math.exp(8) / (1 + math.exp(8))], rtol=1e-5)
