"""The fast lens (gpt2np/lens_fast.py) computes the definition (gpt2np/lens.py's plain loop).

Equal means: ranks, top-k, final top-1 and lock-in exactly, float quantities within float32 rounding.
Exactly equal ranks need exactly equal logits, and the two paths make their products differently
(the fast one cuts them into column blocks and stacks rows; a BLAS may round a column differently
depending on where it sits in a product). So the exact comparison uses streams and an unembedding on a
coarse dyadic grid (multiples of 1/4, small): every product and partial sum is then exact in float32, in
any order, and the logits are the same bits on both paths; the grid also makes exact ties common. With
the ``ln_f`` and ``norm`` decoders and decoder blocks (logits that are not exact) both paths are held
to the float64 reference (test_lens.py), and to each other wherever float32 can separate the logits.

Also here: repeated calls are bit-identical (also while other threads load the machine), different
thread counts agree, the cut of a product depends on its shapes alone, memory stays bounded.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import gpt2np
from gpt2np import lens as definition
from gpt2np import lens_fast
from gpt2np import model as M
from gpt2np.config import Config

from test_lens import EXACT, QUANTITIES, SHAPES, reference_lens

FLOATS = QUANTITIES + ("top_probs", "top_logits")
ALL = EXACT + FLOATS


def assert_same_lens(a, b, exact_cells=None, atol=1e-5):
    """``a`` and ``b`` agree: EXACT fields bit for bit (on ``exact_cells`` [R, W] where given), floats
    within float32 rounding, and the same rows, window, tokens and settings."""
    assert a.rows == b.rows and (a.start, a.end) == (b.start, b.end) and a.settings == b.settings
    np.testing.assert_array_equal(a.top_tokens, b.top_tokens) if exact_cells is None else None
    for q in EXACT:
        x, y = getattr(a, q), getattr(b, q)
        assert x.dtype == y.dtype and x.shape == y.shape, q
        if exact_cells is None or q in ("final_ids", "lock_in"):
            mask = slice(None) if exact_cells is None else exact_cells.all(axis=0)
            np.testing.assert_array_equal(x[..., mask], y[..., mask], err_msg=q)
        else:
            np.testing.assert_array_equal(x[exact_cells], y[exact_cells], err_msg=q)
    for q in FLOATS:
        x, y = getattr(a, q), getattr(b, q)
        assert x.dtype == y.dtype and x.shape == y.shape, q
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, equal_nan=True, err_msg=q)


# ---------------------------------------------------------------------------------------------
# Exact arithmetic: the same logits on both paths, so every rank and top-k must match bit for bit

DYADIC = Config(n_layer=4, n_head=2, n_embd=48, n_positions=80, vocab_size=400)


@pytest.fixture(scope="module")
def dyadic(make_checkpoint):
    """A model and trace whose raw-decoder logits are exact: streams and unembedding in multiples of 1/4.

    |logit| <= 48 * 3 * 2 = 288 in steps of 1/16: far inside float32's exact integers (2^24 steps).
    """
    cfg = DYADIC
    m = gpt2np.load(make_checkpoint(cfg, seed=11))
    g = np.random.default_rng(5)
    grid = lambda shape, top: (g.integers(-4 * top, 4 * top + 1, shape) / 4).astype(np.float32)  # noqa: E731
    m = dataclasses.replace(m, params=dataclasses.replace(m.params, wte=grid((cfg.vocab_size, cfg.n_embd), 2)))
    T = cfg.n_positions
    ids = g.integers(0, cfg.vocab_size, T)
    L, D = cfg.n_layer, cfg.n_embd
    tr = M.Trace(ids, grid((L + 1, T, D), 3), None, resid_mid=grid((L, T, D), 3))
    return m, tr


DYADIC_OPTIONS = [
    {},
    {"sublayers": True},
    {"sublayers": True, "step": 2, "include_input": False},
    {"start": 7, "end": 31, "k": 9},
    {"start": 79, "end": 80},  # the last position alone: no next token
    {"end": 3, "sublayers": True},  # a short window: many rows stacked in one product
    {"chunk": 7, "sublayers": True},  # chunks that do not divide the window
    {"chunk": 33, "step": 3},
    {"k": 40, "end": 12},  # more top tokens than the column top-k has columns
    {"k": 400, "end": 4},  # the whole vocabulary
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("opts", DYADIC_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fast_equals_definition_exactly(dyadic, opts, threads):
    m, tr = dyadic
    plain = definition.logit_lens(m, tr, norm="raw", **opts)
    fast = lens_fast.logit_lens_fast(m, tr, norm="raw", threads=threads, **opts)
    ties = (plain.top_logits[..., 1:] == plain.top_logits[..., :-1]).sum()
    if plain.top_ids[..., 0].size >= 20:  # enough cells
        assert ties > 0, "the grid should make exact ties inside the top-k"
    assert_same_lens(fast, plain)


def test_dyadic_fixture_is_exact(dyadic):
    """The premise: the logits do not depend on how the product is cut or summed."""
    m, tr = dyadic
    x, W = tr.resid[2], m.params.wte
    whole = x @ W.T
    assert np.array_equal(whole[:, :100], x @ W[:100].T) and np.array_equal(whole[5:9], x[5:9] @ W.T)
    np.testing.assert_array_equal(whole, (x.astype(np.float64) @ W.T.astype(np.float64)).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Every decoder: both paths against each other where float32 can order the logits


OPTIONS = [
    {"sublayers": True},
    {"norm": "norm", "step": 2},
    {"decoder_blocks": 1, "sublayers": True},
    {"decoder_blocks": 2, "norm": "raw", "start": 3, "end": 11},
    {"chunk": 5, "k": 7},
]


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request, make_checkpoint):
    cfg = SHAPES[request.param]
    m = gpt2np.load(make_checkpoint(cfg, scale=8.0, seed=3))
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, cfg.n_positions)
    return m, m.forward(ids, sublayers=True)


def separable(ref) -> np.ndarray:
    """``[R, W]`` cells whose three ranks float32 decides without doubt (from the float64 reference)."""
    ok = np.ones(ref["final_rank"].shape, bool)
    for q in ("final_rank", "input_rank", "next_rank"):
        lo, hi = np.moveaxis(ref[f"{q}_bounds"], 1, 0)  # [R, 2, W] -> [2, R, W]
        ok &= lo == hi
    return ok


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_equals_definition(case, opts):
    m, tr = case
    ref = reference_lens(m, tr, **{key: v for key, v in opts.items() if key != "chunk"})
    cells = separable(ref)
    assert cells.mean() > 0.9, "the fixture has too many near-ties to test anything"
    plain = definition.logit_lens(m, tr, **opts)
    for threads in (1, 2):
        assert_same_lens(lens_fast.logit_lens_fast(m, tr, threads=threads, **opts), plain, exact_cells=cells)


def test_public_lens_uses_the_fast_path_on_numpy(case, monkeypatch):
    m, tr = case
    calls = []
    real = lens_fast.logit_lens_fast
    monkeypatch.setattr(gpt2np.api, "logit_lens_fast", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    lens = gpt2np.logit_lens(m, tr, end=4)
    assert calls == [1]
    assert_same_lens(lens, real(m, tr, end=4))


# ---------------------------------------------------------------------------------------------
# Deterministic: the same call, the same bits


def _bits(lens) -> list:
    return [getattr(lens, q).tobytes() for q in ALL]


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_repeated_calls_are_bit_identical(make_checkpoint, threads):
    """Several chunks, stacked and single rows, anchors: three calls, the same bits every time, also
    while two other threads keep the cores busy (the cut must not follow how long work takes)."""
    cfg = Config(n_layer=4, n_head=2, n_embd=64, n_positions=200, vocab_size=3000)
    m = gpt2np.load(make_checkpoint(cfg, scale=8.0, seed=2))
    tr = m.forward(np.random.default_rng(1).integers(0, cfg.vocab_size, 200), sublayers=True)
    kw = dict(sublayers=True, chunk=64, threads=threads)
    first = _bits(gpt2np.logit_lens(m, tr, **kw))
    assert _bits(gpt2np.logit_lens(m, tr, **kw)) == first
    stop = threading.Event()

    def busy():
        a = np.ones((300, 300), np.float32)
        while not stop.is_set():
            a @ a

    noise = [threading.Thread(target=busy) for _ in range(2)]
    for t in noise:
        t.start()
    try:
        loaded = _bits(gpt2np.logit_lens(m, tr, **kw))
    finally:
        stop.set()
        for t in noise:
            t.join()
    assert loaded == first


def test_thread_counts_agree(case):
    m, tr = case
    ref = reference_lens(m, tr, sublayers=True)
    one = lens_fast.logit_lens_fast(m, tr, sublayers=True, threads=1)
    for threads in (2, 3, 4):
        assert_same_lens(lens_fast.logit_lens_fast(m, tr, sublayers=True, threads=threads), one,
                         exact_cells=separable(ref))


def test_two_threads_really_run_side_by_side():
    """threadpoolctl (a test dependency) enables the pool: the other tests exercise the overlapped path."""
    work, _ = lens_fast.workspace(4, 8, 100, 3, 2)
    try:
        assert work.pool is not None and work.threads == 2
    finally:
        work.pool.shutdown()


@pytest.mark.parametrize("length, threads, reduction", [(50257, 2, 0.0), (50257, 2, 9000.5), (400, 3, 37.0),
                                                        (10, 4, 1e9), (1, 2, 0.3)])
def test_cut_depends_on_its_arguments_only(length, threads, reduction):
    bounds = lens_fast.cut(length, threads, reduction)
    assert bounds == lens_fast.cut(length, threads, reduction)  # a pure function
    assert bounds[0] == 0 and bounds[-1] == length and len(bounds) == threads + 1
    sizes = np.diff(bounds)
    assert (sizes >= 0).all()
    share = (length + reduction) / threads  # every thread's work, the reducing thread's reduction included
    assert np.all(np.abs(sizes[:-1] - min(share, length)) <= 1 + (share > length) * length)
    assert sizes[-1] <= max(0.0, share - reduction) + threads


# ---------------------------------------------------------------------------------------------
# Memory and precision


def _resident_kib(field: str = "VmRSS") -> int:
    """This process's resident memory (or its peak, VmHWM) in KiB, from /proc (Linux, as CI)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_resident_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current resident size
        f.write("5")


