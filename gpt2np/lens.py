"""The logit lens (nostalgebraist, 2020), the definition: a plain loop over the trace's rows.

For every shown row of the residual stream and every position of the window, the row is read through
the decoder (``decoder.py``: ``ln_f``, then the tied unembedding, or a variant) and reduced to a few
numbers, each written as its definition in ``shared/reference/lens-spec.md``:

    for each chunk of positions [a, b):                         (memory: a few [chunk, V] arrays)
        the anchors: the final row's and the input row's log-probabilities
        for each shown row:
            z  = decoder(row) @ W.T                              [C, V] float32 logits
            lp = log_softmax(z)                                  [C, V] float64
            top-k of z, KL(final || row), KL(input || row), entropy, three ranks, next-token p

Ranks count strictly larger float32 logits (ties count in the token's favour); top-k ties go to the
lower token id. Log-probabilities, KL and entropy are float64. The full ``[rows, T, V]`` array is never
built. This runs on any array namespace (NumPy, CuPy, ``array_api_strict``).

``gpt2np.logit_lens`` (``api.py``) gives the same ``Lens`` and, for NumPy arrays, computes it with
``lens_fast.py``: the same quantities arranged for speed on CPUs, tested equal to this loop.
"""
from __future__ import annotations

import numpy as np

from .backend import namespace, to_numpy
from .decoder import INPUT, NORMS, Decoder, Row, run_blocks, select_rows  # noqa: F401  (re-exported)
from .result import Lens, next_ids

CHUNK = 512  # positions per matrix product: [512, 50257] float32 = 103 MB


def logit_lens(model, trace, *, k: int = 5, step: int = 1, include_input: bool = True, sublayers: bool = False,
               start: int = 0, end: int | None = None, norm: str = "ln_f", decoder_blocks: int = 0,
               decoder: Decoder | None = None, translator=None, chunk: int = CHUNK, progress: bool = False) -> Lens:
    """Read every shown row of ``trace`` through the decoder and reduce it to the lens quantities.

    Parameters
    ----------
    model : the ``gpt2np.Model`` that made the trace (its ln_f and unembedding are the decoder's).
    trace : ``model.forward(ids)``; with ``sublayers=True`` here, ``model.forward(ids, sublayers=True)``.
    k : number of top tokens kept per cell.
    step : keep every step-th block row, counting back from the last shown block (always kept).
    include_input : include the embedding row ``input`` (not subject to the step).
    sublayers : add the ``l.attn`` row (stream after block l's attention) for every kept block.
    start, end : the position window ``[start, end)``; the model still read the whole prefix.
    norm : ``"ln_f"`` (default), ``"norm"`` (normalisation only, the post's figures) or ``"raw"``.
    decoder_blocks : run the last blocks inside the decoder for every shown row; their rows are dropped.
    translator : a ``gpt2np.tuned.TunedLens``: each row it has a translator for is mapped by it before
        the normalisation (the tuned lens); other rows are read as the logit lens reads them.
    decoder : a ``Decoder`` instead of ``norm``, ``decoder_blocks`` and ``translator``.
    chunk : positions per matrix product (memory is a few ``[chunk, V]`` arrays).
    progress : a progress bar on standard error (rows done, time left); silent by default.

    Returns
    -------
    Lens
    """
    rows, dec, start, end = check_options(model, trace, k=k, step=step, include_input=include_input,
                                          sublayers=sublayers, start=start, end=end, norm=norm,
                                          decoder_blocks=decoder_blocks, decoder=decoder, translator=translator,
                                          chunk=chunk)
    xp = namespace(trace.resid)
    Wt = xp.permute_dims(model.params.unembed, (1, 0))  # [D, V] a view
    ids = to_numpy(trace.ids).astype(np.int64)  # [T]
    out = empty_cells(len(rows), end - start, k)
    bar = progress_bar(progress, len(rows) * len(range(start, end, chunk)), "row")
    for a in range(start, end, chunk):
        b = min(a + chunk, end)
        w = slice(a - start, b - start)  # these positions in the window
        z_final = dec.final(model, trace, a, b) @ Wt  # [C, V]
        lp_final, lp_input = log_softmax(z_final), log_softmax(dec.read(model, trace, INPUT, a, b) @ Wt)
        final_top = xp.argmax(z_final, axis=1)  # [C] the final top-1 (the first maximum: lower id on ties)
        tokens = xp.asarray(ids[a:b])  # [C] input tokens
        nxt = next_ids(ids, a, b)  # [C] next tokens, -1 after the sequence's last
        known = xp.asarray(np.maximum(nxt, 0))  # [C] (the -1 is masked below)
        out["final_ids"][w] = to_numpy(final_top)
        for r, row in enumerate(rows):
            z = dec.read(model, trace, row, a, b) @ Wt  # [C, D] @ [D, V] -> [C, V] logits
            lp = log_softmax(z)  # [C, V] float64
            top = top_k(z, k)  # [C, k]
            cells = {
                "top_ids": top,
                "top_logits": xp.take_along_axis(z, top, axis=1),  # [C, k]
                "top_probs": xp.exp(xp.take_along_axis(lp, top, axis=1)),  # [C, k]
                "kl_final": kl(lp_final, lp),  # [C]
                "kl_input": kl(lp_input, lp),  # [C]
                "entropy": -xp.sum(xp.exp(lp) * lp, axis=1),  # [C]
                "final_rank": rank(z, final_top),  # [C]
                "input_rank": rank(z, tokens),  # [C]
                "next_rank": rank(z, known),  # [C]
                "next_xent": -xp.take_along_axis(lp, known[:, None], axis=1)[:, 0],  # [C]
            }
            for name, value in cells.items():
                out[name][r, w] = to_numpy(value)
            bar.update()
        out["next_rank"][:, w][:, nxt < 0] = -1  # no next token after the sequence's last
        out["next_xent"][:, w][:, nxt < 0] = np.nan
    bar.close()
    out["next_prob"] = np.exp(-out["next_xent"])
    return assemble(model, ids, rows, start, end, out, settings(k, step, include_input, sublayers, dec, model))


