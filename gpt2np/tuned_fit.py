"""Fitting a tuned lens in NumPy: the closed-form ridge fit and the paper's KL objective. Read tuned.py first.

The corpus: texts (as ``gpt2np stats`` reads them) are tokenised and joined into one token stream, each
text followed by ``<|endoftext|>`` (as tuned-lens packs its data), and cut into windows of ``window``
positions (default the model's context); the stream's last window may be shorter. Token ids are small
(4 bytes each), so the stream is held; the streams of the model are not: each window's trace is made,
used and dropped.

**ridge** (after Din et al. 2023, "Jump to Conclusions"): for each row r, the least-squares affine map
from its stream x to the final stream y, written as the residual translator ``y ~ x + x @ A.T + b``:

    S_x = sum x, S_t = sum t, S_xx = sum x x^T, S_xt = sum x t^T    over positions, t = y - x, float64
    C = S_xx / N - mu_x mu_x^T,  C_xt = S_xt / N - mu_x mu_t^T
    A.T = (C + lambda I)^-1 C_xt,  b = mu_t - mu_x @ A.T,   lambda = ridge * trace(C) / D

accumulated window by window (``RidgeSums``), solved once. The ridge term pulls A toward 0 (the
identity translator). By default each window's first position is left out (``skip_first``): in GPT-2
its stream has a norm tens of times the others' (the attention sink) and would dominate the squares.

**kl** (Belrose et al. 2023): the mean over positions of KL(final || lens) for each row, summed over
rows, minimised from the ridge fit (or the identity) with their optimiser: SGD with Nesterov momentum
0.9, learning rate ``lr_scale * (1 - momentum)`` decayed linearly to 0 over ``steps``, weight decay
1e-3 toward the identity, the gradient's norm over all translators clipped at 1; each step reads
``tokens_per_step`` new tokens. The gradient is written out in ``kl_and_grad``: through the softmax, the
unembedding and ln_f, to A and b (tests check it against torch's autograd). A run can write a
checkpoint every N steps and resume from it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import check_window
from .decoder import select_rows
from .files import write_bytes
from .lens import kl, log_softmax, progress_bar
from .tuned import TunedLens, fingerprint, row_labels

CHUNK = 512  # positions per [chunk, V] product in the KL fit


# -------------------------------------------------------------------------------------------------
# The corpus as one token stream


def pack(model, texts) -> np.ndarray:
    """``[N]`` int32: the texts' tokens, each text followed by ``<|endoftext|>``."""
    eot = model.tokenizer.eot_token
    parts = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        ids = model.encode(text)
        if len(ids):
            parts.append(np.append(ids, eot).astype(np.int32))
    if not parts:
        raise ValueError("the corpus has no tokens: give at least one non-empty text")
    return np.concatenate(parts)


def _rows(model, rows, sublayers):
    """The ``Row``s to translate: ``rows`` (labels) or every row ``row_labels`` gives."""
    L = model.config.n_layer
    labels = tuple(rows) if rows is not None else row_labels(L, sublayers=sublayers)
    allowed = {r.label: r for r in select_rows(L, sublayers=True)}
    bad = [r for r in labels if r not in allowed or r == str(L - 1)]
    if bad or not labels:
        raise ValueError(f"rows {bad or '(none)'} cannot be translated: choose among {list(row_labels(L, sublayers=True))}")
    return [allowed[r] for r in labels]


# -------------------------------------------------------------------------------------------------
# ridge


