"""The GPT-2 forward pass as plain functions, keeping every residual stream by construction.

Dimension legend (one convention everywhere):
    L  blocks (n_layer)        T  positions in the sequence     D  width (n_embd)
    H  heads (n_head)          d  head width (D / H = 64)       F  MLP width (4 D)
    V  vocabulary              S  key positions (T, or more with a KV cache)

A block is ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``; after the last block comes ``ln_f``
and the tied unembedding ``logits = ln_f(x) @ wte.T``. The functions use only the Python array
API standard, so the same code runs on NumPy, CuPy and ``array_api_strict``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .backend import namespace, to_numpy
from .config import Config
from .weights import Block, Params

MASKED = -1e10  # finite: a fully masked row can never produce NaN


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis: biased variance, eps inside the root, then gain and bias.

    ``x : [..., D]`` -> ``[..., D]``. ``weight=None`` gives the normalisation alone.
    """
    xp = namespace(x)
    xc = x - xp.mean(x, axis=-1, keepdims=True)  # [..., D]
    y = xc / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # [..., D]
    return y if weight is None else y * weight + bias


def gelu_new(x):
    """GPT-2's tanh approximation of GELU (not the erf GELU: they differ by up to 4.7e-4)."""
    xp = namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(x, axis: int = -1):
    """Softmax with the maximum subtracted first (stable for any finite input)."""
    xp = namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def split_heads(x, n_head: int):
    """``[T, D]`` -> ``[H, T, d]``."""
    xp = namespace(x)
    T, D = x.shape
    return xp.permute_dims(xp.reshape(x, (T, n_head, D // n_head)), (1, 0, 2))


def merge_heads(x):
    """``[H, T, d]`` -> ``[T, D]``."""
    xp = namespace(x)
    H, T, d = x.shape
    return xp.reshape(xp.permute_dims(x, (1, 0, 2)), (T, H * d))


def attend(q, k, v, scale: float):
    """Causal scaled dot-product attention. ``q [H, T, d]``, ``k, v [H, S, d]`` with S >= T; the T
    queries are the last T of the S positions; ``scale`` is ``config.attn_scale(l)`` (GPT-2: 1/sqrt(d)).
    Returns ``(out [H, T, d], pattern [H, T, S])``."""
    xp = namespace(q)
    T, S = q.shape[1], k.shape[1]
    scores = (q @ xp.permute_dims(k, (0, 2, 1))) * scale  # [H, T, S]
    allowed = xp.arange(S)[None, :] <= xp.arange(S - T, S)[:, None]  # [T, S]
    pattern = softmax(xp.where(allowed, scores, MASKED))  # [H, T, S]
    return pattern @ v, pattern  # [H, T, d], [H, T, S]


def attention(x, p: Block, n_head: int, scale: float, past=None):
    """Multi-head causal self-attention on the normalised stream ``x [T, D]``; scores times ``scale``.

    ``past`` is an optional ``(k, v)`` pair of ``[H, S0, d]`` from earlier positions (KV cache).
    Returns ``(out [T, D], pattern [H, T, S], (k, v) [H, S, d], z [T, D])`` with S = S0 + T, where
    ``z`` is the heads' outputs side by side, before ``c_proj`` (``out = z @ c_proj + bias``).
    """
    xp = namespace(x)
    D = x.shape[1]
    qkv = x @ p.attn_c_attn_weight + p.attn_c_attn_bias  # [T, D] -> [T, 3D]
    q, k, v = (split_heads(qkv[:, i * D:(i + 1) * D], n_head) for i in range(3))  # [H, T, d] each
    if past is not None:
        k, v = xp.concat((past[0], k), axis=1), xp.concat((past[1], v), axis=1)  # [H, S, d]
    out, pattern = attend(q, k, v, scale)  # [H, T, d], [H, T, S]
    z = merge_heads(out)  # [T, D]
    return z @ p.attn_c_proj_weight + p.attn_c_proj_bias, pattern, (k, v), z  # [T, D]


def head_outputs(z, p: Block, n_head: int):
    """What each head writes into the stream: ``z [T, D]`` (``attention``'s merged heads) -> ``[H, T, D]``.

    Head h's slice of ``z`` times its d rows of ``c_proj`` (no bias): the H outputs plus ``c_proj``'s
    bias sum to the attention output.
    """
    xp = namespace(z)
    D = z.shape[1]
    return split_heads(z, n_head) @ xp.reshape(p.attn_c_proj_weight, (n_head, D // n_head, D))  # [H, T, d] @ [H, d, D]


def mlp(x, p: Block):
    """Position-wise MLP on the normalised stream: ``[T, D] -> [T, F] -> [T, D]``."""
    h = gelu_new(x @ p.mlp_c_fc_weight + p.mlp_c_fc_bias)  # [T, F]
    return h @ p.mlp_c_proj_weight + p.mlp_c_proj_bias  # [T, D]


def embed(params: Params, ids, start: int = 0):
    """Token plus position embedding: ``ids [T]`` -> ``[T, D]`` (positions start..start+T-1)."""
    xp = namespace(params.wte)
    return xp.take(params.wte, ids, axis=0) + params.wpe[start:start + ids.shape[0], :]


def unembed(params: Params, config: Config, x):
    """Final LayerNorm and the (tied) unembedding: ``[..., D]`` -> ``[..., V]``."""
    xp = namespace(x)
    return layer_norm(x, params.ln_f_weight, params.ln_f_bias, config.layer_norm_epsilon) @ xp.permute_dims(
        params.unembed, (1, 0))


@dataclass(frozen=True)
class Trace:
    """Everything one forward pass computed, kept by construction.

    ``resid[0]`` is the embedding ``wte[ids] + wpe[pos]``; ``resid[l + 1]`` the stream after block l
    (TransformerLens: ``resid_pre`` of block 0, then ``resid_post`` of each block). ``logits`` are
    ``ln_f(resid[L]) @ wte.T``. The optional fields are None unless the forward pass was asked for them.
    """

    ids: object  # [T] int64
    resid: object  # [L+1, T, D]
    logits: object  # [T, V]
    resid_mid: object = None  # [L, T, D] stream after each attention sub-block (sublayers=True)
    attn_out: object = None  # [L, T, D] attention sub-block output (sublayers=True)
    mlp_out: object = None  # [L, T, D] MLP sub-block output (sublayers=True)
    pattern: object = None  # [L, H, T, T] attention probabilities (patterns=True)
    heads: object = None  # [L, H, T, D] each head's write into the stream, without c_proj's bias (heads=True)

    @property
    def resid_post(self):
        """``[L, T, D]``: the stream after each block."""
        return self.resid[1:, ...]

    @property
    def resid_pre(self):
        """``[L, T, D]``: the stream entering each block."""
        return self.resid[:-1, ...]

    def numpy(self) -> "Trace":
        """The same trace with every array on the host as NumPy."""
        return Trace(**{f.name: to_numpy(getattr(self, f.name)) for f in fields(self)})


def forward(params: Params, config: Config, ids, *, sublayers: bool = False, patterns: bool = False,
            heads: bool = False) -> Trace:
    """Run GPT-2 on one sequence ``ids [T]`` (already checked) and return its ``Trace``."""
    xp = namespace(params.wte)
    L, T, D = config.n_layer, ids.shape[0], config.n_embd
    eps = config.layer_norm_epsilon
    resid = xp.empty((L + 1, T, D), dtype=params.wte.dtype)
    mid = xp.empty((L, T, D), dtype=resid.dtype) if sublayers else None
    attn_outs = xp.empty((L, T, D), dtype=resid.dtype) if sublayers else None
    mlp_outs = xp.empty((L, T, D), dtype=resid.dtype) if sublayers else None
    pats = xp.empty((L, config.n_head, T, T), dtype=resid.dtype) if patterns else None
    head_outs = xp.empty((L, config.n_head, T, D), dtype=resid.dtype) if heads else None

    x = embed(params, ids)  # [T, D]
    resid[0, ...] = x
    for l, p in enumerate(params.h):
        a, pattern, _, z = attention(layer_norm(x, p.ln_1_weight, p.ln_1_bias, eps), p, config.n_head,
                                     config.attn_scale(l))  # [T, D]
        x = x + a  # resid_mid [T, D]
        if sublayers:
            attn_outs[l, ...], mid[l, ...] = a, x
        if patterns:
            pats[l, ...] = pattern
        if heads:
            head_outs[l, ...] = head_outputs(z, p, config.n_head)  # [H, T, D]
        m = mlp(layer_norm(x, p.ln_2_weight, p.ln_2_bias, eps), p)  # [T, D]
        x = x + m  # resid_post [T, D]
        if sublayers:
            mlp_outs[l, ...] = m
        resid[l + 1, ...] = x
    logits = unembed(params, config, x)  # [T, V]
    return Trace(ids, resid, logits, mid, attn_outs, mlp_outs, pats, head_outs)


def check_ids(ids, config: Config) -> np.ndarray:
    """Validate token ids and return them as int64 ``[T]``; raise with the problem and the fix."""
    if hasattr(ids, "__array_namespace__") and not isinstance(ids, np.ndarray):
        ids = to_numpy(ids)
    arr = np.asarray(ids)
    if arr.size == 0:
        raise ValueError("token ids are empty: give at least one token")
    if arr.dtype == object or arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}; "
                        "use model.encode(text) to turn text into ids")
    if arr.ndim != 1:
        raise ValueError(f"token ids must be one sequence of shape [T], got shape {list(arr.shape)}; "
                         "run one sequence at a time (e.g. ids[0])")
    if arr.shape[0] == 0:
        raise ValueError("token ids are empty: give at least one token")
    if arr.shape[0] > config.n_positions:
        raise ValueError(f"{arr.shape[0]} tokens exceed the context of {config.n_positions} positions; "
                         f"shorten the text or pass its last {config.n_positions} tokens")
    bad = (arr < 0) | (arr >= config.vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"token id {int(arr[i])} at position {i} is outside the vocabulary "
                         f"[0, {config.vocab_size}); ids must come from this model's tokenizer")
    return arr.astype(np.int64, copy=False)