def progress_bar(progress: bool, total: int, unit: str, desc: str = "lens"):
    """A tqdm bar on standard error, ``total`` steps of ``unit`` (with the time left); off unless ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not progress, dynamic_ncols=True)


def log_softmax(z):
    """``log softmax(z)`` over the last axis, in float64: ``[C, V]`` -> ``[C, V]``."""
    xp = namespace(z)
    z = xp.astype(z, xp.float64)
    zs = z - xp.max(z, axis=1, keepdims=True)  # [C, V] <= 0
    return zs - xp.log(xp.sum(xp.exp(zs), axis=1, keepdims=True))


def kl(lp_ref, lp):
    """``KL(ref || row) = sum_v p_ref (log p_ref - log p_row)`` per position, nats: ``[C, V]`` x 2 -> ``[C]``."""
    xp = namespace(lp)
    return xp.clip(xp.sum(xp.exp(lp_ref) * (lp_ref - lp), axis=1), 0.0, None)  # >= 0; rounding can give -1e-17


def rank(z, tokens):
    """Rank of each position's token under ``z [C, V]``: 1 + the number of strictly larger logits -> ``[C]``."""
    xp = namespace(z)
    t = xp.take_along_axis(z, tokens[:, None], axis=1)  # [C, 1] the token's logit
    return 1 + xp.count_nonzero(z > t, axis=1)


def top_k(z, k: int):
    """Ids of the k largest entries of each row of ``z [C, V]``, best first, ties to the lower id -> ``[C, k]``.

    k rounds of argmax (which returns the first maximum) with the winner masked: standard-only,
    and cheaper than sorting the vocabulary on a GPU for the small k a lens uses.
    """
    xp = namespace(z)
    cols = xp.arange(z.shape[1])[None, :]  # [1, V]
    out = []
    for _ in range(k):
        best = xp.argmax(z, axis=1)  # [C]
        out.append(best)
        z = xp.where(cols == best[:, None], -xp.inf, z)
    return xp.stack(out, axis=1)  # [C, k]


# -------------------------------------------------------------------------------------------------
# Shared with lens_fast.py: the checks, the result arrays, the finished Lens


def empty_cells(R: int, W: int, k: int) -> dict:
    """The result arrays of R rows and a window of W positions (host NumPy, filled by the loop)."""
    out = {name: np.empty((R, W), dt) for name, dt in (
        ("final_rank", np.int64), ("input_rank", np.int64), ("next_rank", np.int64), ("kl_final", np.float64),
        ("kl_input", np.float64), ("entropy", np.float64), ("next_prob", np.float64), ("next_xent", np.float64))}
    out.update(top_ids=np.empty((R, W, k), np.int64), top_logits=np.empty((R, W, k), np.float32),
               top_probs=np.empty((R, W, k), np.float64), final_ids=np.empty(W, np.int64))
    return out


def settings(k, step, include_input, sublayers, dec: Decoder, model) -> dict:
    """What a lens records of how it was made (plain Python values, ready for its files)."""
    return {"k": int(k), "step": int(step), "include_input": bool(include_input), "sublayers": bool(sublayers),
            **dec.settings, "model": model.name, "n_layer": model.config.n_layer}


def assemble(model, ids, rows: list[Row], start: int, end: int, out: dict, settings: dict) -> Lens:
    """The ``Lens`` of the filled arrays: lock-in rows and the display strings of every token shown."""
    R = len(rows)
    match = out["top_ids"][:, :, 0] == out["final_ids"][None, :]  # [R, W]
    tail = np.cumprod(match[::-1], axis=0).sum(axis=0)  # [W] length of the matching run that ends at the top
    lock_in = np.where(tail > 0, R - tail, R - 1).astype(np.int64)  # its first row (at worst the last row)
    seen = np.unique(np.concatenate([ids, out["top_ids"].reshape(-1)]))  # decode each distinct token once
    table = np.asarray(model.tokens(seen), dtype=str)
    return Lens(rows=tuple(r.label for r in rows), ids=ids, tokens=table[np.searchsorted(seen, ids)],
                start=int(start), end=int(end), top_tokens=table[np.searchsorted(seen, out["top_ids"])],
                lock_in=lock_in, settings=settings, **out)


