"""The logit lens (nostalgebraist, 2020), as specified in ``shared/reference/lens-spec.md``.

Each row of the residual stream is read through the decoder (``ln_f`` then the tied unembedding,
or a variant) and reduced, position by position, to a few numbers: top-k tokens, ranks, KL
divergences, entropy, next-token statistics. The full ``[rows, T, V]`` array is never built: rows
are read in chunks of positions, one large matrix product per (row, chunk), with the reductions
right after it, so memory stays ``O(rows x T x k)`` plus four ``[chunk, V]`` buffers (NumPy; 412 MB
for GPT-2 at the default chunk). The final and input rows are the KL anchors: their products are
made once, first in each chunk.

Numerics. Logits come from float32 products; log-sum-exp, entropy, KL and probabilities are
finished in float64 per position. KL uses the identity (z = x_hat @ W.T, W the unembedding)

    KL(final || row) = sum_v p_f (log p_f - log p_row)
                     = (lse_row - lse_final) - (x_hat_row - x_hat_final) . (p_final @ W)

which is exactly 0 for the final row, free of cancellation near it, and costs one ``[chunk, V]``
product per chunk instead of one ``[chunk, V]`` pass per row. Ranks count strictly larger
logits (ties count in the token's favour); top-k ties go to the lower token id.
"""
from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import model as M
from .backend import namespace, to_numpy, usable_cores

NORMS = ("ln_f", "norm", "raw")
CHUNK = 512  # positions per matrix product: [512, 50257] float32 = 103 MB; 256 was 9% slower


@dataclass(frozen=True)
class Lens:
    """Logit-lens results for rows R (depth order) and window positions W = end - start.

    Arrays over (row, position) are ``[R, W]``; ``top_*`` are ``[R, W, k]``. At the last position of
    the sequence the next token is unknown: ``next_rank`` is -1, ``next_prob`` and ``next_xent`` NaN.
    """

    rows: tuple  # R labels: "input", "0.attn", "0", ...
    ids: np.ndarray  # [T] the whole sequence
    tokens: np.ndarray  # [T] display strings of ids
    start: int
    end: int
    top_ids: np.ndarray  # [R, W, k] int64
    top_logits: np.ndarray  # [R, W, k] float32
    top_probs: np.ndarray  # [R, W, k] float64
    top_tokens: np.ndarray  # [R, W, k] display strings
    final_ids: np.ndarray  # [W] the final distribution's top-1 token
    final_rank: np.ndarray  # [R, W] rank of the final top-1 under the row (1 = top)
    kl_final: np.ndarray  # [R, W] KL(final || row), nats
    kl_input: np.ndarray  # [R, W] KL(input || row), nats
    input_rank: np.ndarray  # [R, W] rank of the input token under the row
    entropy: np.ndarray  # [R, W] nats
    next_rank: np.ndarray  # [R, W] rank of the true next token (-1 where unknown)
    next_prob: np.ndarray  # [R, W] its probability (NaN where unknown)
    next_xent: np.ndarray  # [R, W] its cross-entropy -log p, nats (NaN where unknown)
    lock_in: np.ndarray  # [W] index of the first row from which top-1 == final top-1 to the last row
    settings: dict = field(default_factory=dict)

    # --- derived views -------------------------------------------------------------------------
    @property
    def positions(self) -> np.ndarray:
        """``[W]`` absolute positions of the window."""
        return np.arange(self.start, self.end)

    @property
    def input_ids(self) -> np.ndarray:
        return self.ids[self.start:self.end]

    @property
    def next_ids(self) -> np.ndarray:
        """``[W]`` true next token ids, -1 at the last position of the sequence."""
        return _next_ids(self.ids, self.start, self.end)

    @property
    def top1(self) -> np.ndarray:
        """``[R, W]`` top-1 token of each cell."""
        return self.top_ids[..., 0]

    @property
    def matches_final(self) -> np.ndarray:
        """``[R, W]`` bool: the cell's top-1 equals the final top-1 (the post's outlines)."""
        return self.top1 == self.final_ids[None, :]

    @property
    def final_correct(self) -> np.ndarray:
        """``[W]`` bool: the final top-1 equals the true next token (the post's ``*``)."""
        return self.final_ids == self.next_ids

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain Python (lists, numbers, strings; NaN as None) ready for ``json.dumps``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = v.tolist() if v.dtype.kind != "f" else np.where(np.isnan(v), None, v).tolist()
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def save(self, path: str | Path) -> Path:
        """Save to ``.npz`` (compressed, no pickle) or ``.json``, chosen by the extension."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(self.to_dict()))
            return path
        if path.suffix.lower() != ".npz":
            raise ValueError(f"cannot save a lens as {path.suffix or 'a file without extension'}: use .npz or .json")
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}
        meta = {"rows": list(self.rows), "start": self.start, "end": self.end, "settings": self.settings}
        with open(path, "wb") as f:  # a file object: NumPy would append ".npz" to a path ending ".NPZ"
            np.savez_compressed(f, __meta__=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Lens":
        """Load a lens saved with ``save`` (``.npz`` or ``.json``)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            kinds = {f.name: f for f in fields(cls)}
            args = {}
            for name, v in raw.items():
                if name not in kinds:
                    continue
                if name in ("rows",):
                    args[name] = tuple(v)
                elif name in ("start", "end", "settings"):
                    args[name] = v
                else:
                    args[name] = _from_json_list(name, v)
            return cls(**args)
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        return cls(rows=tuple(meta["rows"]), start=meta["start"], end=meta["end"], settings=meta["settings"],
                   **arrays)


