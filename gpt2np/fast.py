"""The same forward pass as ``model.forward``, arranged for speed on CPUs with NumPy. Read model.py first.

Nothing here changes the maths: ``forward_fast`` returns the same ``Trace`` as ``model.forward`` up to
float32 rounding (``tests/test_fast.py`` checks it). What changes is how the work is laid out:

* **No temporaries where an output buffer will do.** Every matrix product writes into a buffer
  (``np.matmul(..., out=...)``), bias, LayerNorm, GELU and softmax work in place, and the streams
  are written straight into the trace's stacked arrays. Nothing is ever promoted to float64.
* **No copies of weights.** ``wte.T`` and the per-head views of ``q``, ``k``, ``v`` are strided
  views that BLAS reads as they are; the weights are used exactly as loaded.
* **Causal attention in query chunks.** Queries are taken ``CHUNK`` rows at a time and scored only
  against the keys up to the chunk's last query, so about half of the ``T x T`` scores (the masked
  half) is never computed; only the chunk's diagonal block needs the mask. A chunk's scores stay in
  the CPU cache while softmax passes over them. The scale ``1/sqrt(d)`` is applied to ``q`` (a power
  of two for d = 64, so exact) and, without patterns, the softmax division is applied to the
  ``[H, C, d]`` output instead of the ``[H, C, S]`` probabilities.
* **All cores on everything.** NumPy runs element-wise work (softmax, GELU, LayerNorm) on one core.
  When ``threadpoolctl`` is installed and T is large enough, the rows are split across ``workers``
  Python threads (NumPy releases the GIL), each running single-threaded BLAS on its rows; the
  attention is split by query chunks. Without threadpoolctl, or with ``workers=1``, the same code
  runs in one thread and BLAS uses its own threads. The BLAS thread count is restored on return.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np

from .config import Config
from .model import MASKED, Trace
from .weights import Block, Params

CHUNK = 64  # query rows per attention chunk: [H, CHUNK, S] float32 scores stay in the L2 cache
MLP_ROWS = 128  # rows per MLP block: the [rows, F] hidden activations stay in the L2 cache
MIN_ROWS_PER_WORKER = 64  # below this, one thread with multi-threaded BLAS does better


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
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    threads = max(c.num_threads for c in blas.lib_controllers)
    return max(1, min(cores, threads, T // MIN_ROWS_PER_WORKER))


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


def _attend_chunks(q, k, v, z, chunks, upper, scores, pattern=None) -> None:
    """Causal attention for the given query chunks, written into ``z``.

    ``q, k, v : [H, T, d]`` views (q already scaled), ``z : [T, H, d]`` output view, ``upper``
    ``[C, C]`` bool, True above the diagonal, ``scores`` scratch ``[H, C, T]``, ``pattern`` an
    optional ``[H, T, T]`` zeroed output.
    """
    for i0, i1 in chunks:
        c = i1 - i0
        s = pattern[:, i0:i1, :i1] if pattern is not None else scores[:, :c, :i1]  # [H, c, S=i1]
        np.matmul(q[:, i0:i1], k[:, :i1].transpose(0, 2, 1), out=s)
        np.copyto(s[:, :, i0:i1], MASKED, where=upper[:c, :c])  # [H, c, c]: key j > query i is masked
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        total = s.sum(axis=-1, keepdims=True)  # [H, c, 1]
        np.reciprocal(total, out=total)
        out = z[i0:i1].transpose(1, 0, 2)  # [H, c, d] view of the merged output
        np.matmul(s, v[:, :i1], out=out)  # unnormalised: divide the [H, c, d] result, not [H, c, S]
        out *= total
        if pattern is not None:  # the same output bits whether or not the pattern is kept
            s *= total


def forward_fast(params: Params, config: Config, ids: np.ndarray, *, sublayers: bool = False,
                 patterns: bool = False, workers: int | None = None) -> Trace:
    """``model.forward`` for NumPy arrays, faster; returns the same ``Trace``.

    Parameters
    ----------
    params, config : the model, with NumPy float32 arrays
    ids : ndarray of int, shape (T,), already checked (``model.check_ids``)
    sublayers, patterns : as in ``model.forward``
    workers : threads to split the work over (default: BLAS's thread count, at most the usable
        cores, at least 64 positions each; 1 when threadpoolctl is not installed)
    """
    T = ids.shape[0]
    blas = _blas_controller() if workers is None or workers > 1 else None
    workers = default_workers(T, blas) if workers is None else max(1, int(workers))
    # With several workers, each runs BLAS on its own thread; the BLAS thread count comes back on exit.
    single_blas = blas.limit(limits=1) if workers > 1 and blas is not None else nullcontext()
    with single_blas, (ThreadPoolExecutor(workers) if workers > 1 else nullcontext()) as pool:
        return _forward(params, config, ids, sublayers, patterns, workers, pool)


def _forward(params: Params, config: Config, ids, sublayers: bool, patterns: bool, workers: int, pool) -> Trace:
    L, T, D, H = config.n_layer, ids.shape[0], config.n_embd, config.n_head
    F, eps, dt = config.d_mlp, config.layer_norm_epsilon, params.wte.dtype
    d = D // H
    scale = 1.0 / math.sqrt(d)

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
    scores = [np.empty((H, C, T), dt) for _ in rows] if not patterns else [None] * len(rows)
    hidden = [(np.empty((MLP_ROWS, F), dt), np.empty((MLP_ROWS, F), dt)) for _ in rows]

    heads = qkv.reshape(T, 3, H, d).transpose(1, 2, 0, 3)  # [3, H, T, d] views, no copy
    q, k, v = heads[0], heads[1], heads[2]
    z_heads = z.reshape(T, H, d)

    np.take(params.wte, ids, axis=0, out=resid[0])  # [T, D]
    resid[0] += params.wpe[:T]

    for l, p in enumerate(params.h):
        x, x_next = resid[l], resid[l + 1]
        a = attn_outs[l] if sublayers else a_buf  # [T, D]
        xm = mid[l] if sublayers else mid_buf  # resid_mid [T, D]
        m = mlp_outs[l] if sublayers else m_buf  # [T, D]

        def qkv_rows(w, p=p, x=x):
            r = rows[w]
            layer_norm_(x[r], p.ln_1_weight, p.ln_1_bias, eps, out=ln[r])
            np.matmul(ln[r], p.attn_c_attn_weight, out=qkv[r])  # [R, D] -> [R, 3D]
            qkv[r] += p.attn_c_attn_bias
            qkv[r, :D] *= scale  # q / sqrt(d)

        def attn_chunks(w, l=l):
            _attend_chunks(q, k, v, z_heads, chunks[w], upper, scores[w], None if pats is None else pats[l])

        def block_rows(w, p=p, x=x, x_next=x_next, a=a, xm=xm, m=m):
            r = rows[w]
            np.matmul(z[r], p.attn_c_proj_weight, out=a[r])  # [R, D]
            a[r] += p.attn_c_proj_bias
            np.add(x[r], a[r], out=xm[r])  # resid_mid = x + attn(ln_1(x))
            layer_norm_(xm[r], p.ln_2_weight, p.ln_2_bias, eps, out=ln[r])
            h_buf, tmp_buf = hidden[w]
            for i0 in range(r.start, r.stop, MLP_ROWS):
                b = slice(i0, min(i0 + MLP_ROWS, r.stop))
                h, tmp = h_buf[:b.stop - b.start], tmp_buf[:b.stop - b.start]
                np.matmul(ln[b], p.mlp_c_fc_weight, out=h)  # [R, D] -> [R, F]
                h += p.mlp_c_fc_bias
                gelu_new_(h, tmp)
                np.matmul(h, p.mlp_c_proj_weight, out=m[b])  # [R, F] -> [R, D]
            m[r] += p.mlp_c_proj_bias
            np.add(xm[r], m[r], out=x_next[r])  # resid_post = resid_mid + mlp(ln_2(resid_mid))

        run(qkv_rows, range(len(rows)))
        run(attn_chunks, range(len(rows)))
        run(block_rows, range(len(rows)))

    logits = np.empty((T, config.vocab_size), dt)
    unembed_t = params.unembed.T  # [D, V] view: BLAS reads the transpose, nothing is copied

    def logit_rows(w):
        r = rows[w]
        layer_norm_(resid[L, r], params.ln_f_weight, params.ln_f_bias, eps, out=ln[r])
        np.matmul(ln[r], unembed_t, out=logits[r])  # [R, D] -> [R, V]

    run(logit_rows, range(len(rows)))
    return Trace(ids, resid, logits, mid, attn_outs, mlp_outs, pats)
