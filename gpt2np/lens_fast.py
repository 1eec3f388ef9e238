"""The same logit lens as ``lens.logit_lens``, arranged for speed on CPUs with NumPy. Read lens.py first.

``logit_lens_fast`` returns the same ``Lens`` as the plain loop: ranks, top-k and lock-in computed by
the same rules from float32 logits, the float quantities within float32 rounding
(``tests/test_lens_fast.py`` holds it to that). ``gpt2np.logit_lens`` uses it for NumPy arrays. What
changes is how the work is laid out:

* **The anchors' products once.** The final and input rows are the KL anchors; their logits are made
  first in each chunk and also serve as those rows' own (they are not computed twice).
* **KL without a pass over V per row.** With z = x_hat @ W.T and p_a the anchor's probabilities,

      KL(anchor || row) = (lse_row - lse_anchor) - (x_hat_row - x_hat_anchor) . (p_a @ W)

  which is exactly 0 for the anchor's own row and costs one ``[C, V] @ [V, D]`` product per anchor
  and chunk instead of a ``[C, V]`` pass per row.
* **Row-by-row reductions in the L2 cache** (``reduce_rows``): one position's ``[V]`` logits are read
  from memory once, then every pass (column maxima, target counts, shift, exp, two BLAS dots) runs on
  the cached row; log-sum-exp and entropy are finished in float64 per position.
* **Top-k from column maxima** (``top_k_from_columns``): exact, without sorting the vocabulary.
* **Products and reductions side by side** (``run_steps``): with ``threads`` > 1 and threadpoolctl,
  each product is cut into one block per thread (BLAS single-threaded in each), while the previous
  product's reductions run on one of the threads; that thread's block is smaller by the reductions'
  estimated cost (``REDUCE_MACS``). The cut depends on the shapes and the thread count only, never on
  timings: the same call gives the same bits every time.
* **A workspace allocated once**: two logits buffers (one is reduced while the next product fills the
  other), the anchors' ``exp(z - max)``, one row's scratch; short windows stack several rows in one
  product (a product reads the whole unembedding whatever its row count).
"""
from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import numpy as np

from .backend import usable_cores
from .decoder import INPUT, Decoder
from .fast import _blas_controller, _empty_small_pages
from .lens import CHUNK, assemble, check_options, empty_cells, progress_bar, settings
from .result import Lens, next_ids

# A logit's reductions cost about as much one-core time as this many multiply-adds of the products.
# Measured (scripts/bench_lens.py, gpt2 shape, 2 cores): the reductions of 512 positions of a 50257-token
# vocabulary took ~45 ms beside the products, a [512, 768] @ [768, 50257] product ~240 ms of one core.
REDUCE_MACS = 144


