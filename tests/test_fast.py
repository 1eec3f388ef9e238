"""The fast NumPy path (gpt2np/fast.py) computes the plain forward pass (model.py), in float32 only.

``forward_fast`` is compared field by field with ``model.forward`` on tiny random models, with query
chunks, GELU row blocks and worker splits small enough that every boundary case happens (a chunk
that straddles a worker split, a last chunk shorter than the others, one position). The guards:
every array of the trace is float32, and the memory it allocates beyond the trace is bounded by its
workspace (measured with tracemalloc, which sees NumPy's allocations): a float64 copy of any
activation, or a temporary ``[T, F]`` or ``[H, T, T]`` array, would exceed it.
"""
from __future__ import annotations

import tracemalloc
from dataclasses import fields

import numpy as np
import pytest

import gpt2np
from gpt2np import fast, model
from gpt2np.config import Config

from conftest import rel_err

FIELDS = [f.name for f in fields(model.Trace) if f.name != "ids"]

# Odd head count, vocabulary of 400, room for 150 positions.
SMALL = Config(n_layer=3, n_head=3, n_embd=48, n_positions=160, vocab_size=400)


@pytest.fixture(scope="module")
def small_model(make_checkpoint):
    # scale 4: residuals grow through the blocks, as in the real GPT-2
    return gpt2np.load(make_checkpoint(SMALL, seed=3, scale=4.0))


def ids_of(m, T, seed=0):
    return np.random.default_rng(seed).integers(0, m.config.vocab_size, T)


