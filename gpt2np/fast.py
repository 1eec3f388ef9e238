"""The same forward pass as ``model.forward``, arranged for speed on CPUs with NumPy. Read model.py first.

Nothing here changes the maths: ``forward_fast`` returns the same ``Trace`` as ``model.forward`` up to
float32 rounding (``tests/test_fast.py`` checks it). ``Model.forward`` uses it for NumPy weights;
CuPy and other array-API arrays take the plain path. What changes is how the work is laid out:

* **No temporaries where an output buffer will do.** Every matrix product writes into a buffer
  (``np.matmul(..., out=...)``); bias, LayerNorm, GELU and softmax work in place; the streams are
  written straight into the trace's stacked arrays. Nothing is ever promoted to float64.
* **No copies of weights.** ``wte.T`` and the weight matrices are read by BLAS as they are.
* **Causal attention in query chunks, a few heads at a time.** Queries are taken ``CHUNK`` rows at
  a time and scored only against the keys up to the chunk's last query, so the masked half of the
  ``T x T`` scores is (almost) never computed; only the chunk's diagonal block needs the mask. The
  scores of as many heads as fit in ``SCORE_BYTES`` (one head when the chunk alone is that large)
  are a contiguous ``[heads, CHUNK, S]`` block that stays in the L2 cache while softmax passes over
  it; stacking heads in one call saves Python's per-call cost (T = 1024: 13 ms a block instead of
  15; T = 16: 0.05 ms instead of 0.14). the score scale (``config.attn_scale``: GPT-2's 1/sqrt(d), a
  power of two for d = 64, exact) multiplies ``q``; the row sums come from a BLAS matrix-vector product; the division by them is applied to
  the ``[C, d]`` output, not to the ``[C, S]`` probabilities (which are divided only when the
  patterns are kept).
* **GELU in cache-sized blocks**: its nine passes run over ``GELU_ROWS`` rows at a time.
* **All cores on everything.** NumPy runs element-wise work on one core. With ``threadpoolctl``
  installed and T long enough (``MIN_ROWS_PER_WORKER`` positions per core), the positions are split
  across ``workers`` Python threads (NumPy releases the GIL), each running single-threaded BLAS on its
  rows, and the attention's query chunks are dealt out so the work is even. Otherwise the same code
  runs in one thread and BLAS uses its own threads. The BLAS thread count is restored on return.
* **The logits in ordinary pages** (see ``_empty_small_pages``): the ``[T, V]`` array is the largest.

Measured with ``scripts/bench.py`` (gpt2 shape, T = 1024, 2 cores): the plain path 2.8 s, this one
1.1 s; the attention went from 100 ms to 13 ms per block, the rest is mostly matrix products.
"""
from __future__ import annotations

import math
import mmap
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np

from .backend import usable_cores
from .config import Config
from .model import MASKED, Trace
from .weights import Params

CHUNK = 128  # query rows per attention chunk: one head's [CHUNK, S] float32 scores stay in the L2 cache
SCORE_BYTES = 1 << 20  # attention scores of this many bytes (or one head's) are made in one call
GELU_ROWS = 32  # rows per GELU block: its nine passes over [rows, F] stay in the L2 cache
# Positions per worker, at least. Each worker's BLAS packs the whole weight matrix for its rows, so
# fewer rows waste more: below this, one thread with BLAS's own threads (which split the columns) wins.
MIN_ROWS_PER_WORKER = 512