def _integer(v) -> bool:
    """A whole number: Python's or NumPy's integers, not bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_options(model, trace, *, k, step, include_input, sublayers, start, end, norm, decoder_blocks,
                  decoder, chunk, translator=None) -> tuple[list[Row], Decoder, int, int]:
    """Check a lens request before any work: ``(rows, decoder, start, end)``, or a ValueError that says
    what is wrong and what to do."""
    cfg = model.config
    L, V, D = cfg.n_layer, cfg.vocab_size, cfg.n_embd
    shape = tuple(trace.resid.shape)
    fix = f"make the trace with this model's forward ({model.name}: {L} blocks of width {D}, {V} tokens)"
    if len(shape) != 3 or (shape[0], shape[2]) != (L + 1, D):
        raise ValueError(f"the trace comes from another model: its streams have shape {list(shape)}, this model's "
                         f"are [{L + 1}, T, {D}]; {fix}")
    T = shape[1]
    ids = to_numpy(trace.ids)
    if ids.shape != (T,) or ids.dtype.kind not in "iu":
        raise ValueError(f"the trace's ids (shape {list(ids.shape)}, dtype {ids.dtype}) are not the {T} integer "
                         f"token ids of its streams [{L + 1}, {T}, {D}]; {fix}")
    outside = (ids < 0) | (ids >= V)
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(f"the trace comes from another model: its token id {int(ids[i])} at position {i} is outside "
                         f"this model's vocabulary [0, {V}); {fix}")
    if not _integer(k) or not 1 <= k <= V:
        raise ValueError(f"k={k!r} must be an integer between 1 and the vocabulary size {V}")
    if not _integer(step) or step < 1:
        raise ValueError(f"step={step!r} must be a positive integer (1 keeps every block)")
    if not _integer(chunk) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive integer")
    if not _integer(decoder_blocks) or not 0 <= decoder_blocks <= L:
        raise ValueError(f"decoder_blocks={decoder_blocks!r} must be between 0 and n_layer={L}")
    if decoder is None:
        decoder = Decoder(norm, int(decoder_blocks), translator)
    elif norm != "ln_f" or decoder_blocks != 0 or translator is not None:
        raise ValueError("give either decoder= or norm=, decoder_blocks= and translator=, not both")
    if decoder.translator is not None:
        decoder.translator.check(model)
    if decoder.blocks > L:
        raise ValueError(f"decoder_blocks={decoder.blocks} must be between 0 and n_layer={L}")
    if decoder.blocks == L and not include_input:
        raise ValueError(f"decoder_blocks={L} leaves only the input row, and include_input=False drops it")
    end = T if end is None else end
    if not (_integer(start) and _integer(end) and 0 <= start < end <= T):
        raise ValueError(f"window start={start}, end={end} must satisfy 0 <= start < end <= {T} (the sequence length)")
    if sublayers and trace.resid_mid is None:
        raise ValueError("sublayers=True needs the streams after each attention sub-block: "
                         "make the trace with model.forward(ids, sublayers=True)")
    if sublayers and tuple(trace.resid_mid.shape) != (L, T, D):
        raise ValueError(f"the trace's resid_mid has shape {list(trace.resid_mid.shape)}, but its streams "
                         f"[{L + 1}, {T}, {D}] need [{L}, {T}, {D}]: the sub-block rows come from another forward "
                         "pass; make the trace with model.forward(ids, sublayers=True)")
    rows = select_rows(L, step=int(step), include_input=include_input, sublayers=sublayers,
                       decoder_blocks=decoder.blocks)
    return rows, decoder, int(start), int(end)


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
    ln_f = Decoder("ln_f")
    out = {"last_row": 0.0, "decoder_blocks_1": 0.0}
    for c0 in range(0, logits.shape[0], chunk):
        c1 = min(c0 + chunk, logits.shape[0])
        for key, x in (("last_row", trace.resid[L, c0:c1, :]), ("decoder_blocks_1", before[c0:c1, :])):
            z = ln_f.normalise(model, x) @ W_unT
            out[key] = max(out[key], float(to_numpy(xp.max(xp.abs(z - logits[c0:c1, :])))) / scale)
    return out


def __getattr__(name):
    """The lens during generation lives beside generation (``record.py``); importable here as before."""
    if name in ("record", "generate_trace", "generation_lens", "lens_of_generation", "window_of_generation"):
        from . import record
        return getattr(record, name)
    raise AttributeError(f"module 'gpt2np.lens' has no attribute {name!r}")
