"""The tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine translator per row, then the decoder.

A translator maps a row's stream ``h [T, D]`` to

    h + h @ A.T + b                      A [D, D] (nn.Linear's layout), b [D]

before the decoder's normalisation; ln_f and the unembedding stay the model's. A and b start at zero
(the identity, the logit lens), and the fits pull toward it. Rows are named as the lens names them:
``input`` (the embedding output), ``0`` .. ``L-2`` (after each block but the last, whose stream is the
output and needs no translator) and, when fitted, the sub-rows ``l.attn``. A row without a translator
is read as the logit lens reads it. The lens applies them: ``logit_lens(model, trace, translator=t)``.

This file holds the translators and their files:

* ``TunedLens.save`` / ``TunedLens.load``: safetensors, one ``<row>.weight`` / ``<row>.bias`` pair per
  row, and the settings (model, the ``fingerprint`` of the ln_f and unembedding it was fitted against,
  method, tokens seen) as metadata; ``load(path, model)`` refuses a lens fitted against other weights.
* ``read_published(folder, model)``: tuned-lens's published ``config.json`` + ``params.pt`` (translator
  i reads ``hidden_states[i]``: i = 0 the embeddings, i the stream after block i - 1), read by
  ``torchfile.py`` without torch and without unpickling.
* ``fit(model, texts, method=...)``: the fits, in ``tuned_fit.py``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import namespace, to_numpy
from .decoder import select_rows
from .files import write_bytes

FORMAT = "gpt2np tuned lens 1"


def row_labels(n_layer: int, *, sublayers: bool = False) -> tuple[str, ...]:
    """The rows a tuned lens can translate: ``input``, ``0`` .. ``L-2`` (and ``l.attn`` for every block
    with ``sublayers``), in depth order; the last block's row is the output and is never translated."""
    return tuple(r.label for r in select_rows(n_layer, sublayers=sublayers) if r.label != str(n_layer - 1))


def fingerprint(model) -> str:
    """SHA-256 of what a tuned lens is fitted against: ln_f's gain and bias and the unembedding, as
    little-endian float32 with their shapes. Equal weights give equal fingerprints on every machine."""
    h = hashlib.sha256()
    p = model.params
    for a in (p.ln_f_weight, p.ln_f_bias, p.unembed):
        a = np.ascontiguousarray(to_numpy(a), dtype="<f4")
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class TunedLens:
    """Translators ``weight [R, D, D]`` (float32, applied as ``h @ weight[r].T``) and ``bias [R, D]`` for
    the rows ``rows`` (labels), with the ``settings`` of the fit (plain JSON values)."""

    rows: tuple
    weight: np.ndarray
    bias: np.ndarray
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        R = len(self.rows)
        if len(set(self.rows)) != R:
            raise ValueError(f"a tuned lens has each row once, got {list(self.rows)}")
        if self.weight.ndim != 3 or self.weight.shape[0] != R or self.weight.shape[1] != self.weight.shape[2]:
            raise ValueError(f"translator weights must be [{R}, D, D] for {R} rows, got {list(self.weight.shape)}")
        if self.bias.shape != self.weight.shape[:2]:
            raise ValueError(f"translator biases must be {list(self.weight.shape[:2])}, got {list(self.bias.shape)}")

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def identity(cls, model, rows=None, **settings) -> "TunedLens":
        """Zero translators (the logit lens) for ``rows`` (default: ``row_labels``)."""
        rows = tuple(rows or row_labels(model.config.n_layer))
        D = model.config.n_embd
        return cls(rows, np.zeros((len(rows), D, D), np.float32), np.zeros((len(rows), D), np.float32),
                   {"model": model.name, "fingerprint": fingerprint(model), **settings})

    def apply(self, label: str, x):
        """Row ``label``'s stream ``x [T, D]`` translated: ``x + x @ A.T + b`` (``x`` itself when the row has
        no translator). The result is in ``x``'s array namespace."""
        if label not in self.rows:
            return x
        xp = namespace(x)
        r = self.rows.index(label)
        A, b = xp.asarray(self.weight[r]), xp.asarray(self.bias[r])  # [D, D], [D]
        return x + x @ xp.permute_dims(A, (1, 0)) + b  # [T, D]

    def check(self, model) -> None:
        """Refuse a lens that cannot be applied to ``model``'s rows (width, row names)."""
        c = model.config
        if self.width != c.n_embd:
            raise ValueError(f"the tuned lens has translators of width {self.width}, the model {model.name} "
                             f"has width {c.n_embd}: fit a lens for this model (gpt2np tune)")
        allowed = set(row_labels(c.n_layer, sublayers=True))
        bad = [r for r in self.rows if r not in allowed]
        if bad:
            raise ValueError(f"the tuned lens translates rows {bad} that {model.name} ({c.n_layer} blocks) does not "
                             f"have or that need no translator (the last block's row is the output)")

    def check_model(self, model, source: str = "the tuned lens") -> None:
        """``check``, and refuse a lens fitted against other ln_f or unembedding weights."""
        self.check(model)
        want = self.settings.get("fingerprint")
        if want is not None and want != fingerprint(model):
            raise ValueError(f"{source} was fitted against other weights (model {self.settings.get('model')!r}, "
                             f"ln_f and unembedding fingerprint {want[:12]}...), not {model.name}'s "
                             f"({fingerprint(model)[:12]}...): use the lens with the model it was fitted on, or fit "
                             "one for this model (gpt2np tune)")

    @property
    def description(self) -> str:
        """One line for titles and saved settings: method, tokens and fingerprint."""
        s = self.settings
        parts = [str(s.get("method", "tuned"))]
        if s.get("tokens"):
            parts.append(f"{s['tokens']} tokens")
        if s.get("fingerprint"):
            parts.append(f"fitted on {s.get('model', '?')} {s['fingerprint'][:8]}")
        return "tuned lens (" + ", ".join(parts) + ")"

    # --- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Safetensors: ``<row>.weight [D, D]`` and ``<row>.bias [D]`` per row, float32; the rows and settings
        as metadata. Written beside the target and moved into place (a failure leaves an old file)."""
        from safetensors.numpy import save

        tensors = {}
        for r, label in enumerate(self.rows):
            tensors[f"{label}.weight"] = np.ascontiguousarray(self.weight[r], np.float32)
            tensors[f"{label}.bias"] = np.ascontiguousarray(self.bias[r], np.float32)
        meta = {"format": FORMAT, "rows": json.dumps(list(self.rows)), "settings": json.dumps(self.settings)}
        return write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, model=None) -> "TunedLens":
        """A lens written by ``save``; with ``model``, refused unless it was fitted against its weights."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a gpt2np tuned lens (its metadata has no format {FORMAT!r}); "
                                     "a tuned-lens folder (config.json, params.pt) is read with read_published")
                rows = tuple(json.loads(meta["rows"]))
                names = set(f.keys())
                missing = [f"{r}.{k}" for r in rows for k in ("weight", "bias") if f"{r}.{k}" not in names]
                if missing:
                    raise ValueError(f"{path}: tensors {missing[:4]} of its rows are missing")
                weight = np.stack([f.get_tensor(f"{r}.weight") for r in rows]).astype(np.float32, copy=False)
                bias = np.stack([f.get_tensor(f"{r}.bias") for r in rows]).astype(np.float32, copy=False)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read tuned lens {path}: {e}") from None
        lens = cls(rows, weight, bias, json.loads(meta["settings"]))
        if model is not None:
            lens.check_model(model, str(path))
        return lens