def logit_lens_fast(model, trace, *, k: int = 5, step: int = 1, include_input: bool = True,
                    sublayers: bool = False, start: int = 0, end: int | None = None, norm: str = "ln_f",
                    decoder_blocks: int = 0, decoder: Decoder | None = None, translator=None,
                    chunk: int = CHUNK, threads: int | None = None, progress: bool = False) -> Lens:
    """``lens.logit_lens`` for NumPy arrays, faster; the same arguments, and ``threads`` (default: the
    usable cores, at most 2; 1 without threadpoolctl). ``progress``: a bar over the matrix products."""
    rows, dec, start, end = check_options(model, trace, k=k, step=step, include_input=include_input,
                                          sublayers=sublayers, start=start, end=end, norm=norm,
                                          decoder_blocks=decoder_blocks, decoder=decoder, translator=translator,
                                          chunk=chunk)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ValueError(f"threads={threads!r} must be a positive integer (or None: the usable cores, at most 2)")
    L, V, D = model.config.n_layer, model.config.vocab_size, model.config.n_embd
    W_un = model.params.unembed  # [V, D]
    W_unT = W_un.T  # [D, V] a view, no copy
    ids = np.asarray(trace.ids).astype(np.int64)
    Wn, R = end - start, len(rows)
    out = empty_cells(R, Wn, k)
    nxt = next_ids(ids, start, end)  # [W]

    # With decoder blocks, each row's prefix runs through them once: keep the [W, D] result.
    cached = {r: dec.read(model, trace, r, start, end) for r in rows} if dec.blocks else {}
    input_hat = cached[INPUT] if INPUT in cached else dec.read(model, trace, INPUT, start, end)  # [W, D]
    # The anchors' logits are those of two rows when these are shown: the input row, and the last
    # block's row when no decoder blocks run (the final stream read the same way).
    r_input = rows.index(INPUT) if INPUT in rows else None
    r_final = None if dec.blocks else next((r for r, row in enumerate(rows) if row[1:] == ("resid", L)), None)
    others = [r for r in range(R) if r not in (r_final, r_input)]  # rows that are not anchors

    C0 = min(chunk, Wn)  # positions per chunk
    per = max(1, chunk // C0)  # rows per product: a window shorter than the chunk puts several rows in one
    z_rows = C0 * max(min(per, 2), min(per, len(others)))
    threads = int(threads) if threads is not None else min(2, usable_cores())
    work, blas_limit = workspace(z_rows, 2 * C0, V, 3, threads)
    flip = itertools.count()  # alternates the logits buffers

    def chunk_steps(c0: int, c1: int):
        """The products of window positions [c0, c1) and their reductions, in order (see ``run_steps``):
        the anchors' logits, their ``p @ W``, then every other row, up to ``per`` rows a product."""
        a, b, C = start + c0, start + c1, c1 - c0
        got = {}  # what reductions leave for later steps: targets, the anchors' reductions, u = p @ W

        def z_buf(n):
            return work.z[next(flip) % 2][:n]

        def reduce_anchors(z):  # z: the final's [C, V] logits, or the final's then the input's [2C, V]
            out["final_ids"][c0:c1] = np.argmax(z[:C], axis=1)  # first maximum: ties -> lower id
            got["targets"] = np.stack([out["final_ids"][c0:c1], ids[a:b], nxt[c0:c1]], axis=1)  # [C, 3]
            got["final"] = reduce_rows(z[:C], got["targets"], k, work.e[:C], work.scratch)
            if z.shape[0] > C:
                got["input"] = reduce_rows(z[C:], got["targets"], k, work.e[C:2 * C], work.scratch)

        def reduce_input(z):
            got["input"] = reduce_rows(z, got["targets"], k, work.e[C:2 * C], work.scratch)

        def keep_u(names):  # u = p @ W = (exp(z - max) @ W) / s, float64, for the anchors named
            def keep(u):
                u = u.astype(np.float64)
                for j, name in enumerate(names):
                    got["u_" + name] = u[j * C:(j + 1) * C] / got[name]["s"][:, None]
                if "input" in names:  # both anchors known: their own rows are done
                    for r, xh, name in ((r_final, final_hat, "final"), (r_input, in_hat, "input")):
                        if r is not None:
                            store(r, xh, got[name])
            return keep

        def reduce_group(group):  # group: [(r, xh [C, D])], whose logits are stacked in one product
            def reduce(z):
                red = reduce_rows(z, np.tile(got["targets"], (len(group), 1)), k, None, work.scratch)
                for j, (r, xh) in enumerate(group):
                    store(r, xh, {key: v[j * C:(j + 1) * C] for key, v in red.items()})
            return reduce

        def store(r, xh, red):  # one row's reductions -> the result arrays
            lse, xh64 = red["lse"], xh.astype(np.float64)
            for key, a_hat, name in (("kl_final", final64, "final"), ("kl_input", input64, "input")):
                kl = (lse - got[name]["lse"]) - np.einsum("cd,cd->c", xh64 - a_hat, got["u_" + name])
                out[key][r, c0:c1] = np.maximum(kl, 0.0)  # KL >= 0; rounding can give -1e-7
            out["top_ids"][r, c0:c1] = red["top_ids"]
            out["top_logits"][r, c0:c1] = red["top_logits"]
            out["top_probs"][r, c0:c1] = np.exp(red["top_logits"].astype(np.float64) - lse[:, None])
            out["entropy"][r, c0:c1] = red["entropy"]
            out["final_rank"][r, c0:c1] = red["ranks"][:, 0]
            out["input_rank"][r, c0:c1] = red["ranks"][:, 1]
            has_next = nxt[c0:c1] >= 0
            logp_next = red["target_logits"][:, 2].astype(np.float64) - lse
            out["next_rank"][r, c0:c1] = np.where(has_next, red["ranks"][:, 2], -1)
            out["next_prob"][r, c0:c1] = np.where(has_next, np.exp(logp_next), np.nan)
            out["next_xent"][r, c0:c1] = np.where(has_next, -logp_next, np.nan)

        final_hat = dec.final(model, trace, a, b)  # [C, D]
        in_hat = input_hat[c0:c1]
        final64, input64 = final_hat.astype(np.float64), in_hat.astype(np.float64)
        u_buf = np.empty((2 * C, D), np.float32)
        if per == 1:  # long windows: each product reads the unembedding for a full chunk
            yield (final_hat, W_unT, z_buf(C)), reduce_anchors, C * V, False
            yield (in_hat, W_unT, z_buf(C)), reduce_input, C * V, False
            yield (work.e[:C], W_un, u_buf[:C]), keep_u(["final"]), 0, False
            yield (work.e[C:2 * C], W_un, u_buf[C:]), keep_u(["input"]), 0, False
        else:  # one product for both anchors; their p @ W waits for their reductions
            yield (np.concatenate([final_hat, in_hat]), W_unT, z_buf(2 * C)), reduce_anchors, 2 * C * V, False
            yield (work.e[:2 * C], W_un, u_buf), keep_u(["final", "input"]), 0, True
        for i in range(0, len(others), per):
            group = [(r, cached[rows[r]][c0:c1] if dec.blocks else dec.read(model, trace, rows[r], a, b))
                     for r in others[i:i + per]]  # [C, D] each
            x = group[0][1] if len(group) == 1 else np.concatenate([xh for _, xh in group])
            yield (x, W_unT, z_buf(len(group) * C)), reduce_group(group), len(group) * C * V, False

    n_chunks = len(range(0, Wn, chunk))
    products = n_chunks * ((4 if per == 1 else 2) + math.ceil(len(others) / per))  # the steps chunk_steps yields
    try:
        with blas_limit, progress_bar(progress, products, "product") as bar:
            run_steps(_ticking(itertools.chain.from_iterable(chunk_steps(c0, min(c0 + chunk, Wn))
                                                             for c0 in range(0, Wn, chunk)), bar), work)
    finally:
        if work.pool is not None:
            work.pool.shutdown()
    return assemble(model, ids, rows, start, end, out, settings(k, step, include_input, sublayers, dec, model))


def _ticking(steps, bar):
    """The steps, the progress bar advanced as each one is taken."""
    for step in steps:
        yield step
        bar.update()


# -------------------------------------------------------------------------------------------------
# Reductions of one [n, V] block of logits, a row at a time


def columns(V: int) -> int:
    """Column count G of the top-k threshold: 1024, or V // 16 for small vocabularies."""
    return min(1024, max(1, V // 16))


def top_k_from_columns(z: np.ndarray, cmax: np.ndarray, k: int):
    """Exact top-k of each row of ``z [n, V]`` from its column maxima ``cmax [n, G (+1)]``.

    The view ``[n, V // G, G]`` puts token ids j, j + G, j + 2G, ... in column j; the ids past
    ``V // G * G`` (the tail) count as one more column. The k-th largest column maximum is a threshold
    at least k logits reach, and every logit that reaches it lies in a column whose maximum does, or in
    the tail: those few columns are gathered, and their logits at or above the threshold (exact ties
    included) sorted by value, then by lower id. Returns ``(top_ids [n, k] int64, top_logits [n, k])``.
    """
    n, V = z.shape
    G = columns(V)
    nb = V // G
    body = z[:, :nb * G].reshape(n, nb, G)  # [n, nb, G] a view
    tail = z[:, nb * G:]  # [n, V - nb * G]
    thr = np.partition(cmax, cmax.shape[1] - k, axis=1)[:, -k]  # [n] k-th largest column maximum
    rows, cols = np.nonzero(cmax[:, :G] >= thr[:, None])  # the columns that reach it
    vals = body[rows, :, cols].reshape(-1)  # [P * nb] their logits
    ids = (cols[:, None] + G * np.arange(nb)).reshape(-1)
    rows = np.repeat(rows, nb)
    if tail.shape[1]:
        t_rows, t_cols = np.nonzero(tail >= thr[:, None])
        rows, ids = np.concatenate([rows, t_rows]), np.concatenate([ids, nb * G + t_cols])
        vals = np.concatenate([vals, tail[t_rows, t_cols]])
    keep = vals >= thr[rows]
    rows, ids, vals = rows[keep], ids[keep], vals[keep]
    order = np.lexsort((ids, -vals, rows))  # by row, then value desc, then id asc
    start = np.searchsorted(rows[order], np.arange(n))  # each row's first candidate
    pick = order[start[:, None] + np.arange(k)]  # [n, k]
    return ids[pick].astype(np.int64), vals[pick]


def reduce_rows(z: np.ndarray, targets: np.ndarray, k: int, e: np.ndarray | None, scratch: tuple) -> dict:
    """Every lens reduction of ``z [n, V]`` against ``targets [n, J]`` (-1: none), row by row.

    One row's ``[V]`` logits come from memory once and stay in the L2 cache through every pass:
    the column maxima (for the top-k and the max), one comparison with the row's J target logits
    and their counts, the shift, exp and two BLAS dot products. (The same passes over a whole
    ``[16, V]`` block, one operation at a time, took 1.5 times as long: the block leaves the cache.)

    ``z`` is left as it is. ``e``: ``None``, or float32 ``[n, V]`` that receives ``exp(z - max)`` (an
    anchor's ``p @ W`` reads it). ``scratch``: float32 ``[V]`` twice and bool ``[J, V]``, reused.

    Returns ``top_ids [n, k]`` int64, ``top_logits [n, k]`` float32, ``target_logits [n, J]`` float32,
    ``ranks [n, J]`` int64 (1 + the number of strictly larger logits), ``s [n]`` (the sum of
    ``exp(z - max)``), ``lse [n]`` and ``entropy [n]``, float64.
    """
    n, V = z.shape
    d, e_row, b = scratch
    J, G = targets.shape[1], columns(V)
    W = V // G * G  # ids in the [V // G, G] view; the rest is the tail
    cmax = np.empty((n, G + (W < V)), z.dtype)  # [n, G (+1)] column maxima
    if W < V:
        cmax[:, G] = z[:, W:].max(axis=1)  # the tails: a few columns
    t = np.take_along_axis(z, np.clip(targets, 0, None), axis=1)  # [n, J] target logits
    counts = np.empty((n, J), np.int64)
    s, ez = np.empty(n, z.dtype), np.empty(n, z.dtype)
    ones = np.ones(V, z.dtype)
    by_column = z[:, :W].reshape(n, -1, G)  # [n, V // G, G]: column g holds ids g, g + G, ...
    targets_b = list(b[:J])  # J row views of b, made once
    rows = zip(z, by_column, cmax[:, :G], cmax, t[:, :, None], itertools.repeat(e_row) if e is None else e)
    for i, (zi, ci, gi, mi, ti, ei) in enumerate(rows):  # views of row i; the loop makes no others
        np.greater(zi, ti, out=b[:J])  # [J, V] first: a streaming read of the row (the cheapest way in)
        np.max(ci, axis=0, out=gi)
        counts[i] = [np.count_nonzero(bj) for bj in targets_b]  # #(z > t)
        np.subtract(zi, mi.max(), out=d)  # z - max, <= 0
        np.exp(d, out=ei)
        s[i] = np.dot(ei, ones)  # BLAS: three times as fast as ei.sum()
        ez[i] = np.dot(ei, d)  # E[z - max] * s
    if k <= G:
        top_ids, top_logits = top_k_from_columns(z, cmax, k)
    else:  # the threshold needs k column maxima; for so large a k, a stable sort (ties: lower id first)
        top_ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
        top_logits = np.take_along_axis(z, top_ids, axis=1)
    s64, m = s.astype(np.float64), cmax.max(axis=1).astype(np.float64)
    return {"top_ids": top_ids.astype(np.int64), "top_logits": top_logits, "target_logits": t,
            "ranks": 1 + counts, "s": s64, "lse": m + np.log(s64),
            "entropy": np.log(s64) - ez.astype(np.float64) / s64}


# -------------------------------------------------------------------------------------------------
# The workspace, and the products beside the reductions


@dataclass(frozen=True)
class Work:
    """The NumPy workspace of one lens call, allocated once and reused by every chunk.

    With ``pool`` (``threads`` > 1, threadpoolctl installed), every matrix product is cut into one
    block per thread, each thread's BLAS single-threaded, and each product's reductions run on one pool
    thread while the next product runs (see ``run_steps``). (BLAS's own threads are no help here: they
    keep spinning for a while after every product, and reductions run after a two-thread product went
    at half speed.)
    """

    pool: ThreadPoolExecutor | None
    threads: int
    z: tuple  # two float32 [rows, V] buffers: one product's logits are reduced while the next's are made
    e: np.ndarray  # float32 [2C, V]: exp(z - max) of the final anchor, then of the input anchor, for p @ W
    scratch: tuple  # float32 [V], float32 [V], bool [J, V]: one row's reduction


def workspace(z_rows: int, e_rows: int, V: int, J: int, threads: int) -> tuple[Work, object]:
    """The workspace, and the context that keeps BLAS single-threaded while the pool runs."""
    blas = _blas_controller() if threads > 1 else None  # None without threadpoolctl
    pooled = blas is not None and bool(blas.lib_controllers)
    work = Work(pool=ThreadPoolExecutor(threads) if pooled else None, threads=threads if pooled else 1,
                z=tuple(_empty_small_pages((z_rows, V), np.float32) for _ in range(2)),  # fast.py says why
                e=_empty_small_pages((e_rows, V), np.float32),
                scratch=(np.empty(V, np.float32), np.empty(V, np.float32), np.empty((J, V), bool)))
    return work, (blas.limit(limits=1) if pooled else nullcontext())


def cut(length: int, threads: int, reduction: float) -> list[int]:
    """Bounds of one product's blocks along ``length``, one per thread, the last smaller by ``reduction``
    (the pending reductions' cost in units of one block element), so that all threads finish together.
    A function of its arguments only: the same shapes are always cut the same way."""
    share = (length + reduction) / threads
    sizes = [share] * (threads - 1) + [max(0.0, share - reduction)]
    bounds = [0] + [min(length, round(x)) for x in itertools.accumulate(sizes)]
    bounds[-1] = length
    return bounds


def run_steps(steps, work: Work) -> None:
    """Run ``steps``, an iterable of ``(product, reduce, reduced, after)``: ``product = (a, b, out)`` is
    ``out = a @ b``; ``reduce`` is then called with ``out``; ``reduced`` is the number of logits it reads
    (its cost); with ``after``, the previous step's reduction is done before this product starts.

    A step's reduction runs after the next step has been taken from the iterable and before the next
    product completes, so a step may use what the reductions before the previous one left. Without a
    pool that is all. With one, step i's reduction runs on one thread while step i + 1's product runs
    on every thread, cut along V into one block per thread by ``cut``.
    """
    pending = None  # the previous step's (reduce, result, reduced)
    for (a, b, out), reduce, reduced, after in steps:
        if after and pending is not None:  # this product reads what the pending reduction writes
            pending[0](pending[1])
            pending = None
        if work.pool is None:
            if pending is not None:
                pending[0](pending[1])
            np.matmul(a, b, out=out)
        else:
            unit = a.shape[0] * min(b.shape)  # multiply-adds of one column of logits, or one row of W
            bounds = cut(max(b.shape), work.threads, 0.0 if pending is None else pending[2] * REDUCE_MACS / unit)
            parts, finish = blocks(a, b, out, bounds)
            waiting = work.pool.submit(*pending[:2]) if pending is not None else None
            for f in [work.pool.submit(part) for part in parts]:  # queued after the reduction
                f.result()
            finish()
            if waiting is not None:
                waiting.result()
        pending = (reduce, out, reduced)
    if pending is not None:
        pending[0](pending[1])


def blocks(a: np.ndarray, b: np.ndarray, out: np.ndarray, bounds: list[int]):
    """``out = a @ b`` as independent products, one per block ``bounds[i]:bounds[i + 1]`` of V, and
    what finishes it: blocks of b's columns (the logits, ``[C, D] @ [D, V]``), or, when b is taller than
    wide (``p @ W``, ``[C, V] @ [V, D]``), of its rows, whose partial products are then summed in order
    (narrow column blocks of W ran 25% slower)."""
    spans = list(zip(bounds, bounds[1:]))
    if b.shape[1] >= b.shape[0]:
        return [partial(np.matmul, a, b[:, p:q], out=out[:, p:q]) for p, q in spans], lambda: None
    sums = np.zeros((len(spans), *out.shape), out.dtype)  # [n, C, D]; an empty block leaves zeros
    return ([partial(np.matmul, a[:, p:q], b[p:q], out=sums[i]) for i, (p, q) in enumerate(spans)],
            lambda: np.sum(sums, axis=0, out=out))