@pytest.mark.parametrize("T, workers, chunk, gelu_rows, score_bytes", [
    (1, 1, 64, 128, 1 << 20),  # one position
    (7, 1, 4, 3, 1 << 20),  # last chunk and last GELU block shorter
    (64, 2, 16, 8, 1),  # one head at a time
    (150, 3, 16, 32, 16 * 150 * 4 * 2),  # uneven worker split, chunks straddle it; groups of 3 heads
    # for the early chunks, then of 2 and 1 (the last group short)
    (150, 1, 64, 128, 1 << 20),  # the default sizes, several chunks
    (33, 5, 5, 4, 1 << 20),
])
def test_equals_plain_forward(small_model, monkeypatch, T, workers, chunk, gelu_rows, score_bytes):
    monkeypatch.setattr(fast, "CHUNK", chunk)
    monkeypatch.setattr(fast, "GELU_ROWS", gelu_rows)
    monkeypatch.setattr(fast, "SCORE_BYTES", score_bytes)
    m, ids = small_model, ids_of(small_model, T)
    ref = model.forward(m.params, m.config, ids, sublayers=True, patterns=True, heads=True)
    got = fast.forward_fast(m.params, m.config, ids, sublayers=True, patterns=True, heads=True, workers=workers)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < 2e-6, (name, rel_err(a, b))
    assert np.array_equal(got.ids, ids)
    # the masked half of every pattern is exactly zero, every row sums to one
    assert not np.triu(got.pattern, 1).any()
    np.testing.assert_allclose(got.pattern.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("sublayers, patterns", [(False, False), (True, False), (False, True)])
def test_optional_fields(small_model, sublayers, patterns):
    m, ids = small_model, ids_of(small_model, 40, seed=1)
    ref = model.forward(m.params, m.config, ids, sublayers=sublayers, patterns=patterns)
    got = fast.forward_fast(m.params, m.config, ids, sublayers=sublayers, patterns=patterns, workers=2)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < 2e-6, name


def test_model_forward_uses_fast_path(small_model):
    """``Model.forward`` on NumPy weights is ``forward_fast`` (the same bits)."""
    m, ids = small_model, ids_of(small_model, 50, seed=2)
    a = m.forward(ids, sublayers=True)
    b = fast.forward_fast(m.params, m.config, ids, sublayers=True)
    for name in ("resid", "logits", "mlp_out"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_workers_agree(small_model):
    """The split over threads changes which rows each BLAS call gets, nothing else.

    Not the same bits: a BLAS may compute a row with another kernel when it sits elsewhere in a
    product (OpenBLAS's Haswell kernels do, at the edges of their tiles), so the splits agree within
    float32 rounding: the bound the plain forward is held to.
    """
    m, ids = small_model, ids_of(small_model, 150, seed=4)
    one = fast.forward_fast(m.params, m.config, ids, sublayers=True, workers=1)
    for w in (2, 3):
        other = fast.forward_fast(m.params, m.config, ids, sublayers=True, workers=w)
        for name in ("resid", "logits", "attn_out", "mlp_out", "resid_mid"):
            assert rel_err(getattr(other, name), getattr(one, name)) < 2e-6, (w, name)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_repeated_calls_identical(small_model, workers):
    """The same call twice gives the same bits: how the work is cut depends on the shapes and the
    worker count only, never on timings or on which thread finishes first."""
    m, ids = small_model, ids_of(small_model, 150, seed=4)
    runs = [fast.forward_fast(m.params, m.config, ids, sublayers=True, patterns=True, workers=workers)
            for _ in range(3)]
    for name in FIELDS:
        for other in runs[1:]:
            assert np.array_equal(getattr(runs[0], name), getattr(other, name)), (workers, name)


def test_trace_is_float32(small_model):
    m = small_model
    tr = fast.forward_fast(m.params, m.config, ids_of(m, 70), sublayers=True, patterns=True, heads=True, workers=2)
    assert tr.ids.dtype == np.int64
    for name in FIELDS:
        assert getattr(tr, name).dtype == np.float32, name


@pytest.mark.parametrize("workers", [1, 2])
def test_no_float64_or_large_temporaries(make_checkpoint, monkeypatch, workers):
    """All the memory forward_fast allocates beyond its trace is its workspace, and no more.

    NumPy reports its allocations to tracemalloc. The workspace is seven ``[T, D]`` buffers (the
    normalised stream, q|k|v, contiguous k and v, the merged heads), the ``[T, F]`` MLP activations,
    and per worker the scores of a query chunk for a group of heads (at most ``SCORE_BYTES``, at least
    one head's ``[C, T]``), their row maxima and sums, and a ``[rows, F]`` GELU block. A float64
    version of any activation (a promotion) or any unplanned ``[T, D]``-sized temporary does not fit
    in the margin.
    """
    config = Config(n_layer=2, n_head=4, n_embd=128, n_positions=256, vocab_size=400)
    m = gpt2np.load(make_checkpoint(config, seed=5))
    T, D, H, F = 256, config.n_embd, config.n_head, config.d_mlp
    C, R = 32, 64
    monkeypatch.setattr(fast, "CHUNK", C)
    monkeypatch.setattr(fast, "GELU_ROWS", R)
    monkeypatch.setattr(fast, "SCORE_BYTES", 2 * C * T * 4)  # two heads at a time: 64 KiB
    ids = ids_of(m, T)
    fast.forward_fast(m.params, m.config, ids, sublayers=True, workers=workers)  # warm-up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        tr = fast.forward_fast(m.params, m.config, ids, sublayers=True, workers=workers)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    trace_bytes = sum(getattr(tr, name).nbytes for name in FIELDS if getattr(tr, name) is not None)
    workspace = 4 * (7 * T * D + T * F + T + workers * (2 * C * T + 2 * H * C + R * F))
    margin = T * D * 4  # Python's own allocations (threads, futures); a float64 [T, D] is twice this
    assert peak <= trace_bytes + workspace + margin, (peak - trace_bytes, workspace)


def test_layer_norm_and_gelu_in_place_match_model():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 300)) * 50 + 3).astype(np.float32)
    w = rng.standard_normal(300).astype(np.float32)
    b = rng.standard_normal(300).astype(np.float32)
    ref = model.layer_norm(x, w, b, 1e-5)
    out = np.empty_like(x)
    assert fast.layer_norm_(x, w, b, 1e-5, out=out) is out
    assert out.dtype == np.float32 and rel_err(out, ref) < 1e-6
    h = np.linspace(-12, 12, 3000, dtype=np.float32).reshape(3, 1000)
    ref = model.gelu_new(h)
    got = fast.gelu_new_(h.copy(), np.empty_like(h))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_chunks_cover_every_query_once_and_balance():
    for T, C, W in [(1024, 64, 2), (1000, 64, 3), (7, 4, 2), (150, 16, 16)]:
        dealt = fast._chunks_by_worker(T, C, W)
        flat = sorted(c for w in dealt for c in w)
        assert flat == [(i, min(i + C, T)) for i in range(0, T, C)]
        loads = [sum(i1 for _, i1 in w) for w in dealt]
        assert max(loads) - min(loads) <= T  # at most one chunk's worth apart
