"""Writing and scoring text: prefill, cached one-token steps, sampling, and log-probabilities.

Same dimension legend as ``model.py`` (L blocks, T positions, D width, H heads, d head width,
V vocabulary, S cached positions). Decoding runs the prompt once (``prefill``), then one token at a
time (``step``) against a cache of every block's keys and values, so no prefix is ever recomputed.
The blocks reuse ``model.attention`` (its ``past`` argument) and ``model.mlp``; only the final
``[V]`` logits row goes to the host, where tokens are chosen in float64 NumPy.

Context rule: the prompt and the new tokens must fit in the context together,
``len(ids) + max_new_tokens <= n_positions``; otherwise ``generate`` raises before computing
anything and says how many tokens can still be generated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import namespace, to_numpy
from .config import Config
from .model import attention, embed, forward, layer_norm, mlp, unembed
from .weights import Params


@dataclass(frozen=True)
class Cache:
    """Keys and values of every block for the positions seen so far. Never changed in place:
    ``step`` returns a new cache, so an old one can be stepped again (e.g. to branch).

    Each step concatenates one key and value row per block (inside ``model.attention``). Measured at
    gpt2's shape on a CPU, that copy is about 5 ms of a 40 ms step with 900 cached positions and
    negligible below a hundred, so preallocated buffers written in place are not worth their mutation.
    """

    kv: tuple  # L pairs (k, v), each [H, S, d]

    @property
    def length(self) -> int:
        """S, the number of positions cached."""
        return self.kv[0][0].shape[1]


def _run(params: Params, config: Config, ids, cache: Cache | None, keep_resid: bool):
    """The blocks on new positions ``ids [T]`` after ``cache``: the last position's logits ``[V]``, the
    extended cache, and (if ``keep_resid``) the new rows ``resid [L+1, T, D]``, ``resid_mid [L, T, D]``."""
    xp = namespace(params.wte)
    eps = config.layer_norm_epsilon
    x = embed(params, ids, start=0 if cache is None else cache.length)  # [T, D]
    resid, mid, kv = [x], [], []
    for l, p in enumerate(params.h):
        past = None if cache is None else cache.kv[l]
        a, _, k_v, _ = attention(layer_norm(x, p.ln_1_weight, p.ln_1_bias, eps), p, config.n_head,
                              config.attn_scale(l), past)  # [T, D]
        x = x + a  # resid_mid [T, D]
        mid.append(x)
        x = x + mlp(layer_norm(x, p.ln_2_weight, p.ln_2_bias, eps), p)  # resid_post [T, D]
        resid.append(x)
        kv.append(k_v)  # ([H, S, d], [H, S, d])
    logits = unembed(params, config, x[-1, :])  # [D] -> [V]
    if not keep_resid:
        return logits, Cache(tuple(kv))
    return logits, Cache(tuple(kv)), xp.stack(resid), xp.stack(mid)  # [L+1, T, D], [L, T, D]


def prefill(params: Params, config: Config, ids, *, keep_resid: bool = False):
    """Run the prompt once and cache every block's keys and values.

    Parameters
    ----------
    ids : array of int, shape (T,), already checked (``model.check_ids``), on the weights' device
    keep_resid : also return the residual rows of the T positions

    Returns
    -------
    logits : array, shape (V,), the prediction after the last prompt token
    cache : Cache holding ``[H, T, d]`` keys and values per block
    resid : array, shape (L+1, T, D), only with ``keep_resid`` (as ``Trace.resid``)
    resid_mid : array, shape (L, T, D), only with ``keep_resid`` (as ``Trace.resid_mid``)
    """
    return _run(params, config, ids, None, keep_resid)


def step(params: Params, config: Config, cache: Cache, token: int, *, keep_resid: bool = False):
    """Feed one token at position ``cache.length`` and return ``(logits [V], new cache)``.

    With ``keep_resid`` also return the new position's rows ``resid [L+1, 1, D]`` and
    ``resid_mid [L, 1, D]``. ``cache`` is left unchanged.
    """
    if cache.length >= config.n_positions:
        raise ValueError(f"the cache already holds {cache.length} positions, the whole context of "
                         f"{config.n_positions}: no position is left for another token")
    xp = namespace(params.wte)
    return _run(params, config, xp.asarray([int(token)], dtype=xp.int64), cache, keep_resid)


def _number(v) -> bool:
    """A real number: Python's or NumPy's integers and floats, not bool (nor a string, None, an array)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _whole(v) -> bool:
    return math.isfinite(v) and int(v) == v


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not _number(temperature):
        raise TypeError(f"temperature={temperature!r} must be a number >= 0 (0 is greedy decoding), "
                        f"not {type(temperature).__name__}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if top_k is not None and not _number(top_k):
        raise TypeError(f"top_k={top_k!r} must be a whole number >= 1 or None (keep every token), "
                        f"not {type(top_k).__name__}")
    if top_k is not None and (not _whole(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k} must be a whole number >= 1 (or None to keep every token)")
    if top_p is not None and not _number(top_p):
        raise TypeError(f"top_p={top_p!r} must be a number in (0, 1] or None (keep every token), "
                        f"not {type(top_p).__name__}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to keep every token)")


def next_token_probs(logits, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> np.ndarray:
    """The distribution a token is sampled from: ``softmax(logits / temperature)``, then top-k, then top-p.

    Top-k keeps the k most probable tokens (exactly k; equal probabilities are broken by the lower
    token id). Top-p (nucleus) then keeps the smallest set of most probable tokens whose probability
    sums to at least ``top_p`` (always at least one token). The kept probabilities are renormalised.
    ``temperature=0`` gives all the mass to the argmax (lowest id on ties).

    Parameters
    ----------
    logits : array, shape (V,), any backend (brought to host NumPy float64)

    Returns
    -------
    probs : ndarray, shape (V,), float64, summing to 1, zero outside the kept set
    """
    _check_sampling(temperature, top_k, top_p)
    z = np.asarray(to_numpy(logits), dtype=np.float64)  # [V]
    if temperature == 0:
        probs = np.zeros_like(z)
        probs[np.argmax(z)] = 1.0
        return probs
    z = z / temperature
    probs = np.exp(z - z.max())  # [V]
    probs /= probs.sum()
    if top_k is None and top_p is None:
        return probs
    order = _most_probable(probs, len(probs) if top_k is None else int(top_k))  # [k] most probable first
    if top_p is not None:
        cum = np.cumsum(probs[order]) / probs[order].sum()  # [k] renormalised after top-k
        order = order[:int(np.searchsorted(cum, top_p, side="left")) + 1]  # first index reaching top_p
    out = np.zeros_like(probs)
    out[order] = probs[order]
    return out / out.sum()


def _most_probable(probs: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most probable tokens, most probable first, equal probabilities by lower id.
    Only the k candidates are sorted (a full sort of 50257 costs about a quarter of a decoding step)."""
    if k < len(probs):
        kth = np.partition(probs, len(probs) - k)[len(probs) - k]  # the k-th largest probability
        above = np.flatnonzero(probs > kth)
        ids = np.concatenate((above, np.flatnonzero(probs == kth)[:k - len(above)]))  # [k] ascending ids
    else:
        ids = np.arange(len(probs))
    return ids[np.argsort(-probs[ids], kind="stable")]


def pick(logits, rng: np.random.Generator, *, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> int:
    """Choose the next token from ``logits [V]``: the argmax if ``temperature == 0`` (top-k and top-p
    then do nothing), else one draw from ``next_token_probs`` with ``rng``."""
    if temperature == 0:
        xp = namespace(logits)
        return int(xp.argmax(logits))  # on the device: only one integer comes back
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)  # [V]
    return int(rng.choice(probs.shape[0], p=probs))


def check_request(config: Config, T: int, max_new_tokens: int, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed=None) -> None:
    """Raise if a generation of ``max_new_tokens`` after ``T`` prompt tokens cannot run as asked: a
    TypeError for an argument of the wrong type, a ValueError for a value out of range."""
    _check_sampling(temperature, top_k, top_p)
    if not _number(max_new_tokens):
        raise TypeError(f"max_new_tokens={max_new_tokens!r} must be a whole number >= 0, "
                        f"not {type(max_new_tokens).__name__}")
    if not _whole(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be a whole number >= 0")
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise ValueError(f"seed={seed} must be a whole number >= 0 (or None for a fresh random seed)")
    elif seed is not None and not isinstance(seed, (np.random.SeedSequence, np.random.BitGenerator,
                                                     np.random.Generator)):
        raise TypeError(f"seed={seed!r} must be a whole number >= 0 or None (a fresh random seed), "
                        f"not {type(seed).__name__}")
    if T + max_new_tokens > config.n_positions:
        raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens exceeds the context of "
                         f"{config.n_positions} positions: at most {max(config.n_positions - T, 0)} new "
                         "tokens can be generated; ask for fewer or shorten the prompt")


def stream(params: Params, config: Config, ids, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_at_eot: bool = False, eot_id: int | None = None):
    """Generate up to ``max_new_tokens`` tokens after ``ids``, yielding each (an int) as soon as it is chosen.

    Arguments are checked here, before anything runs; see ``generate`` for their meaning.
    """
    xp = namespace(params.wte)
    ids = xp.asarray(ids)
    check_request(config, ids.shape[0], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed)
    eot = config.vocab_size - 1 if eot_id is None else int(eot_id)
    return _tokens(params, config, ids, int(max_new_tokens), np.random.default_rng(seed), temperature, top_k,
                   top_p, eot if stop_at_eot else None)


def _tokens(params, config, ids, n: int, rng, temperature, top_k, top_p, stop_id: int | None):
    """The generator behind ``stream`` (arguments already checked, so errors come before the first token)."""
    if n == 0:
        return
    logits, cache = prefill(params, config, ids)  # [V]
    for i in range(n):
        token = pick(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        yield token
        if token == stop_id or i == n - 1:
            return
        logits, cache = step(params, config, cache, token)  # [V]


def generate(params: Params, config: Config, ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_at_eot: bool = False, eot_id: int | None = None) -> np.ndarray:
    """Continue ``ids`` by up to ``max_new_tokens`` tokens and return the new tokens.

    Parameters
    ----------
    ids : array of int, shape (T,), already checked; ``T + max_new_tokens <= n_positions``
    max_new_tokens : how many tokens to add (>= 0)
    temperature : divides the logits; 0 is greedy decoding (the argmax at every step)
    top_k : sample among the k most probable tokens only (None: all)
    top_p : then among the smallest set whose probability reaches top_p, in (0, 1] (None: all)
    seed : seed of ``numpy.random.default_rng``; the same seed gives the same tokens
    stop_at_eot : stop after ``<|endoftext|>`` is generated (it is included in the result)
    eot_id : the id of ``<|endoftext|>`` (default ``vocab_size - 1``, as in GPT-2)

    Returns
    -------
    tokens : ndarray, shape (N,), int64, N <= max_new_tokens (fewer only with ``stop_at_eot``)
    """
    return np.array(list(stream(params, config, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_at_eot=stop_at_eot, eot_id=eot_id)),
                    dtype=np.int64)


def score(params: Params, config: Config, ids) -> np.ndarray:
    """Log-probability (natural log) of each token given the ones before it, from one forward pass.

    Parameters
    ----------
    ids : array of int, shape (T,), already checked

    Returns
    -------
    logprobs : ndarray, shape (T-1,), float64: ``log p(ids[t+1] | ids[:t+1])``
    """
    xp = namespace(params.wte)
    ids = xp.asarray(ids)
    z = xp.astype(forward(params, config, ids).logits[:-1, :], xp.float64)  # [T-1, V]
    zmax = xp.max(z, axis=-1, keepdims=True)  # [T-1, 1]
    lse = zmax[:, 0] + xp.log(xp.sum(xp.exp(z - zmax), axis=-1))  # [T-1] log-sum-exp
    target = xp.take_along_axis(z, xp.reshape(ids[1:], (-1, 1)), axis=-1)[:, 0]  # [T-1]
    return to_numpy(target - lse)


def perplexity(logprobs) -> tuple[float, float]:
    """``(mean cross-entropy in nats per token, perplexity = exp of it)`` from ``score``'s log-probabilities."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    if logprobs.size == 0:
        raise ValueError("no log-probabilities: scoring needs at least two tokens")
    xent = float(-logprobs.mean())
    return xent, math.exp(xent)