@pytest.fixture(scope="module")
def long_case(make_checkpoint):
    cfg = Config(n_layer=6, n_head=2, n_embd=32, n_positions=256, vocab_size=20000)
    m = gpt2np.load(make_checkpoint(cfg, seed=1))
    return m, m.forward(np.arange(256) % cfg.vocab_size, sublayers=True)


@pytest.mark.parametrize("impl, per_chunk_arrays", [("fast", 8), ("definition", 12)])
def test_lens_memory_is_bounded(long_case, impl, per_chunk_arrays):
    """Peak allocation stays near a few [chunk, V] buffers (float32 for the fast path, float64 in the
    definition), far below the [rows, T, V] array."""
    m, tr = long_case
    fn = lens_fast.logit_lens_fast if impl == "fast" else definition.logit_lens
    chunk = 32
    fn(m, tr, sublayers=True, chunk=chunk, end=chunk)  # warm-up, one chunk: imports, thread pools, arenas
    base = _resident_kib()
    _reset_resident_peak()
    tracemalloc.start()
    try:
        lens = fn(m, tr, sublayers=True, chunk=chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    resident_peak = (_resident_kib("VmHWM") - base) * 1024  # also sees the buffers mapped outside Python's heap
    R, T, V = len(lens.rows), 256, m.config.vocab_size
    full = R * T * V * 4  # what a naive lens would hold: 265 MB here
    itemsize = 4 if impl == "fast" else 8
    per_chunk = chunk * V * itemsize  # one [chunk, V] buffer: 2.6 MB (float32)
    assert peak < per_chunk_arrays * per_chunk + 200 * R * T * 8, (peak, per_chunk)  # + the O(R x T x k) results
    assert peak < full / 5
    assert resident_peak < full / 5, (resident_peak, full)


def test_no_float64_block_arrays(case, monkeypatch):
    """The fast path's reductions over the vocabulary run in float32: no [n, V] float64 array is made."""
    m, tr = case
    V = m.config.vocab_size
    seen = []
    real_exp = np.exp

    def spy(x, *a, **kw):
        if getattr(x, "ndim", 0) in (1, 2) and x.shape[-1] == V:  # a [V] row or an [n, V] block
            seen.append(x.dtype)
        return real_exp(x, *a, **kw)

    monkeypatch.setattr(np, "exp", spy)
    lens_fast.logit_lens_fast(m, tr)
    assert seen and all(d == np.float32 for d in seen), set(seen)


# -------------------------------------------------------------------------------------------------
# Progress


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_a_progress_bar_only_when_asked_and_the_same_lens(tiny_model, capsys, fast):
    import re

    from gpt2np import lens as plain

    m = tiny_model
    tr = m.forward(m.encode("the progress bar of a long lens, here a short one") * 1, sublayers=True)
    run = gpt2np.logit_lens if fast else plain.logit_lens
    quiet = run(m, tr, sublayers=True, chunk=4)
    assert capsys.readouterr().err == ""  # the Python API is silent unless asked
    shown = run(m, tr, sublayers=True, chunk=4, progress=True)
    err = capsys.readouterr().err
    T, R = len(tr.ids), len(quiet.rows)
    total = R * -(-T // 4) if not fast else None  # plain: rows x chunks
    done = re.findall(r"lens: +100%\|.*?\| (\d+)/(\d+)", err)
    assert done and done[-1][0] == done[-1][1], err  # the bar reached its total
    if total is not None:
        assert int(done[-1][1]) == total
    for name in ("top_ids", "kl_final", "entropy"):
        assert np.array_equal(getattr(shown, name), getattr(quiet, name))


def test_the_command_line_bar_is_off_with_quiet_or_without_a_terminal(tiny_checkpoint, capsys, monkeypatch):
    from gpt2np import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["lens", "hello there", "--model", str(tiny_checkpoint), "--quiet"]) == 0
    assert "lens:" not in capsys.readouterr().err
    assert cli.main(["lens", "hello there", "--model", str(tiny_checkpoint)]) == 0
    assert "lens:" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert cli.main(["lens", "hello there", "--model", str(tiny_checkpoint)]) == 0
    assert "lens:" not in capsys.readouterr().err