def _next_ids(ids: np.ndarray, start: int, end: int) -> np.ndarray:
    """``[end - start]`` the token after each position of the window, -1 after the sequence's last."""
    nxt = np.full(end - start, -1, np.int64)
    avail = ids[start + 1:end + 1]
    nxt[:len(avail)] = avail
    return nxt


_INT_FIELDS = {"ids", "top_ids", "final_ids", "final_rank", "input_rank", "next_rank", "lock_in"}
_STR_FIELDS = {"tokens", "top_tokens"}


def _from_json_list(name: str, v) -> np.ndarray:
    if name in _INT_FIELDS:
        return np.asarray(v, np.int64)
    if name in _STR_FIELDS:
        return np.asarray(v, dtype=str)
    a = np.asarray(v, dtype=object)
    a = np.where(a == None, np.nan, a)  # noqa: E711  (JSON null -> NaN)
    return a.astype(np.float32 if name == "top_logits" else np.float64)


# -------------------------------------------------------------------------------------------------
# Rows and decoders


def select_rows(n_layer: int, *, step: int = 1, include_input: bool = True, sublayers: bool = False,
                decoder_blocks: int = 0) -> list[tuple[str, str, int]]:
    """The shown rows in depth order as ``(label, source, index)`` with source ``resid`` or ``resid_mid``.

    Of the n = L - decoder_blocks shown blocks, block l is kept when (n - 1 - l) % step == 0, so the
    last shown block is always kept; ``l.attn`` comes with every kept block l when ``sublayers``.
    """
    n = n_layer - decoder_blocks
    rows = [("input", "resid", 0)] if include_input else []
    for l in range(n):
        if (n - 1 - l) % step == 0:
            if sublayers:
                rows.append((f"{l}.attn", "resid_mid", l))
            rows.append((str(l), "resid", l + 1))
    return rows


def decoder_norm(model, x, norm: str):
    """The decoder's normalisation of a stream ``x [..., D]`` (the unembedding comes after)."""
    p, eps = model.params, model.config.layer_norm_epsilon
    if norm == "ln_f":
        return M.layer_norm(x, p.ln_f_weight, p.ln_f_bias, eps)
    if norm == "norm":
        return M.layer_norm(x, None, None, eps)
    return x


def run_blocks(model, x, first: int):
    """Run blocks ``first..L-1`` on a whole prefix ``x [T, D]`` exactly as the model does."""
    p, eps, H = model.params, model.config.layer_norm_epsilon, model.config.n_head
    for b in p.h[first:]:
        x = x + M.attention(M.layer_norm(x, b.ln_1_weight, b.ln_1_bias, eps), b, H)[0]
        x = x + M.mlp(M.layer_norm(x, b.ln_2_weight, b.ln_2_bias, eps), b)
    return x


# -------------------------------------------------------------------------------------------------
# Reductions of one [n, V] block of logits. Both paths return the same dict of per-position arrays:
#   top_ids [n, k] int64, top_logits [n, k] float32, lse [n] float64, s [n] float64 (the sum of
#   exp(z - max)), entropy [n] float64, target_logits [n, J] float32, ranks [n, J] int64
#   (J targets per position; -1 = no target).


def top_k(z, k: int):
    """Ids of the k largest entries of each row of ``z [n, V]``, best first, ties to the lower id.

    k rounds of argmax (which returns the first maximum) with the winner masked: standard-only,
    and cheaper than sorting the vocabulary on a GPU for the small k a lens uses.
    """
    xp = namespace(z)
    cols = xp.arange(z.shape[1])[None, :]  # [1, V]
    out = []
    for _ in range(k):
        best = xp.argmax(z, axis=1)  # [n]
        out.append(best)
        z = xp.where(cols == best[:, None], -xp.inf, z)
    return xp.stack(out, axis=1)  # [n, k]


def reduce_plain(z, targets, k: int, keep_exp: bool = False) -> dict:
    """Array-API reduction (NumPy, CuPy, array_api_strict): the readable reference path.

    With ``keep_exp`` the dict also holds ``exp``, the ``[n, V]`` array ``exp(z - max)`` (an anchor's
    ``p @ W`` product reads it).
    """
    xp = namespace(z)
    m = xp.max(z, axis=1, keepdims=True)  # [n, 1]
    zs = z - m  # [n, V] shifted, <= 0
    e = xp.exp(zs)  # [n, V]
    s = xp.sum(e, axis=1)  # [n]
    ez = xp.sum(e * zs, axis=1)  # [n]  E[z - m] * s, terms all <= 0
    order = top_k(z, k)  # [n, k]
    t = xp.take_along_axis(z, xp.clip(targets, 0, None), axis=1)  # [n, J]
    ranks = 1 + xp.sum(xp.astype(z[:, None, :] > t[:, :, None], xp.int64), axis=2)  # [n, J]
    out = {"top_ids": order, "top_logits": xp.take_along_axis(z, order, axis=1), "target_logits": t,
           "ranks": ranks, "s": s, "ez": ez, "m": m[:, 0]}
    out = _finish({key: to_numpy(v) for key, v in out.items()})
    if keep_exp:
        out["exp"] = e
    return out