def read_published(folder: str | Path, model) -> TunedLens:
    """A lens published by tuned-lens: ``folder/config.json`` and ``folder/params.pt`` (``torch.save`` of
    the translators' state dict, keys ``0.weight``, ``0.bias``, ...; read without torch and without
    unpickling, ``torchfile.py``). Translator i reads ``hidden_states[i]``: row ``input`` for i = 0, row
    ``i - 1`` after. Checked against ``model``'s width and depth; its fingerprint is recorded as the
    model's (tuned-lens's own hash field cannot be checked: see the README)."""
    folder = Path(folder)
    cfg_path, pt_path = folder / "config.json", folder / "params.pt"
    for p in (cfg_path, pt_path):
        if not p.is_file():
            raise ValueError(f"{folder} is not a published tuned lens: {p.name} is missing "
                             "(a tuned-lens folder has config.json and params.pt)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not JSON: {e}") from None
    c = model.config
    if cfg.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ValueError(f"{cfg_path}: lens_type {cfg['lens_type']!r} is not supported (only linear_tuned_lens)")
    for key, want in (("d_model", c.n_embd), ("num_hidden_layers", c.n_layer)):
        if key not in cfg:
            raise ValueError(f"{cfg_path} has no {key!r}: is it a tuned-lens config?")
        if cfg[key] != want:
            raise ValueError(f"{cfg_path}: {key} = {cfg[key]}, but {model.name} has {want}: this lens is for "
                             f"{cfg.get('base_model_name_or_path', 'another model')}")
    from .torchfile import read_state_dict

    state = read_state_dict(pt_path)
    L, D = c.n_layer, c.n_embd
    rows, weights, biases = [], [], []
    for i in range(L):
        w = state.pop(f"{i}.weight", None)
        if w is None:
            raise ValueError(f"{pt_path} has no tensor {i}.weight: a tuned lens for {L} blocks has 0.weight .. "
                             f"{L - 1}.weight")
        bias = state.pop(f"{i}.bias", None)
        if bias is None and cfg.get("bias", True):
            raise ValueError(f"{pt_path} has no tensor {i}.bias, and its config says bias = true")
        bias = np.zeros(D, np.float32) if bias is None else bias
        if w.shape != (D, D) or bias.shape != (D,):
            raise ValueError(f"{pt_path}: translator {i} has shapes {list(w.shape)}, {list(bias.shape)}; "
                             f"{model.name} needs [{D}, {D}], [{D}]")
        rows.append("input" if i == 0 else str(i - 1))
        weights.append(w.astype(np.float32))
        biases.append(bias.astype(np.float32))
    if state:
        raise ValueError(f"{pt_path} holds tensors a tuned lens for {L} blocks does not have: {sorted(state)[:4]}")
    settings = {"model": model.name, "fingerprint": fingerprint(model), "method": "published",
                "source": str(folder), "base_model": cfg.get("base_model_name_or_path")}
    # translator L-1 reads the stream after block L-2; the last block's row (the output) has none
    return TunedLens(tuple(rows), np.stack(weights), np.stack(biases), settings)


def fit(model, texts, *, method: str = "ridge", **options) -> TunedLens:
    """Fit a tuned lens on ``texts`` (an iterable of strings): ``method="ridge"`` (streaming least squares
    from each row's stream to the final stream, solved once) or ``"kl"`` (the paper's objective and
    optimiser, from the ridge fit or the identity). Options and their defaults: ``tuned_fit.py``."""
    from . import tuned_fit

    if method == "ridge":
        return tuned_fit.fit_ridge(model, texts, **options)
    if method == "kl":
        return tuned_fit.fit_kl(model, texts, **options)
    raise ValueError(f"unknown method {method!r}: choose ridge or kl")
