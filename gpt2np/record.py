"""The lens while the model writes: generation with the KV cache, every row recorded, then the lens.

``record`` yields each new token as it is chosen and returns the ``Trace`` of prompt and new tokens
(the rows of each new position come from its cached step: nothing is recomputed);
``generation_lens`` reads the lens at every position that chose a new token.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import generate as G
from . import model as M
from .api import logit_lens
from .backend import namespace
from .result import Lens


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
    ids = M.check_ids(ids, model.config)
    G.check_request(model.config, len(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed)
    return _record(model, ids, int(max_new_tokens), np.random.default_rng(seed), temperature, top_k, top_p,
                   model.config.vocab_size - 1 if stop_at_eot else None)


def _record(model, ids, n, rng, temperature, top_k, top_p, stop):
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