def _blas_controller():
    """threadpoolctl's view of the BLAS libraries in this process, or None when it is not installed."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController().select(user_api="blas")


def default_workers(T: int, blas=None) -> int:
    """Threads to split T positions over: as many as BLAS would use (its thread count, at most the
    usable cores), at least ``MIN_ROWS_PER_WORKER`` positions each; 1 without threadpoolctl."""
    if blas is None or not blas.lib_controllers:
        return 1
    threads = max(c.num_threads for c in blas.lib_controllers)
    return max(1, min(usable_cores(), threads, T // MIN_ROWS_PER_WORKER))


def _empty_small_pages(shape: tuple[int, ...], dtype) -> np.ndarray:
    """``np.empty`` in memory the kernel maps with ordinary 4 KiB pages.

    NumPy asks the kernel for transparent huge pages for large arrays (madvise). Touching a fresh
    huge page is cheap when the kernel has one ready, but can stall for a long time when it must
    first compact memory (or, in a virtual machine, when the host must back it again): on the
    [T, V] logits, 206 MB at T = 1024, that varied from 20 ms to over 200 ms run to run. Plain pages
    cost about 70 ms, every time.
    """
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype, count=int(np.prod(shape))).reshape(shape)


def _split(n: int, parts: int) -> list[slice]:
    """``range(n)`` as ``parts`` contiguous slices of near-equal length."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _chunks_by_worker(T: int, chunk: int, workers: int) -> list[list[tuple[int, int]]]:
    """Query chunks ``(i0, i1)`` dealt to workers so each gets about the same attention work.

    A chunk costs about ``i1`` (its key count); the most expensive go first, each to the worker
    with the least work so far.
    """
    chunks = [(i0, min(i0 + chunk, T)) for i0 in range(0, T, chunk)]
    load, out = [0] * workers, [[] for _ in range(workers)]
    for i0, i1 in sorted(chunks, key=lambda c: -c[1]):
        w = load.index(min(load))
        load[w] += i1
        out[w].append((i0, i1))
    return out


