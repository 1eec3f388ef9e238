"""Where a prediction comes from: a residual row split into the parts that wrote it, and each part's
direct share of a logit.

The residual stream is a sum (``model.py``): at every position

    resid[L] = wte[ids] + wpe[pos] + sum over blocks l of (attn_out[l] + mlp_out[l])
    attn_out[l] = sum over heads h of heads[l, h] + c_proj's bias of block l

``decompose`` returns those terms, labelled, for any row of the trace; they sum to the row.

**Direct logit attribution** (``attribute``). The logit of token t is ``ln_f(x) . W[t]`` with
``ln_f(x) = (x - mean(x)) / s * g + b`` and ``s = sqrt(var(x) + eps)``. LayerNorm is not linear, so
the field's convention is used and stated here: the scale ``s`` is held at the value the model itself
applied to the row's stream, ``g`` is folded into the unembedding, and ``b`` is one more component:

    share(c) = ((c - mean(c)) / s) . (g * u)        for each component c of the row
    share(ln_f.bias) = b . u                         u = W[target]  (or W[target] - W[versus])

Centring is linear, so the shares sum to ``ln_f(x) . u``: exactly the model's logit (or logit
difference) at that position, up to float32 rounding. Nothing is folded into the weights and nothing
is centred in them: the numbers are the model's own. For the lens frame, ``Attribution.lens_logit``
is the target's logit under the logit lens (``ln_f`` at each row's own scale) at every row, and
``lens_change`` its change from row to row (the lens's first-order differences).

Same dimension legend as ``model.py``; C = components.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backend import namespace, to_numpy
from .decoder import INPUT, Row
from .files import write_text


class Decomposition(NamedTuple):
    """``labels`` (C names in depth order) and ``parts [C, T, D]``, which sum to the row over C."""

    labels: tuple
    parts: object


def find_row(n_layer: int, row: str | None) -> Row:
    """The row a label names: ``"input"``, ``"l"`` (after block l), ``"l.attn"`` (after block l's
    attention); ``None`` is the final stream (after the last block)."""
    if row is None:
        return Row(str(n_layer - 1), "resid", n_layer)
    if row == INPUT.label:
        return INPUT
    label, _, sub = str(row).partition(".")
    if label.isdigit() and 0 <= int(label) < n_layer and sub in ("", "attn"):
        l = int(label)
        return Row(f"{l}.attn", "resid_mid", l) if sub else Row(str(l), "resid", l + 1)
    raise ValueError(f"row={row!r} names no row of this model: use 'input', '0' ... '{n_layer - 1}' (after a "
                     f"block) or '0.attn' ... '{n_layer - 1}.attn' (after a block's attention)")


def component_labels(n_layer: int, n_head: int, row: Row, heads: bool) -> tuple:
    """The labels of the terms that sum to ``row``, in depth order (``decompose``'s, without ``ln_f.bias``)."""
    labels = ["embed", "pos_embed"]
    full = row.index if row.source == "resid" else row.index + 1  # blocks whose attention came before the row
    for l in range(full):
        labels += [f"{l}.h{h}" for h in range(n_head)] + [f"{l}.attn_bias"] if heads else [f"{l}.attn"]
        if row.source == "resid" or l < row.index:  # the row "l.attn" comes before block l's MLP
            labels.append(f"{l}.mlp")
    return tuple(labels)


def _check_trace(model, trace, heads: bool) -> None:
    """Refuse a trace that lacks what the decomposition reads, before any work."""
    L, D = model.config.n_layer, model.config.n_embd
    if tuple(trace.resid.shape[::2]) != (L + 1, D):
        raise ValueError(f"the trace has resid of shape {list(trace.resid.shape)}, this model makes "
                         f"[{L + 1}, T, {D}]: pass a trace made by this model")
    if trace.attn_out is None or trace.mlp_out is None:
        raise ValueError("the decomposition reads each block's attn_out and mlp_out: make the trace with "
                         "model.forward(ids, sublayers=True)")
    if heads and getattr(trace, "heads", None) is None:
        raise ValueError("heads=True reads each head's output: make the trace with "
                         "model.forward(ids, sublayers=True, heads=True)")


def decompose(model, trace, row: str | None = None, heads: bool = False) -> Decomposition:
    """Split a residual row into the labelled terms that sum to it.

    Parameters
    ----------
    model : the ``gpt2np.Model`` that made the trace
    trace : ``model.forward(ids, sublayers=True)`` (and ``heads=True`` for ``heads``)
    row : ``None`` (the final stream, default), ``"input"``, ``"l"`` or ``"l.attn"`` (see ``find_row``)
    heads : split each attention output into its heads ``l.h0`` ... and ``l.attn_bias``

    Returns
    -------
    Decomposition
        ``labels``: ``embed``, ``pos_embed``, then per block before the row ``l.attn`` (or ``l.h0`` ...
        ``l.attn_bias``) and ``l.mlp``; ``parts``: ``[C, T, D]``, summing over C to the row ``[T, D]``.
    """
    _check_trace(model, trace, heads)
    c = model.config
    labels = component_labels(c.n_layer, c.n_head, find_row(c.n_layer, row), heads)
    xp = namespace(trace.resid)
    T, D = trace.resid.shape[1], c.n_embd
    p = model.params

    def part(label: str):  # [T, D]
        if label == "embed":
            return xp.take(p.wte, xp.asarray(to_numpy(trace.ids)), axis=0)
        if label == "pos_embed":
            return p.wpe[:T, :]
        block, kind = label.split(".")
        l = int(block)
        if kind == "attn":
            return trace.attn_out[l, ...]
        if kind == "mlp":
            return trace.mlp_out[l, ...]
        if kind == "attn_bias":
            return xp.broadcast_to(p.h[l].attn_c_proj_bias, (T, D))
        return trace.heads[l, int(kind[1:]), ...]  # "h3": head 3

    parts = [part(label) for label in labels]
    return Decomposition(labels, xp.stack(parts, axis=0))  # [C, T, D]


@dataclass(frozen=True)
class Attribution:
    """Direct contributions of each component to one logit (or logit difference) at one position.

    ``shares[c]`` is component ``labels[c]``'s share; they sum to ``logit``, the model's own value
    (``ln_f(row) . u``) at ``position``. ``rows``/``lens_logit`` are the lens frame: the target's logit
    under the logit lens at every row up to the attributed one (depth order).
    """

    labels: tuple  # C component names, depth order; the last is "ln_f.bias"
    shares: np.ndarray  # [C] float64
    logit: float  # the model's logit (difference) at the position, from its own arithmetic (float32)
    target: int
    versus: int | None
    position: int  # absolute, >= 0
    row: str  # the attributed row's label
    scale: float  # s, the LayerNorm scale the row's stream had
    rows: tuple  # R lens rows up to the attributed one
    lens_logit: np.ndarray  # [R] float64
    tokens: tuple  # display strings: the target's, then the versus token's (or "")

    @property
    def lens_change(self) -> np.ndarray:
        """``[R - 1]``: the lens logit's change from each row to the next (``rows[1:]``)."""
        return np.diff(self.lens_logit)

    @property
    def total(self) -> float:
        """The shares' sum (equals ``logit`` up to float32 rounding)."""
        return float(np.sum(self.shares))

    def head_grid(self) -> np.ndarray:
        """``[L', H]`` the heads' shares by block and head (blocks before the row), for ``heads=True``."""
        names = [s for s in self.labels if ".h" in s]
        if not names:
            raise ValueError("this attribution has no per-head shares: make it with heads=True")
        blocks = sorted({int(s.split(".")[0]) for s in names})
        H = len({s.split(".h")[1] for s in names})
        grid = np.zeros((len(blocks), H))
        for s, v in zip(self.labels, self.shares):
            if ".h" in s:
                b, h = s.split(".h")
                grid[blocks.index(int(b)), int(h)] = v
        return grid

    def table(self, n: int | None = None) -> list[tuple[str, float]]:
        """``(label, share)`` pairs, largest magnitude first (the first ``n`` when given)."""
        order = np.argsort(-np.abs(self.shares), kind="stable")
        return [(self.labels[i], float(self.shares[i])) for i in order[:n]]

    def to_json(self) -> dict:
        return {"labels": list(self.labels), "shares": [float(x) for x in self.shares], "logit": self.logit,
                "target": self.target, "versus": self.versus, "position": self.position, "row": self.row,
                "scale": self.scale, "rows": list(self.rows), "lens_logit": [float(x) for x in self.lens_logit],
                "tokens": list(self.tokens)}

    def save(self, path: str | Path) -> None:
        """Write the attribution as JSON (plain numbers; read back with ``Attribution.load``)."""
        write_text(path, json.dumps(self.to_json(), indent=1))  # beside, then renamed: never a half file

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(labels=tuple(d["labels"]), shares=np.asarray(d["shares"], dtype=np.float64),
                   logit=float(d["logit"]), target=int(d["target"]),
                   versus=None if d["versus"] is None else int(d["versus"]), position=int(d["position"]),
                   row=str(d["row"]), scale=float(d["scale"]), rows=tuple(d["rows"]),
                   lens_logit=np.asarray(d["lens_logit"], dtype=np.float64), tokens=tuple(d["tokens"]))


def token_id(model, token, what: str = "target") -> int:
    """A token id from an int or from a string that encodes to exactly one token."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        t = int(token)
        if not 0 <= t < model.config.vocab_size:
            raise ValueError(f"{what}={t} is outside the vocabulary [0, {model.config.vocab_size})")
        return t
    if not isinstance(token, str):
        raise TypeError(f"{what} must be a token id or a string that is one token, got {type(token).__name__}")
    ids = [int(i) for i in model.encode(token)]
    if len(ids) != 1:
        shown = " + ".join(repr(s) for s in model.tokens(ids)) if ids else "no tokens"
        raise ValueError(f"{what}={token!r} encodes to {len(ids)} tokens ({shown}); pass one token "
                         "(often with its leading space, e.g. ' Paris') or a token id")
    return ids[0]


def check_position(position, T: int, what: str = "position") -> int:
    """An absolute position in ``[0, T)`` from ``position`` (negative counts from the end)."""
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise TypeError(f"{what} must be a whole number, got {position!r}")
    if not -T <= position < T:
        raise ValueError(f"{what}={int(position)} is outside the text's {T} tokens: use 0 ... {T - 1} "
                         f"or -1 ... -{T}")
    return int(position) % T


def attribute(model, trace, target, *, versus=None, position: int = -1, heads: bool = False,
              row: str | None = None) -> Attribution:
    """Each component's direct contribution to the logit of ``target`` (minus ``versus``'s) at ``position``.

    Parameters
    ----------
    model, trace : the ``Model`` and ``model.forward(ids, sublayers=True)`` (``heads=True`` too for heads)
    target, versus : token ids, or strings that encode to one token each
    position : the position whose next-token logit is attributed (negative counts from the end)
    heads : attribute to each head (``l.h0`` ...) and the attention bias rather than to ``l.attn``
    row : attribute the lens's logit at this row (``decompose``'s labels) instead of the final one

    Returns
    -------
    Attribution
        ``shares`` sum to ``logit``, the model's own logit (difference) at the row; see the module's
        docstring for the convention (ln_f's scale held at the model's value, its bias a component).

    Examples
    --------
    >>> tr = m.forward(m.encode("When John and Mary went to the shops, John gave the bag to"), sublayers=True)
    >>> a = gpt2np.attribute(m, tr, " Mary", versus=" John")
    >>> a.table(5)
    """
    _check_trace(model, trace, heads)
    t = token_id(model, target)
    v = None if versus is None else token_id(model, versus, "versus")
    if v == t:
        raise ValueError(f"target and versus are the same token ({t}): their logit difference is 0 everywhere")
    pos = check_position(position, trace.resid.shape[1])
    r = find_row(model.config.n_layer, row)
    p, eps = model.params, model.config.layer_norm_epsilon

    W = to_numpy(p.unembed)
    u = W[t].astype(np.float64) - (0.0 if v is None else W[v].astype(np.float64))  # [D]
    g, b = to_numpy(p.ln_f_weight).astype(np.float64), to_numpy(p.ln_f_bias).astype(np.float64)  # [D]
    labels, parts = decompose(model, trace, row, heads)
    c = to_numpy(parts[:, pos, :]).astype(np.float64)  # [C, D] the components at the position
    x = to_numpy(getattr(trace, r.source)[r.index, pos, :]).astype(np.float64)  # [D] the row's stream itself
    s = np.sqrt(np.var(x) + eps)  # the scale LayerNorm applies to this stream
    shares = np.append((c - c.mean(axis=1, keepdims=True)) / s @ (g * u), b @ u)  # [C + 1]
    # The model's own logit, from its float32 arithmetic: the trace's logits on the final row.
    if r.index == model.config.n_layer and r.source == "resid":
        z = to_numpy(trace.logits[pos, :])
        logit = float(z[t]) - (0.0 if v is None else float(z[v]))
    else:
        logit = float(((x - x.mean()) / s * g + b) @ u)

    rows, lens = _lens_frame(model, trace, r, pos, u, g, b, eps)
    names = model.tokens([t] + ([] if v is None else [v]))
    return Attribution(labels + ("ln_f.bias",), shares, logit, t, v, pos, r.label, float(s), rows, lens,
                       (names[0], names[1] if v is not None else ""))


def _lens_frame(model, trace, r: Row, pos: int, u, g, b, eps: float):
    """The lens logit ``ln_f(row) . u`` at ``pos`` for every row from the input to ``r``, in depth order."""
    rows = [INPUT]
    for l in range(model.config.n_layer):
        if trace.resid_mid is not None:
            rows.append(Row(f"{l}.attn", "resid_mid", l))
        rows.append(Row(str(l), "resid", l + 1))
    rows = rows[:rows.index(r) + 1]
    out = []
    for row in rows:
        x = to_numpy(getattr(trace, row.source)[row.index, pos, :]).astype(np.float64)  # [D]
        out.append(((x - x.mean()) / np.sqrt(np.var(x) + eps) * g + b) @ u)
    return tuple(row.label for row in rows), np.asarray(out)