@dataclass
class RidgeSums:
    """The float64 sums of the ridge fit for one row (``add`` a window's streams, ``solve`` once)."""

    n: int
    s_x: np.ndarray  # [D]
    s_t: np.ndarray  # [D]
    s_xx: np.ndarray  # [D, D]
    s_xt: np.ndarray  # [D, D]

    @classmethod
    def zeros(cls, D: int) -> "RidgeSums":
        return cls(0, np.zeros(D), np.zeros(D), np.zeros((D, D)), np.zeros((D, D)))

    def add(self, x, y) -> None:
        """Add positions: a row's streams ``x [N, D]`` and the final streams ``y [N, D]``."""
        x = np.asarray(x, np.float64)
        t = np.asarray(y, np.float64) - x  # [N, D] what the translator adds
        self.n += x.shape[0]
        self.s_x += x.sum(0)
        self.s_t += t.sum(0)
        self.s_xx += x.T @ x
        self.s_xt += x.T @ t

    def solve(self, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """``(A [D, D], b [D])`` of the fit ``y ~ x + x @ A.T + b`` (float64)."""
        if self.n == 0:
            raise ValueError("no positions to fit")
        D = self.s_x.shape[0]
        mx, mt = self.s_x / self.n, self.s_t / self.n  # [D]
        C = self.s_xx / self.n - np.outer(mx, mx)  # [D, D] covariance of x
        C_xt = self.s_xt / self.n - np.outer(mx, mt)  # [D, D]
        lam = ridge * np.trace(C) / D
        At = np.linalg.solve(C + lam * np.eye(D), C_xt)  # [D, D] = A.T
        return At.T, mt - mx @ At


def fit_ridge(model, texts, *, window: int | None = None, ridge: float = 1e-3, rows=None, sublayers: bool = False,
              skip_first: bool = True, progress: bool = False, ids=None) -> TunedLens:
    """The ridge fit of every row's translator on ``texts`` (one pass; see the module's docstring).

    Parameters
    ----------
    model : a ``gpt2np.Model``
    texts : iterable of str (or ``ids``, an already packed ``[N]`` token stream, instead)
    window : positions per forward pass (default ``n_positions``)
    ridge : the ridge term relative to the streams' mean variance (0: plain least squares)
    rows : labels of the rows to fit (default ``input``, ``0`` .. ``L-2``; with ``sublayers`` also ``l.attn``)
    skip_first : leave each window's first position out of the fit
    progress : a progress bar on standard error (tokens)
    """
    window = check_window(model, window)
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge={ridge!r} must be a number >= 0")
    fit_rows = _rows(model, rows, sublayers)
    ids = pack(model, texts) if ids is None else np.asarray(ids, np.int32)
    if skip_first and window == 1:
        raise ValueError("window=1 with skip_first leaves no position to fit: use a longer window")
    L, D = model.config.n_layer, model.config.n_embd
    need_mid = any(r.source == "resid_mid" for r in fit_rows)
    sums = [RidgeSums.zeros(D) for _ in fit_rows]
    first = 1 if skip_first else 0
    bar = progress_bar(progress, len(ids), "tok", "ridge")
    try:
        for a in range(0, len(ids), window):
            trace = model.forward(ids[a:a + window], sublayers=need_mid)
            y = trace.resid[L, first:]  # [T', D] the final stream
            for s, row in zip(sums, fit_rows):
                s.add(getattr(trace, row.source)[row.index, first:], y)
            bar.update(min(window, len(ids) - a))
    finally:
        bar.close()
    if sums[0].n == 0:
        raise ValueError(f"the corpus's {len(ids)} tokens leave no position to fit (each window's first is left "
                         "out): give more text or skip_first=False")
    fitted = [s.solve(ridge) for s in sums]
    return TunedLens(tuple(r.label for r in fit_rows), np.stack([A for A, _ in fitted]).astype(np.float32),
                     np.stack([b for _, b in fitted]).astype(np.float32),
                     {"model": model.name, "fingerprint": fingerprint(model), "method": "ridge",
                      "tokens": int(sums[0].n), "ridge": float(ridge), "window": window,
                      "skip_first": bool(skip_first)})


# -------------------------------------------------------------------------------------------------
# kl


def kl_and_grad(model, h, lp_final, A, b):
    """KL(final || lens) of one row, summed over positions, and its gradient to the translator.

    Parameters
    ----------
    h : ``[C, D]`` the row's stream;  lp_final : ``[C, V]`` float64 log-probabilities of the final row
    A, b : ``[D, D]``, ``[D]`` the row's translator (``h -> h + h @ A.T + b``)

    Returns
    -------
    (kl : float, dA : [D, D], dB : [D]): the summed KL in nats and its derivatives.
    """
    p, eps = model.params, model.config.layer_norm_epsilon
    W = p.unembed  # [V, D]
    u = h + h @ A.T + b  # [C, D] the translated stream
    uc = u - u.mean(1, keepdims=True)  # [C, D]
    rstd = 1 / np.sqrt((uc * uc).mean(1, keepdims=True) + eps)  # [C, 1]
    n = uc * rstd  # [C, D] normalised
    z = (n * p.ln_f_weight + p.ln_f_bias) @ W.T  # [C, D] @ [D, V] -> [C, V] logits
    lq = log_softmax(z)  # [C, V] float64
    total = float(kl(lp_final, lq).sum())
    dz = (np.exp(lq) - np.exp(lp_final)).astype(h.dtype)  # [C, V] d KL / d z = q - p
    dn = (dz @ W) * p.ln_f_weight  # [C, V] @ [V, D] -> [C, D], through the gain
    du = rstd * (dn - dn.mean(1, keepdims=True) - n * (dn * n).mean(1, keepdims=True))  # [C, D] through the norm
    return total, du.T @ h, du.sum(0)  # dA [D, D] (out x in, A's layout), db [D]


@dataclass(frozen=True)
class KLOptions:
    """The KL fit's optimiser and schedule (tuned-lens's defaults)."""

    steps: int = 250
    tokens_per_step: int = 2 ** 18
    lr_scale: float = 1.0  # the learning rate is lr_scale * (1 - momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0

    def check(self) -> None:
        for name in ("steps", "tokens_per_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive whole number")
        for name, lo, hi in (("lr_scale", 0, math.inf), ("momentum", 0, 1), ("weight_decay", 0, math.inf),
                             ("clip", 0, math.inf)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (lo <= v < hi) or (name in ("lr_scale", "clip") and v == 0):
                raise ValueError(f"{name}={v!r} is out of range")


def fit_kl(model, texts, *, init="ridge", steps: int = 250, tokens_per_step: int = 2 ** 18,
           lr_scale: float = 1.0, momentum: float = 0.9, weight_decay: float = 1e-3, clip: float = 1.0,
           window: int | None = None, rows=None, sublayers: bool = False, ridge: float = 1e-3,
           checkpoint: str | Path | None = None, checkpoint_every: int = 0, resume: bool = False,
           progress: bool = False, chunk: int = CHUNK, ids=None) -> TunedLens:
    """The KL fit (the paper's objective and optimiser; see the module's docstring).

    Parameters
    ----------
    model, texts : as ``fit_ridge`` (``ids``: an already packed token stream instead of ``texts``)
    init : ``"ridge"`` (the ridge fit on the run's tokens first), ``"identity"``, or a ``TunedLens``
    steps, tokens_per_step : the schedule: each step reads ``tokens_per_step`` new tokens; the corpus must
        hold ``steps * tokens_per_step``
    lr_scale, momentum, weight_decay, clip : the optimiser (SGD, Nesterov; learning rate lr_scale * (1 - momentum))
    window : positions per forward pass;  rows, sublayers : the translated rows, as ``fit_ridge``
    ridge : the ridge term of ``init="ridge"``
    checkpoint, checkpoint_every : write the run's state to ``checkpoint`` every N steps (0: never)
    resume : continue from ``checkpoint`` (same model, corpus and options)
    progress : a progress bar on standard error (steps, mean KL)
    """
    opt = KLOptions(steps, tokens_per_step, lr_scale, momentum, weight_decay, clip)
    opt.check()
    window = check_window(model, window)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a whole number >= 0")
    if (checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint_every and resume need checkpoint=PATH")
    if resume and not Path(checkpoint).is_file():
        raise ValueError(f"cannot resume: no checkpoint {checkpoint}")
    fit_rows = _rows(model, rows if not isinstance(init, TunedLens) else (rows or init.rows), sublayers)
    labels = tuple(r.label for r in fit_rows)
    ids = pack(model, texts) if ids is None else np.asarray(ids, np.int32)
    need = opt.steps * opt.tokens_per_step
    if len(ids) < need:
        raise ValueError(f"the corpus has {len(ids)} tokens, {opt.steps} steps of {opt.tokens_per_step} tokens need "
                         f"{need}: give more text, or fewer steps or tokens per step")
    ids = ids[:need]
    run = {"model": model.name, "fingerprint": fingerprint(model), "corpus": hashlib.sha256(ids.tobytes()).hexdigest(),
           "rows": list(labels), "window": window, **vars(opt)}

    if resume:
        lens, buffers, step, history = read_checkpoint(checkpoint, run)
        weight, bias = lens.weight.copy(), lens.bias.copy()
    else:
        if isinstance(init, TunedLens):
            init.check_model(model, "init")
            start = init
        elif init == "ridge":
            start = fit_ridge(model, None, window=window, ridge=ridge, rows=labels, ids=ids, progress=progress)
        elif init == "identity":
            start = TunedLens.identity(model, labels)
        else:
            raise ValueError(f"init={init!r}: use 'ridge', 'identity' or a TunedLens")
        by_label = {r: i for i, r in enumerate(start.rows)}
        D = model.config.n_embd
        weight = np.stack([start.weight[by_label[r]] if r in by_label else np.zeros((D, D), np.float32)
                           for r in labels]).astype(np.float32)
        bias = np.stack([start.bias[by_label[r]] if r in by_label else np.zeros(D, np.float32)
                         for r in labels]).astype(np.float32)
        buffers, step, history = None, 0, []

    need_mid = any(r.source == "resid_mid" for r in fit_rows)
    lr0 = opt.lr_scale * (1 - opt.momentum)
    bar = progress_bar(progress, opt.steps, "step", "kl")
    bar.update(step)
    try:
        while step < opt.steps:
            losses, gW, gb = step_gradient(model, ids[step * opt.tokens_per_step:(step + 1) * opt.tokens_per_step],
                                           fit_rows, weight, bias, window=window, chunk=chunk, need_mid=need_mid)
            norm = math.sqrt(float((gW ** 2).sum() + (gb ** 2).sum()))  # over every translator, as torch clips
            scale = min(1.0, opt.clip / (norm + 1e-6))
            gW, gb = gW * scale + opt.weight_decay * weight, gb * scale + opt.weight_decay * bias
            if buffers is None:
                buffers = (gW, gb)
            else:
                buffers = (opt.momentum * buffers[0] + gW, opt.momentum * buffers[1] + gb)
            lr = lr0 * (opt.steps - step) / opt.steps  # linear decay, no warm-up (SGD)
            weight = (weight - lr * (gW + opt.momentum * buffers[0])).astype(np.float32)  # Nesterov
            bias = (bias - lr * (gb + opt.momentum * buffers[1])).astype(np.float32)
            history.append([float(x) for x in losses])
            step += 1
            bar.set_postfix(kl=f"{float(np.mean(losses)):.3f}")
            bar.update(1)
            if checkpoint_every and (step % checkpoint_every == 0 or step == opt.steps):
                write_checkpoint(checkpoint, run, labels, weight, bias, buffers, step, history)
    finally:
        bar.close()
    return TunedLens(labels, weight, bias,
                     {"model": model.name, "fingerprint": run["fingerprint"], "method": "kl",
                      "tokens": int(need), "init": init if isinstance(init, str) else "lens", "window": window,
                      **vars(opt), "kl_per_row_last_step": history[-1] if history else None})


def step_gradient(model, ids, fit_rows, weight, bias, *, window: int, chunk: int, need_mid: bool):
    """One step's mean KL per row ``[R]`` and the gradient of their sum, ``[R, D, D]`` and ``[R, D]`` (float64),
    over the tokens ``ids`` read in windows."""
    R = len(fit_rows)
    losses = np.zeros(R)
    gW = np.zeros(weight.shape)
    gb = np.zeros(bias.shape)
    for a in range(0, len(ids), window):
        trace = model.forward(ids[a:a + window], sublayers=need_mid)
        T = trace.logits.shape[0]
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            lp_final = log_softmax(trace.logits[c0:c1])  # [C, V] float64
            for r, row in enumerate(fit_rows):
                h = getattr(trace, row.source)[row.index, c0:c1]  # [C, D]
                total, dA, db = kl_and_grad(model, h, lp_final, weight[r], bias[r])
                losses[r] += total
                gW[r] += dA
                gb[r] += db
    n = len(ids)
    return losses / n, gW / n, gb / n


# -------------------------------------------------------------------------------------------------
# checkpoints of a KL run


def write_checkpoint(path, run: dict, labels, weight, bias, buffers, step: int, history) -> None:
    """The run's translators, momentum buffers, step and settings (safetensors; replaces an older one)."""
    from safetensors.numpy import save

    tensors = {"weight": weight, "bias": bias, "momentum_weight": buffers[0].astype(np.float64),
               "momentum_bias": buffers[1].astype(np.float64)}
    meta = {"format": "gpt2np tuned lens checkpoint 1", "run": json.dumps(run), "rows": json.dumps(list(labels)),
            "step": str(step), "history": json.dumps(history)}
    write_bytes(path, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta))


def read_checkpoint(path, run: dict):
    """``(lens, buffers, step, history)`` of a checkpoint of the same run, or a ValueError that says what differs."""
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
        raise ValueError(f"cannot read checkpoint {path}: {' '.join(str(e).split())}") from None
    with f:
        meta = f.metadata() or {}
        if meta.get("format") != "gpt2np tuned lens checkpoint 1":
            raise ValueError(f"{path} is not a checkpoint of a gpt2np KL fit")
        saved = json.loads(meta["run"])
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        if diff:
            raise ValueError(f"{path} is a checkpoint of another run: its {', '.join(diff)} differ; resume with the "
                             "same model, corpus and options, or start without resume")
        t = {k: f.get_tensor(k) for k in ("weight", "bias", "momentum_weight", "momentum_bias")}
    lens = TunedLens(tuple(json.loads(meta["rows"])), t["weight"], t["bias"], {})
    return lens, (t["momentum_weight"], t["momentum_bias"]), int(meta["step"]), json.loads(meta["history"])
