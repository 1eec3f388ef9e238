"""Invariants of the trace that one forward pass returns (tiny random model, no reference needed)."""
from __future__ import annotations

import numpy as np
import pytest


def ids_for(model, T, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, T)


def ln64(x, w, b, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.fixture(scope="module")
def full(tiny_model):
    ids = ids_for(tiny_model, 23)
    return ids, tiny_model.forward(ids, sublayers=True, patterns=True)


def test_shapes_and_dtypes(tiny_model, full):
    c = tiny_model.config
    ids, tr = full
    L, T, D, H, V = c.n_layer, len(ids), c.n_embd, c.n_head, c.vocab_size
    assert tr.resid.shape == (L + 1, T, D)
    assert tr.logits.shape == (T, V)
    for name in ("resid_mid", "attn_out", "mlp_out"):
        assert getattr(tr, name).shape == (L, T, D), name
    assert tr.pattern.shape == (L, H, T, T)
    for name in ("resid", "logits", "resid_mid", "attn_out", "mlp_out", "pattern"):
        assert getattr(tr, name).dtype == np.float32, name
    np.testing.assert_array_equal(np.asarray(tr.ids), ids)
    assert tr.resid_pre.shape == tr.resid_post.shape == (L, T, D)
    np.testing.assert_array_equal(tr.resid_pre, tr.resid[:-1])
    np.testing.assert_array_equal(tr.resid_post, tr.resid[1:])


def test_optional_fields_are_off_by_default(tiny_model, full):
    ids, tr_full = full
    tr = tiny_model.forward(ids)
    assert tr.resid_mid is None and tr.attn_out is None and tr.mlp_out is None and tr.pattern is None
    np.testing.assert_array_equal(tr.resid, tr_full.resid)
    np.testing.assert_array_equal(tr.logits, tr_full.logits)


def test_trace_is_frozen(full):
    _, tr = full
    with pytest.raises(AttributeError):
        tr.logits = None


def test_row_zero_is_the_embedding(tiny_model, full):
    ids, tr = full
    p = tiny_model.params
    np.testing.assert_array_equal(tr.resid[0], p.wte[ids] + p.wpe[:len(ids)])


def test_each_row_is_previous_plus_attention_and_mlp(full):
    _, tr = full
    L = tr.resid.shape[0] - 1
    scale = float(np.abs(tr.resid).max())
    for l in range(L):
        np.testing.assert_allclose(tr.resid_mid[l], tr.resid[l] + tr.attn_out[l], rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(tr.resid[l + 1], tr.resid_mid[l] + tr.mlp_out[l], rtol=1e-6, atol=1e-6 * scale)
    # the sub-blocks really contribute (the invariants are not satisfied trivially)
    assert np.abs(tr.attn_out).max() > 1e-3 and np.abs(tr.mlp_out).max() > 1e-3


def test_sublayer_outputs_match_float64_block(tiny_model, full):
    """attn_out and mlp_out of block 0 recomputed from the parameters in float64."""
    ids, tr = full
    c, b = tiny_model.config, tiny_model.params.h[0]
    T, H, D = len(ids), c.n_head, c.n_embd
    d = D // H
    x = tr.resid[0].astype(np.float64)
    qkv = ln64(x, b.ln_1_weight, b.ln_1_bias, c.layer_norm_epsilon) @ b.attn_c_attn_weight + b.attn_c_attn_bias
    q, k, v = (qkv[:, i * D:(i + 1) * D].reshape(T, H, d).transpose(1, 0, 2) for i in range(3))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = (p @ v).transpose(1, 0, 2).reshape(T, D) @ b.attn_c_proj_weight + b.attn_c_proj_bias
    np.testing.assert_allclose(tr.pattern[0], p, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tr.attn_out[0], a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    h = ln64(x + a, b.ln_2_weight, b.ln_2_bias, c.layer_norm_epsilon) @ b.mlp_c_fc_weight + b.mlp_c_fc_bias
    h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
    m = h @ b.mlp_c_proj_weight + b.mlp_c_proj_bias
    np.testing.assert_allclose(tr.mlp_out[0], m, rtol=1e-4, atol=1e-5 * np.abs(m).max())


def test_logits_are_ln_f_of_last_row_times_wte(tiny_model, full):
    _, tr = full
    c, p = tiny_model.config, tiny_model.params
    ref = ln64(tr.resid[-1], p.ln_f_weight, p.ln_f_bias, c.layer_norm_epsilon) @ p.wte.astype(np.float64).T
    err = np.abs(tr.logits - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err


def test_patterns_are_causal_distributions(full):
    _, tr = full
    T = tr.pattern.shape[-1]
    future = np.triu(np.ones((T, T), bool), 1)
    assert np.all(tr.pattern[..., future] == 0.0)
    assert np.all(tr.pattern[..., ~future] > 0.0)
    np.testing.assert_allclose(tr.pattern.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert np.all(tr.pattern[:, :, 0, 0] == 1.0)  # the first position can only attend to itself


def test_changing_a_later_token_leaves_earlier_positions_unchanged(tiny_model, full):
    ids, tr = full
    k = 15
    ids2 = ids.copy()
    ids2[k] = (ids[k] + 1) % tiny_model.config.vocab_size
    ids2[k + 3:] = ids_for(tiny_model, len(ids) - k - 3, seed=9)
    tr2 = tiny_model.forward(ids2, sublayers=True, patterns=True)
    scale = float(np.abs(tr.resid).max())
    np.testing.assert_allclose(tr2.resid[:, :k], tr.resid[:, :k], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(tr2.logits[:k], tr.logits[:k], rtol=0, atol=1e-6 * np.abs(tr.logits).max())
    np.testing.assert_allclose(tr2.pattern[:, :, :k, :k], tr.pattern[:, :, :k, :k], rtol=0, atol=1e-6)
    # and the changed position itself does change, in every row of the stream
    assert np.all(np.abs(tr2.resid[:, k] - tr.resid[:, k]).max(-1) > 1e-4)


def test_prefix_gives_the_same_trace(tiny_model, full):
    ids, tr = full
    k = 9
    tr_k = tiny_model.forward(ids[:k], sublayers=True, patterns=True)
    scale = float(np.abs(tr.resid).max())
    np.testing.assert_allclose(tr_k.resid, tr.resid[:, :k], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(tr_k.logits, tr.logits[:k], rtol=0, atol=1e-6 * np.abs(tr.logits).max())
    np.testing.assert_allclose(tr_k.pattern, tr.pattern[:, :, :k, :k], rtol=0, atol=1e-6)


def test_forward_accepts_lists_and_other_integer_dtypes(tiny_model, full):
    ids, tr = full
    for form in (ids.tolist(), ids.astype(np.int32), ids.astype(np.uint16)):
        np.testing.assert_array_equal(tiny_model.forward(form).logits, tr.logits)


def test_full_context_runs(tiny_model):
    T = tiny_model.config.n_positions
    tr = tiny_model.forward(ids_for(tiny_model, T, seed=3), patterns=True)
    assert tr.resid.shape[1] == T and np.all(np.isfinite(tr.logits))
    np.testing.assert_allclose(tr.pattern.sum(-1), 1.0, rtol=0, atol=1e-5)
