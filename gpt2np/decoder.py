"""How the logit lens reads a row of the residual stream: the rows, and the decoder that turns one into logits.

A decoder turns a row's stream ``x [T, D]`` into logits ``[T, V]`` in three steps (lens-spec.md):

    x -> (the last ``blocks`` blocks, run on the whole prefix, causally) -> the normalisation -> @ W.T

The normalisation is one of ``NORMS``: ``ln_f`` (the model's final LayerNorm, gain and bias included:
on the last row this is exactly the model's output), ``norm`` (the normalisation alone, the post's
figures) or ``raw`` (none). The unembedding W ``[V, D]`` is the model's (``params.unembed``).

A ``translator`` (a ``gpt2np.tuned.TunedLens``) maps each row it has a translator for,
``x -> x + x @ A.T + b``, before the normalisation: the tuned lens. The final stream (the KL anchor) is
never translated.

A ``Row`` says where a row is read (``resid[index]`` or ``resid_mid[index]``); ``select_rows`` lists the
shown rows. The lens (``lens.py``) takes a ``Decoder`` and never looks inside it. Same dimension legend
as ``model.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import model as M

NORMS = ("ln_f", "norm", "raw")


class Row(NamedTuple):
    """One shown row: its label (``input``, ``3.attn``, ``3``), the trace field and the index in it."""

    label: str
    source: str  # "resid" ([L+1, T, D]) or "resid_mid" ([L, T, D])
    index: int


INPUT = Row("input", "resid", 0)


def select_rows(n_layer: int, *, step: int = 1, include_input: bool = True, sublayers: bool = False,
                decoder_blocks: int = 0) -> list[Row]:
    """The shown rows in depth order.

    Of the n = L - decoder_blocks shown blocks, block l is kept when (n - 1 - l) % step == 0, so the
    last shown block is always kept; ``l.attn`` comes with every kept block l when ``sublayers``.
    """
    n = n_layer - decoder_blocks
    rows = [INPUT] if include_input else []
    for l in range(n):
        if (n - 1 - l) % step == 0:
            if sublayers:
                rows.append(Row(f"{l}.attn", "resid_mid", l))
            rows.append(Row(str(l), "resid", l + 1))
    return rows


def run_blocks(model, x, first: int):
    """Run blocks ``first..L-1`` on a whole prefix ``x [T, D]`` exactly as the model does -> ``[T, D]``."""
    c = model.config
    for l in range(first, c.n_layer):
        b = model.params.h[l]
        x = x + M.attention(M.layer_norm(x, b.ln_1_weight, b.ln_1_bias, c.layer_norm_epsilon), b, c.n_head,
                            c.attn_scale(l))[0]  # [T, D]
        x = x + M.mlp(M.layer_norm(x, b.ln_2_weight, b.ln_2_bias, c.layer_norm_epsilon), b)  # [T, D]
    return x


@dataclass(frozen=True)
class Decoder:
    """How a row becomes the decoder's input: ``blocks`` last blocks or the row's ``translator`` (not
    both), then the normalisation ``norm``.

    ``read`` gives the normalised stream ``x_hat``; the logits are ``x_hat @ W.T`` (the lens makes
    that product itself, in position chunks). ``final`` reads the final stream: normalised only, since
    the model already ran every block on it (lens-spec.md, "final").
    """

    norm: str = "ln_f"
    blocks: int = 0
    translator: object = None  # a gpt2np.tuned.TunedLens, or None

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: choose one of {', '.join(NORMS)}")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise ValueError(f"decoder_blocks={self.blocks!r} must be a whole number >= 0")
        if self.translator is not None and self.blocks:
            raise ValueError("a tuned lens maps each row to the final stream itself; decoder_blocks runs the last "
                             "blocks instead: give translator= or decoder_blocks=, not both")

    def normalise(self, model, x):
        """The decoder's normalisation of a stream ``x [..., D]`` -> ``[..., D]``."""
        p, eps = model.params, model.config.layer_norm_epsilon
        if self.norm == "ln_f":
            return M.layer_norm(x, p.ln_f_weight, p.ln_f_bias, eps)
        if self.norm == "norm":
            return M.layer_norm(x, None, None, eps)
        return x

    def stream(self, model, trace, row: Row, a: int, b: int):
        """The stream of ``row`` at positions ``[a, b)`` as the normalisation sees it -> ``[b - a, D]``:
        with decoder blocks, the prefix ``[0, b)`` runs through them first."""
        x = getattr(trace, row.source)[row.index, ...]  # [T, D]
        if self.blocks:
            x = run_blocks(model, x[:b, :], model.config.n_layer - self.blocks)  # [b, D], causally
        return x[a:b, :]

    def read(self, model, trace, row: Row, a: int, b: int):
        """``x_hat [b - a, D]``: row ``row`` at positions ``[a, b)``, ready for the unembedding."""
        x = self.stream(model, trace, row, a, b)  # [b - a, D]
        if self.translator is not None:
            x = self.translator.apply(row.label, x)  # x + x @ A.T + b, for a row with a translator
        return self.normalise(model, x)

    def final(self, model, trace, a: int, b: int):
        """``x_hat [b - a, D]`` of the final stream (after the last block), the lens's "final" anchor."""
        return self.normalise(model, trace.resid[model.config.n_layer, a:b, :])

    @property
    def settings(self) -> dict:
        """What a saved lens records of its decoder."""
        out = {"norm": self.norm, "decoder_blocks": self.blocks}
        if self.translator is not None:
            out["translator"] = self.translator.description
        return out