def layer_norm_(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """LayerNorm of ``x [R, D]`` written into ``out [R, D]`` (may be ``x``); same maths as model.layer_norm."""
    D = x.shape[-1]
    mean = x.sum(axis=-1, keepdims=True)  # [R, 1]
    mean *= 1.0 / D
    np.subtract(x, mean, out=out)  # [R, D] centred
    var = np.einsum("ij,ij->i", out, out)  # [R]
    var *= 1.0 / D
    var += eps
    np.sqrt(var, out=var)
    np.reciprocal(var, out=var)
    out *= var[:, None]
    out *= weight
    out += bias
    return out


def gelu_new_(h: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """``h = gelu_new(h)`` in place; ``tmp`` is scratch of h's shape. Same formula as model.gelu_new."""
    c = math.sqrt(2.0 / math.pi)
    np.multiply(h, h, out=tmp)  # x^2
    tmp *= 0.044715 * c
    tmp += c
    tmp *= h  # c (x + 0.044715 x^3)
    np.tanh(tmp, out=tmp)
    tmp += 1.0
    tmp *= 0.5
    h *= tmp  # 0.5 x (1 + tanh(...))
    return h


def _attend_chunks(q, k, v, z, chunks, upper, ones, scratch, pattern=None) -> None:
    """Causal attention for the given query chunks, a group of heads at a time, written into ``z``.

    ``q : [H, T, d]`` view (already scaled), ``k, v : [H, T, d]`` contiguous, ``z : [T, H, d]``
    output view, ``upper : [C, C]`` bool, True above the diagonal, ``ones : [T, 1]``, ``scratch``
    ``(scores [min(H * C * T, max(C * T, SCORE_BYTES / 4))], row_max [H * C], row_sum [H * C])``,
    ``pattern`` an optional ``[H, T, T]`` zeroed output.
    """
    flat, row_max, row_sum = scratch
    H = q.shape[0]
    for i0, i1 in chunks:
        c = i1 - i0
        g = max(1, min(H, SCORE_BYTES // (c * i1 * flat.itemsize)))  # heads per call
        for h0 in range(0, H, g):
            h1 = min(h0 + g, H)
            n = h1 - h0
            s = flat[:n * c * i1].reshape(n, c, i1)  # [n, c, S=i1] contiguous, in the L2 cache
            m, total = row_max[:n * c].reshape(n, c, 1), row_sum[:n * c].reshape(n, c, 1)
            np.matmul(q[h0:h1, i0:i1], k[h0:h1, :i1].transpose(0, 2, 1), out=s)  # [n, c, d] @ [n, d, S]
            np.copyto(s[:, :, i0:], MASKED, where=upper[:c, :c])  # the diagonal block: key j > query i
            np.max(s, axis=-1, keepdims=True, out=m)
            np.subtract(s, m, out=s)
            np.exp(s, out=s)
            np.matmul(s, ones[:i1], out=total)  # [n, c, 1] row sums (BLAS matrix-vector products)
            out = z[i0:i1, h0:h1].transpose(1, 0, 2)  # [n, c, d] view of the merged output
            np.matmul(s, v[h0:h1, :i1], out=out)  # unnormalised: divide the [c, d] results, not [c, S]
            np.divide(out, total, out=out)
            if pattern is not None:
                np.divide(s, total, out=pattern[h0:h1, i0:i1, :i1])


def forward_fast(params: Params, config: Config, ids: np.ndarray, *, sublayers: bool = False,
                 patterns: bool = False, heads: bool = False, workers: int | None = None) -> Trace:
    """``model.forward`` for NumPy arrays, faster; returns the same ``Trace``.

    Parameters
    ----------
    params, config : the model, with NumPy float32 arrays
    ids : ndarray of int, shape (T,), already checked (``model.check_ids``)
    sublayers, patterns, heads : as in ``model.forward``
    workers : threads to split the work over (default: BLAS's thread count, at most the usable
        cores, at least 512 positions each; 1 when threadpoolctl is not installed)
    """
    T = ids.shape[0]
    blas = _blas_controller() if workers is None or workers > 1 else None
    workers = default_workers(T, blas) if workers is None else max(1, int(workers))
    # With several workers, each runs BLAS on its own thread; the BLAS thread count comes back on exit.
    single_blas = blas.limit(limits=1) if workers > 1 and blas is not None else nullcontext()
    with single_blas, (ThreadPoolExecutor(workers) if workers > 1 else nullcontext()) as pool:
        return _forward(params, config, ids, sublayers, patterns, heads, workers, pool)


def _forward(params: Params, config: Config, ids, sublayers: bool, patterns: bool, keep_heads: bool, workers: int,
             pool) -> Trace:
    L, T, D, H = config.n_layer, ids.shape[0], config.n_embd, config.n_head
    F, eps, dt = config.d_mlp, config.layer_norm_epsilon, params.wte.dtype
    d = D // H

    def run(fn, tasks):
        """fn(task) for every task, on the worker threads when there are several."""
        if pool is None:
            for t in tasks:
                fn(t)
        else:
            for f in [pool.submit(fn, t) for t in tasks]:
                f.result()

    resid = np.empty((L + 1, T, D), dt)
    mid = np.empty((L, T, D), dt) if sublayers else None
    attn_outs = np.empty((L, T, D), dt) if sublayers else None
    mlp_outs = np.empty((L, T, D), dt) if sublayers else None
    pats = np.zeros((L, H, T, T), dt) if patterns else None  # the masked half stays exactly 0
    head_outs = np.empty((L, H, T, D), dt) if keep_heads else None

    # Workspace, allocated once per call and reused by every layer.
    ln = np.empty((T, D), dt)  # normalised stream
    qkv = np.empty((T, 3 * D), dt)  # [q | k | v]
    z = np.empty((T, D), dt)  # merged attention heads, before c_proj
    a_buf = None if sublayers else np.empty((T, D), dt)
    m_buf = None if sublayers else np.empty((T, D), dt)
    mid_buf = None if sublayers else np.empty((T, D), dt)
    rows = _split(T, workers)  # one contiguous block of positions per worker
    C = min(CHUNK, T)
    chunks = _chunks_by_worker(T, C, len(rows))
    upper = np.triu(np.ones((C, C), dtype=bool), 1)  # [C, C] the masked keys of a diagonal block
    ones = np.ones((T, 1), dt)
    scores = min(H * C * T, max(C * T, SCORE_BYTES // np.dtype(dt).itemsize))  # the largest group's
    scratch = [(np.empty(scores, dt), np.empty(H * C, dt), np.empty(H * C, dt)) for _ in rows]
    k = np.empty((H, T, d), dt)  # keys and values head by head, contiguous for BLAS
    v = np.empty((H, T, d), dt)
    hidden = np.empty((T, F), dt)  # MLP activations
    gelu_tmp = [np.empty((min(GELU_ROWS, T), F), dt) for _ in rows]

    heads = qkv.reshape(T, 3, H, d).transpose(1, 2, 0, 3)  # [3, H, T, d] views, no copy
    q = heads[0]
    z_heads = z.reshape(T, H, d)

    np.take(params.wte, ids, axis=0, out=resid[0])  # [T, D]
    resid[0] += params.wpe[:T]

    for l, p in enumerate(params.h):
        x, x_next = resid[l], resid[l + 1]
        a = attn_outs[l] if sublayers else a_buf  # [T, D]
        xm = mid[l] if sublayers else mid_buf  # resid_mid [T, D]
        m = mlp_outs[l] if sublayers else m_buf  # [T, D]

        scale = config.attn_scale(l)  # GPT-2: 1/sqrt(d)

        def qkv_rows(w, p=p, x=x, scale=scale):
            r = rows[w]
            layer_norm_(x[r], p.ln_1_weight, p.ln_1_bias, eps, out=ln[r])
            np.matmul(ln[r], p.attn_c_attn_weight, out=qkv[r])  # [R, D] -> [R, 3D]
            qkv[r] += p.attn_c_attn_bias
            qkv[r, :D] *= scale  # q * scale: for d = 64, 1/8 (exact, the same bits as scaling the scores)
            np.copyto(k[:, r], heads[1, :, r])
            np.copyto(v[:, r], heads[2, :, r])

        def attn_chunks(w, l=l):
            _attend_chunks(q, k, v, z_heads, chunks[w], upper, ones, scratch[w], None if pats is None else pats[l])

        def block_rows(w, l=l, p=p, x=x, x_next=x_next, a=a, xm=xm, m=m):
            r = rows[w]
            np.matmul(z[r], p.attn_c_proj_weight, out=a[r])  # [R, D]
            a[r] += p.attn_c_proj_bias
            if keep_heads:  # head h: its d columns of z times its d rows of c_proj
                for h in range(H):
                    np.matmul(z[r, h * d:(h + 1) * d], p.attn_c_proj_weight[h * d:(h + 1) * d], out=head_outs[l, h, r])
            np.add(x[r], a[r], out=xm[r])  # resid_mid = x + attn(ln_1(x))
            layer_norm_(xm[r], p.ln_2_weight, p.ln_2_bias, eps, out=ln[r])
            h = hidden[r]
            np.matmul(ln[r], p.mlp_c_fc_weight, out=h)  # [R, D] -> [R, F]
            for i0 in range(0, h.shape[0], GELU_ROWS):  # bias and GELU, block by block
                hb = h[i0:i0 + GELU_ROWS]
                hb += p.mlp_c_fc_bias
                gelu_new_(hb, gelu_tmp[w][:hb.shape[0]])
            np.matmul(h, p.mlp_c_proj_weight, out=m[r])  # [R, F] -> [R, D]
            m[r] += p.mlp_c_proj_bias
            np.add(xm[r], m[r], out=x_next[r])  # resid_post = resid_mid + mlp(ln_2(resid_mid))

        run(qkv_rows, range(len(rows)))
        run(attn_chunks, range(len(rows)))
        run(block_rows, range(len(rows)))

    logits = _empty_small_pages((T, config.vocab_size), dt)  # [T, V]
    unembed_t = params.unembed.T  # [D, V] view: BLAS reads the transpose, nothing is copied

    def logit_rows(w):
        r = rows[w]
        layer_norm_(resid[L, r], params.ln_f_weight, params.ln_f_bias, eps, out=ln[r])
        np.matmul(ln[r], unembed_t, out=logits[r])  # [R, D] -> [R, V]

    run(logit_rows, range(len(rows)))
    return Trace(ids, resid, logits, mid, attn_outs, mlp_outs, pats, head_outs)