def _finish(out: dict) -> dict:
    s, m = out["s"].astype(np.float64), out.pop("m").astype(np.float64)
    out["s"] = s
    out["lse"] = m + np.log(s)
    out["entropy"] = np.log(s) - out.pop("ez").astype(np.float64) / s
    out["top_ids"] = out["top_ids"].astype(np.int64)
    out["ranks"] = out["ranks"].astype(np.int64)
    return out


def _columns(V: int) -> int:
    """Column count G of the top-k threshold: 1024, or V // 16 for small vocabularies."""
    return min(1024, max(1, V // 16))


def _top_k_from_columns(z: np.ndarray, cmax: np.ndarray, k: int):
    """Exact top-k of each row of ``z [n, V]`` from its column maxima ``cmax [n, G (+1)]`` (NumPy path).

    The view ``[n, V // G, G]`` puts token ids j, j + G, j + 2G, ... in column j; the ids past
    ``V // G * G`` (the tail) count as one more column. The k-th largest column maximum is a threshold
    at least k logits reach, and every logit that reaches it lies in a column whose maximum does, or in
    the tail: those few columns are gathered, and their logits at or above the threshold (exact ties
    included) sorted by value, then by lower id. Returns ``(top_ids [n, k] int64, top_logits [n, k])``.
    """
    n, V = z.shape
    G = _columns(V)
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


def reduce_numpy(z: np.ndarray, targets: np.ndarray, k: int, e: np.ndarray | None, scratch: tuple) -> dict:
    """The same reduction as ``reduce_plain``, row by row (NumPy only).

    One row's ``[V]`` logits come from memory once and stay in the L2 cache through every pass:
    the column maxima (for the top-k and the max), one comparison with the row's J target logits
    and their counts, the shift, exp and two BLAS dot products. (The same passes over a whole
    ``[16, V]`` block, one operation at a time, took 1.5 times as long: the block leaves the cache.)

    ``z [n, V]`` is left as it is. ``e``: ``None``, or float32 ``[n, V]`` that receives
    ``exp(z - max)`` (an anchor's ``p @ W`` reads it). ``scratch``: float32 ``[V]`` twice and bool
    ``[J, V]``, reused.
    """
    n, V = z.shape
    if k > _columns(V):  # the threshold needs k column maxima; so large a k is rare: the plain path
        out = reduce_plain(z, targets, k, keep_exp=e is not None)
        if e is not None:
            np.copyto(e, out.pop("exp"))
        return out
    d, e_row, b = scratch
    J, G = targets.shape[1], _columns(V)
    W = V // G * G  # ids in the [V // G, G] view; the rest is the tail
    cmax = np.empty((n, G + (W < V)), z.dtype)  # [n, G (+1)] column maxima
    if W < V:
        cmax[:, G] = z[:, W:].max(axis=1)  # the tails: a few columns
    t = np.take_along_axis(z, np.clip(targets, 0, None), axis=1)  # [n, J] target logits
    counts = np.empty((n, J), np.int64)
    s, ez = np.empty(n, z.dtype), np.empty(n, z.dtype)
    ones = np.ones(V, z.dtype)
    columns = z[:, :W].reshape(n, -1, G)  # [n, V // G, G]: column g holds ids g, g + G, ...
    targets_b = list(b)  # J row views of b, made once
    rows = zip(z, columns, cmax[:, :G], cmax, t[:, :, None], itertools.repeat(e_row) if e is None else e)
    for i, (zi, ci, gi, mi, ti, ei) in enumerate(rows):  # views of row i; the loop makes no others
        np.greater(zi, ti, out=b)  # [J, V] first: a streaming read of the row (the cheapest way in)
        np.max(ci, axis=0, out=gi)
        counts[i] = [np.count_nonzero(bj) for bj in targets_b]  # #(z > t)
        np.subtract(zi, mi.max(), out=d)  # z - max, <= 0
        np.exp(d, out=ei)
        s[i] = np.dot(ei, ones)  # BLAS: three times as fast as ei.sum()
        ez[i] = np.dot(ei, d)  # E[z - max] * s
    ranks = 1 + counts  # rank = 1 + #(z > t)
    top_ids, top_vals = _top_k_from_columns(z, cmax, k)
    out = {"top_ids": top_ids, "top_logits": top_vals, "target_logits": t, "ranks": ranks,
           "s": s, "ez": ez, "m": cmax.max(axis=1)}
    return _finish(out)


@dataclass(frozen=True)
class _Work:
    """The NumPy workspace of one lens call, allocated once and reused by every chunk.

    With ``pool`` (``threads`` > 1, threadpoolctl installed), every matrix product is cut into one
    block per thread, each thread's BLAS single-threaded, and each row's reductions run on one pool
    thread while the next row's product runs (see ``_run``). For GPT-2 a row's reductions take about a
    third of its product's time on two threads; beside the next product they cost about half of that.
    (BLAS's own threads are no help here: they keep spinning for a while after every product, and
    reductions run after a two-thread product went at half speed.)
    """

    pool: ThreadPoolExecutor | None
    threads: int
    z: tuple  # two float32 [rows, V] buffers: one product's logits are reduced while the next's are made
    e: np.ndarray  # float32 [2C, V]: exp(z - max) of the final anchor, then of the input anchor, for p @ W
    scratch: tuple  # float32 [V], float32 [V], bool [J, V]: one row's reduction


def _workspace(z_rows: int, e_rows: int, V: int, J: int, threads: int) -> tuple[_Work, object]:
    """The NumPy workspace, and the context that keeps BLAS single-threaded while the pool runs."""
    from .fast import _blas_controller, _empty_small_pages  # BLAS's thread control (None without threadpoolctl)

    blas = _blas_controller() if threads > 1 else None
    pooled = blas is not None and bool(blas.lib_controllers)
    work = _Work(pool=ThreadPoolExecutor(threads) if pooled else None, threads=threads if pooled else 1,
                 z=tuple(_empty_small_pages((z_rows, V), np.float32) for _ in range(2)),  # fast.py says why
                 e=_empty_small_pages((e_rows, V), np.float32),
                 scratch=(np.empty(V, np.float32), np.empty(V, np.float32), np.empty((J, V), bool)))
    return work, (blas.limit(limits=1) if pooled else nullcontext())


def _run(steps, work: _Work | None) -> None:
    """Run ``steps``, an iterable of ``(product, reduce, kind, after)``: ``product = (a, b, out)`` is
    ``a @ b`` (into ``out`` when it is not None; ``a`` may be a function that returns it), and ``reduce``
    is called with that result; ``kind`` names the reduction (its time is measured by kind); with
    ``after``, the previous step's reduction is done before this product starts.

    A step's reduction runs after the next step has been taken from the iterable and before the next
    product completes, so a step may use what the reductions before the previous one left. Without a
    pool that is all. With one, step i's reduction runs on one thread while step i + 1's product runs
    on every thread, cut into one block per thread: the reducing thread's block is smaller by the
    reduction's time, so that all threads finish together (the times are the fastest seen on the steps
    before; equal blocks until then). Evenly cut, the threads waited up to one block for each other.
    """
    pending = None  # the previous step's (reduce, result, kind)
    took = {}  # seconds: a reduction of each kind; one thread's product time per unit of the cut, by shapes

    def timed(key, units, fn, *args, **kwargs):
        t = time.perf_counter()
        fn(*args, **kwargs)
        if units:  # the fastest seen: the first chunk's also pays for first touches of its buffers
            took[key] = min(took.get(key, np.inf), (time.perf_counter() - t) / units)

    for (a, b, out), reduce, kind, after in steps:
        if after and pending is not None:  # this product reads what the pending reduction writes
            pending[0](pending[1])
            pending = None
        a = a() if callable(a) else a
        if work is None or work.pool is None:
            if pending is not None:
                pending[0](pending[1])
            result = a @ b if out is None else np.matmul(a, b, out=out)
        else:
            n, key = work.threads, (a.shape, b.shape)
            r_key = pending[2] if pending is not None else None
            length = max(b.shape)  # the product is cut along V: b's columns (logits) or rows (p @ W)
            sizes = [length / n] * n
            if took.get(key, 0) > 0 and r_key in took:
                r = took[r_key]
                share = (length * took[key] + r) / n  # seconds per thread, all work included
                sizes = [share / took[key]] * (n - 1) + [max(0.0, share - r) / took[key]]
            bounds = [0] + [min(length, round(x)) for x in itertools.accumulate(sizes)]
            bounds[-1] = length
            parts, finish = _blocks(a, b, out, bounds)
            waiting = work.pool.submit(timed, r_key, 1, *pending[:2]) if pending is not None else None
            # queued after the reduction: the last (smallest) block goes to the thread that reduced
            for f in [work.pool.submit(timed, key, q - p, part) for (p, q), part in zip(zip(bounds, bounds[1:]), parts)]:
                f.result()
            finish()
            if waiting is not None:
                waiting.result()
            result = out
        pending = (reduce, result, kind)
    if pending is not None:
        pending[0](pending[1])


def _blocks(a: np.ndarray, b: np.ndarray, out: np.ndarray, bounds: list[int]):
    """``out = a @ b`` as independent products, one per block ``bounds[i]:bounds[i + 1]`` of V, and
    what finishes it: blocks of b's columns (the logits, ``[C, D] @ [D, V]``), or, when b is taller than
    wide (``p @ W``, ``[C, V] @ [V, D]``), of its rows, whose partial products are then summed (narrow
    column blocks of W ran 25% slower)."""
    cuts = list(zip(bounds, bounds[1:]))
    if b.shape[1] >= b.shape[0]:
        return [partial(np.matmul, a, b[:, p:q], out=out[:, p:q]) for p, q in cuts], lambda: None
    sums = np.zeros((len(cuts), *out.shape), out.dtype)  # [n, C, D]; an empty block leaves zeros
    return ([partial(np.matmul, a[:, p:q], b[p:q], out=sums[i]) for i, (p, q) in enumerate(cuts)],
            lambda: np.sum(sums, axis=0, out=out))


def _reduce(z, targets, k: int, work: _Work | None, anchor: int | None = None) -> dict:
    """Reduce a ``[C, V]`` block of logits: NumPy row by row, else the plain path. For an anchor
    (0: final, 1: input), ``exp(z - max)`` is kept: in ``work.e[anchor]``, or as ``exp`` in the result."""
    if work is None:
        return reduce_plain(z, targets, k, keep_exp=anchor is not None)
    C = z.shape[0]
    return reduce_numpy(z, targets, k, None if anchor is None else work.e[anchor * C:(anchor + 1) * C], work.scratch)


def _targets(targets: np.ndarray, n: int, xp, work: _Work | None):
    """A chunk's ``[C, J]`` targets, repeated for n rows whose logits are stacked in one product, as an
    array of the trace's namespace."""
    t = targets if n == 1 else np.tile(targets, (n, 1))
    return t if work is not None else xp.asarray(t)


# -------------------------------------------------------------------------------------------------
# The lens


def logit_lens(model, trace, *, k: int = 5, step: int = 1, include_input: bool = True, sublayers: bool = False,
               start: int = 0, end: int | None = None, norm: str = "ln_f", decoder_blocks: int = 0,
               chunk: int = CHUNK, threads: int | None = None) -> Lens:
    """Read every kept row of ``trace`` through the decoder and reduce it to the lens quantities.

    Parameters
    ----------
    model : the ``gpt2np.Model`` that made the trace (its ln_f and unembedding are the decoder).
    trace : ``model.forward(ids)``; with ``sublayers=True`` here, ``model.forward(ids, sublayers=True)``.
    k : number of top tokens kept per cell.
    step : keep every step-th block row, counting back from the last shown block (always kept).
    include_input : include the embedding row ``input`` (not subject to the step).
    sublayers : add the ``l.attn`` row (stream after block l's attention) for every kept block.
    start, end : the position window ``[start, end)``; the model still read the whole prefix.
    norm : ``"ln_f"`` (ln_f with gain and bias, default), ``"norm"`` (normalisation only, the post's
        figures) or ``"raw"`` (no normalisation).
    decoder_blocks : run the last k blocks inside the decoder for every shown row; their rows are dropped.
    chunk : positions per matrix product. threads : NumPy threads for the products and reductions
        (default: the usable cores, at most 2).

    Returns
    -------
    Lens
    """
    cfg = model.config
    L, T, V, D = cfg.n_layer, int(trace.resid.shape[1]), cfg.vocab_size, cfg.n_embd
    end = T if end is None else end
    _check(trace, k=k, step=step, sublayers=sublayers, start=start, end=end, T=T, L=L, V=V, norm=norm,
           decoder_blocks=decoder_blocks, include_input=include_input, chunk=chunk, threads=threads)
    xp = namespace(trace.resid)
    rows = select_rows(L, step=step, include_input=include_input, sublayers=sublayers, decoder_blocks=decoder_blocks)
    W_un = model.params.unembed  # [V, D]
    W_unT = xp.permute_dims(W_un, (1, 0))  # [D, V] a view, no copy
    ids = to_numpy(trace.ids).astype(np.int64)
    first = L - decoder_blocks

    def read(source: str, index: int, a: int, b: int):
        """Decoder input of one row at positions [a, b): ``[b - a, D]`` (the whole prefix runs first
        through the decoder's blocks when ``decoder_blocks`` > 0)."""
        x = getattr(trace, source)[index, ...]  # [T, D]
        if decoder_blocks:
            x = run_blocks(model, x[:b, :], first)  # whole prefix, causally
        return decoder_norm(model, x[a:b, :], norm)

    # With decoder blocks, each row's prefix runs through them once: keep the [W, D] result.
    cached = {r: read(r[1], r[2], start, end) for r in rows} if decoder_blocks else {}
    input_row = ("input", "resid", 0)
    input_hat = cached[input_row] if input_row in cached else read(*input_row[1:], start, end)  # [W, D]
    # The anchors' logits are those of two rows when these are shown: the input row, and the last
    # block's row when no decoder blocks run (the final stream read the same way). Not computed twice.
    r_input = rows.index(input_row) if input_row in rows else None
    r_final = next((r for r, row in enumerate(rows) if row[1:] == ("resid", L)), None) if not decoder_blocks else None

    Wn, R = end - start, len(rows)
    nxt = _next_ids(ids, start, end)  # [W]
    res = {name: np.empty((R, Wn), dt) for name, dt in (
        ("final_rank", np.int64), ("input_rank", np.int64), ("next_rank", np.int64), ("kl_final", np.float64),
        ("kl_input", np.float64), ("entropy", np.float64), ("next_prob", np.float64), ("next_xent", np.float64))}
    top_ids = np.empty((R, Wn, k), np.int64)
    top_logits = np.empty((R, Wn, k), np.float32)
    top_probs = np.empty((R, Wn, k), np.float64)
    final_ids = np.empty(Wn, np.int64)
    n_threads = threads if threads is not None else min(2, usable_cores())
    C0 = min(chunk, Wn)  # positions per chunk
    per = max(1, chunk // C0)  # rows per product: a window shorter than the chunk puts several rows in one
    others = [r for r in range(R) if r not in (r_final, r_input)]  # rows that are not anchors
    z_rows = C0 * max(min(per, 2), min(per, len(others)))
    # NumPy: two buffers of logits ([chunk, V] at most) and one of the anchors' exponentials ([2 x chunk, V])
    work, blas_limit = (_workspace(z_rows, 2 * C0, V, 3, n_threads) if isinstance(trace.resid, np.ndarray)
                        else (None, nullcontext()))
    flip = itertools.count()  # alternates the logits buffers: one is reduced while the next product fills the other

    def chunk_steps(c0: int, c1: int):
        """The products of positions [c0, c1) of the window and their reductions, in order (see ``_run``):
        the final and input anchors' logits, their ``p @ W``, then every other row. A product reads
        the whole unembedding whatever its row count: with a short window, the two anchors share one,
        and so do up to ``per`` rows."""
        a, b, C = start + c0, start + c1, c1 - c0
        z_buf = (lambda n: None) if work is None else (lambda n: work.z[next(flip) % 2][:n])
        got = {}  # what reductions leave for later steps: targets, the anchors' reductions, u = p @ W

        def reduce_anchors(z):  # z: the final's [C, V] logits, or the final's then the input's [2C, V]
            final_ids[c0:c1] = to_numpy(xp.argmax(z[:C, :], axis=1))  # first maximum: ties -> lower id
            got["targets"] = np.stack([final_ids[c0:c1], ids[a:b], nxt[c0:c1]], axis=1)  # [C, 3]
            targets = _targets(got["targets"], 1, xp, work)
            got["final"] = _reduce(z[:C, :], targets, k, work, anchor=0)
            if z.shape[0] > C:
                got["input"] = _reduce(z[C:, :], targets, k, work, anchor=1)

        def reduce_input(z):
            got["input"] = _reduce(z, _targets(got["targets"], 1, xp, work), k, work, anchor=1)

        def keep_u(names):  # u = p @ W = (exp(z - max) @ W) / s, float64, for the anchors named
            def keep(u):
                u = to_numpy(u).astype(np.float64)
                for j, name in enumerate(names):
                    got["u_" + name] = u[j * C:(j + 1) * C] / got[name]["s"][:, None]
                if "input" in names:  # both anchors known: their own rows are done
                    for r, xh in ((r_final, final_hat), (r_input, in_hat)):
                        if r is not None:
                            store(r, xh, got["final" if r == r_final else "input"])
            return keep

        def reduce_rows(group):  # group: [(r, xh [C, D])], whose logits are stacked in one product
            def reduce(z):
                red = _reduce(z, _targets(got["targets"], len(group), xp, work), k, work)
                for j, (r, xh) in enumerate(group):
                    store(r, xh, {key: v[j * C:(j + 1) * C] for key, v in red.items()})
            return reduce

        def store(r, xh, red):  # one row's reductions -> the result arrays
            lse, xh64 = red["lse"], to_numpy(xh).astype(np.float64)
            for key, a_hat, name in (("kl_final", final64, "final"), ("kl_input", input64, "input")):
                kl = (lse - got[name]["lse"]) - np.einsum("cd,cd->c", xh64 - a_hat, got["u_" + name])
                res[key][r, c0:c1] = np.maximum(kl, 0.0)  # KL >= 0; rounding can give -1e-7
            top_ids[r, c0:c1] = red["top_ids"]
            top_logits[r, c0:c1] = red["top_logits"]
            top_probs[r, c0:c1] = np.exp(red["top_logits"].astype(np.float64) - lse[:, None])
            res["entropy"][r, c0:c1] = red["entropy"]
            res["final_rank"][r, c0:c1] = red["ranks"][:, 0]
            res["input_rank"][r, c0:c1] = red["ranks"][:, 1]
            has_next = nxt[c0:c1] >= 0
            logp_next = red["target_logits"][:, 2].astype(np.float64) - lse
            res["next_rank"][r, c0:c1] = np.where(has_next, red["ranks"][:, 2], -1)
            res["next_prob"][r, c0:c1] = np.where(has_next, np.exp(logp_next), np.nan)
            res["next_xent"][r, c0:c1] = np.where(has_next, -logp_next, np.nan)

        def exps(names):  # the anchors' exp(z - max), [len(names) x C, V], for p @ W
            if work is not None:
                first = 0 if names[0] == "final" else C
                return work.e[first:first + len(names) * C]
            e = [got[name].pop("exp") for name in names]
            return e[0] if len(e) == 1 else xp.concat(e, axis=0)

        def u_buf(n):
            return None if work is None else np.empty((n, D), np.float32)

        # the final stream is read by the decoder's normalisation alone: the model already ran its blocks
        final_hat = decoder_norm(model, trace.resid[L, a:b, :], norm)  # [C, D]
        in_hat = input_hat[c0:c1, :]
        final64, input64 = to_numpy(final_hat).astype(np.float64), to_numpy(in_hat).astype(np.float64)
        groups = [others[i:i + per] for i in range(0, len(others), per)]
        if per == 1:  # long windows: each product reads the unembedding for a full chunk
            yield (final_hat, W_unT, z_buf(C)), reduce_anchors, "final", False
            yield (in_hat, W_unT, z_buf(C)), reduce_input, "input", False
            yield (exps(["final"]), W_un, u_buf(C)), keep_u(["final"]), "u", False
            yield (exps(["input"]), W_un, u_buf(C)), keep_u(["input"]), "u", False
        else:  # one product for both anchors; their p @ W waits for their reductions
            yield (xp.concat([final_hat, in_hat], axis=0), W_unT, z_buf(2 * C)), reduce_anchors, "anchors", False
            yield (lambda: exps(["final", "input"]), W_un, u_buf(2 * C)), keep_u(["final", "input"]), "u", True
        for group in groups:
            xs = [(r, cached[rows[r]][c0:c1, :] if decoder_blocks else read(rows[r][1], rows[r][2], a, b))
                  for r in group]  # [C, D] each
            x = xs[0][1] if len(xs) == 1 else xp.concat([xh for _, xh in xs], axis=0)
            yield (x, W_unT, z_buf(len(xs) * C)), reduce_rows(xs), f"rows{len(xs)}", False

    try:
        with blas_limit:
            _run(itertools.chain.from_iterable(chunk_steps(c0, min(c0 + chunk, Wn)) for c0 in range(0, Wn, chunk)), work)
    finally:
        if work is not None and work.pool is not None:
            work.pool.shutdown()

    match = top_ids[:, :, 0] == final_ids[None, :]  # [R, W]
    # first row from which every later row matches: R minus the length of the matching tail
    tail = np.cumprod(match[::-1], axis=0).sum(axis=0)
    lock_in = np.where(tail > 0, R - tail, R - 1).astype(np.int64)
    seen = np.unique(np.concatenate([ids, top_ids.reshape(-1)]))  # decode each distinct token once
    table = np.asarray(model.tokens(seen), dtype=str)
    strings, top_tokens = table[np.searchsorted(seen, ids)], table[np.searchsorted(seen, top_ids)]
    settings = {"k": k, "step": step, "include_input": include_input, "sublayers": sublayers, "norm": norm,
                "decoder_blocks": decoder_blocks, "model": model.name, "n_layer": L}
    return Lens(rows=tuple(r[0] for r in rows), ids=ids, tokens=strings, start=start, end=end, top_ids=top_ids,
                top_logits=top_logits, top_probs=top_probs, top_tokens=top_tokens, final_ids=final_ids,
                lock_in=lock_in, settings=settings, **res)


def _check(trace, *, k, step, sublayers, start, end, T, L, V, norm, decoder_blocks, include_input, chunk,
           threads=None):
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
    if not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k={k!r} must be an integer between 1 and the vocabulary size {V}")
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r} must be a positive integer (1 keeps every block)")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive integer")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} must be a positive integer (or None: the usable cores, at most 2)")
    if not 0 <= decoder_blocks <= L:
        raise ValueError(f"decoder_blocks={decoder_blocks} must be between 0 and n_layer={L}")
    if decoder_blocks == L and not include_input:
        raise ValueError(f"decoder_blocks={L} leaves only the input row, and include_input=False drops it")
    if not (isinstance(start, (int, np.integer)) and isinstance(end, (int, np.integer)) and 0 <= start < end <= T):
        raise ValueError(f"window start={start}, end={end} must satisfy 0 <= start < end <= {T} (the sequence length)")
    if sublayers and trace.resid_mid is None:
        raise ValueError("sublayers=True needs the streams after each attention sub-block: "
                         "make the trace with model.forward(ids, sublayers=True)")


def self_check(model, trace, *, chunk: int = CHUNK) -> dict:
    """The lens's built-in checks, as the largest absolute logit difference relative to max |logit|.

    ``last_row``: the ``ln_f`` decoder on the last row reproduces the model's logits.
    ``decoder_blocks_1``: running the last block inside the decoder on the row before it does too.
    """
    xp = namespace(trace.resid)
    L = model.config.n_layer
    W_unT = xp.permute_dims(model.params.unembed, (1, 0))
    logits = trace.logits
    scale = float(to_numpy(xp.max(xp.abs(logits))))
    before = run_blocks(model, trace.resid[L - 1, ...], L - 1)
    out = {"last_row": 0.0, "decoder_blocks_1": 0.0}
    for c0 in range(0, logits.shape[0], chunk):
        c1 = min(c0 + chunk, logits.shape[0])
        for key, x in (("last_row", trace.resid[L, c0:c1, :]), ("decoder_blocks_1", before[c0:c1, :])):
            z = decoder_norm(model, x, "ln_f") @ W_unT
            out[key] = max(out[key], float(to_numpy(xp.max(xp.abs(z - logits[c0:c1, :])))) / scale)
    return out


# -------------------------------------------------------------------------------------------------
# The lens while the model writes


def record(model, ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop_at_eot: bool = False):
    """Generate with the KV cache, yielding each new token as it is chosen, and record every row.

    The prompt runs once (prefill); each new token then runs one cached step, whose rows (the
    embedding, the stream after each attention sub-block and after each block) join the trace of
    the whole sequence. Nothing is recomputed: the trace equals ``model.forward(all_ids,
    sublayers=True)`` up to float32 rounding, at the cost of one step for the last token's rows.
    Arguments are checked here, before the first token.

    Returns
    -------
    A generator of ints (the new tokens); its return value (``StopIteration.value``, or the value
    of ``yield from``) is the ``Trace`` of prompt + new tokens with ``resid``, ``resid_mid``, ``logits``.
    """
    from . import generate as G

    ids = M.check_ids(ids, model.config)
    G.check_request(model.config, len(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return _record(model, ids, int(max_new_tokens), np.random.default_rng(seed), temperature, top_k, top_p,
                   model.config.vocab_size - 1 if stop_at_eot else None)


def _record(model, ids, n, rng, temperature, top_k, top_p, stop):
    from . import generate as G

    params, config = model.params, model.config
    xp = namespace(params.wte)
    logits, cache, resid, mid = G.prefill(params, config, xp.asarray(ids), keep_resid=True)
    rows, mids, new = [resid], [mid], []
    for _ in range(n):
        token = G.pick(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        new.append(token)
        yield token
        logits, cache, resid, mid = G.step(params, config, cache, token, keep_resid=True)  # rows of `token`
        rows.append(resid)  # [L+1, 1, D]
        mids.append(mid)  # [L, 1, D]
        if token == stop:
            break
    resid = xp.concat(rows, axis=1)  # [L+1, T, D]
    all_ids = np.concatenate([ids, np.asarray(new, np.int64)])
    return M.Trace(xp.asarray(all_ids), resid, M.unembed(params, config, resid[config.n_layer, ...]),
                   resid_mid=xp.concat(mids, axis=1))


def generate_trace(model, ids, max_new_tokens: int, **sampling):
    """``record`` run to the end: ``(new_ids [N], trace)``. ``sampling``: temperature, top_k, top_p,
    seed, stop_at_eot, as in ``Model.generate``."""
    gen, new = record(model, ids, max_new_tokens, **sampling), []
    while True:
        try:
            new.append(next(gen))
        except StopIteration as done:
            return np.asarray(new, np.int64), done.value


def window_of_generation(n_prompt: int, n_new: int) -> tuple[int, int]:
    """The positions that chose the new tokens: the last prompt position through the one before the
    last new token, ``[n_prompt - 1, n_prompt - 1 + n_new)``; each cell's next token is the one chosen."""
    if n_new == 0:
        raise ValueError("no token was generated, so there is no position to read the lens at")
    return n_prompt - 1, n_prompt - 1 + n_new


def generation_lens(model, ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop_at_eot: bool = False, **lens_options):
    """Generate, then read the lens at every position that chose a new token.

    The window is ``[len(ids) - 1, len(ids) + N - 1)``: the last prompt position (which chose the first
    new token) through the position that chose the last one, so each cell's "next token" is the
    token actually generated there. ``lens_options`` are those of ``logit_lens`` except the window.

    Returns
    -------
    new_ids : ndarray, shape (N,)
    lens : Lens over the generated window (``settings["generated"]`` is N)
    """
    if "start" in lens_options or "end" in lens_options:
        raise ValueError("generation_lens chooses the window itself (the positions that generated tokens)")
    new, trace = generate_trace(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_at_eot=stop_at_eot)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    return new, lens_of_generation(model, trace, len(ids), len(new), sampling, **lens_options)


def lens_of_generation(model, trace, n_prompt: int, n_new: int, sampling: dict, **lens_options) -> Lens:
    """The lens of a recorded generation (``trace`` of the prompt and its ``n_new`` new tokens) over the
    positions that chose them; ``settings`` also record ``generated`` (n_new) and the ``sampling`` options."""
    start, end = window_of_generation(n_prompt, n_new)
    lens = logit_lens(model, trace, start=start, end=end, **lens_options)
    return dataclasses.replace(lens, settings={**lens.settings, "generated": int(n_new), **sampling})
