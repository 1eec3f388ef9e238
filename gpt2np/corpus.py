"""Lens statistics over a corpus: sums, counts and histograms per row that merge exactly.

A text is tokenised and read in windows of ``window`` positions (default the model's context). The
first window scores all its positions; each later window starts ``stride`` positions after the one
before and scores only the positions the earlier windows did not reach, so every token is scored once.
For each window the lens is ``gpt2np.logit_lens`` (the definition in ``lens.py``, computed by its fast
path on NumPy), and its cells are added up here. Per row r, over the scored positions p:

    kl_final[r]     sum of KL(final || row)             entropy[r]      sum of the row's entropy
    kl_input[r]     sum of KL(input || row)             agree_final[r]  count of top-1 == final top-1
    final_rank_hist[r, b]   count of positions whose final top-1 has rank in bin b under the row
    lock_in_hist[r]         count of positions whose lock-in row is r

and over every position of the text but its last (the one with no next token), each under the lens of
the first window that holds both it and its next token (with a stride below the window, the position
before a window's new positions is read there once more, for these statistics only; with the stride
equal to the window, a window's last position has its next token in no window and is left out):

    next_xent[r]    sum of -ln p(next token)            next_correct[r] count of top-1 == next token
    next_rank_hist[r, b]    the next token's rank, binned

Bins are fixed powers of two: bin b holds ranks in ``[2**b, 2**(b+1))`` (``RANK_BINS`` bins cover any
vocabulary below 2**17). ``positions`` and ``next_positions`` count the two sets, ``next_bytes`` the UTF-8
bytes of those next tokens, so that ``bits_per_byte = sum next_xent / ln 2 / next_bytes`` (the measure
tuned-lens reports). Means are the sums over their counts. ``merge`` adds two statistics: it is
associative and commutative, so any split of a corpus gives the same totals (counts exactly, sums to
float64 rounding).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .files import write_text
from .tokenizer import token_bytes

RANK_BINS = 17
_SUMS = ("kl_final", "kl_input", "entropy", "next_xent")
_COUNTS = ("agree_final", "next_correct", "final_rank_hist", "next_rank_hist", "lock_in_hist")


@dataclass(frozen=True)
class CorpusStats:
    """Sums ``[R]`` (float64), counts ``[R]`` and histograms ``[R, RANK_BINS]`` (int64) per row, and totals."""

    rows: tuple
    kl_final: np.ndarray
    kl_input: np.ndarray
    entropy: np.ndarray
    next_xent: np.ndarray
    agree_final: np.ndarray
    next_correct: np.ndarray
    final_rank_hist: np.ndarray
    next_rank_hist: np.ndarray
    lock_in_hist: np.ndarray
    documents: int = 0
    positions: int = 0
    next_positions: int = 0
    next_bytes: int = 0
    settings: dict = field(default_factory=dict)

    def merge(self, other: "CorpusStats") -> "CorpusStats":
        """The statistics of both parts together (rows and settings must agree)."""
        if self.rows != other.rows or self.settings != other.settings:
            raise ValueError(f"cannot merge statistics of other rows or settings: {self.rows} {self.settings} "
                             f"against {other.rows} {other.settings}")
        arrays = {k: getattr(self, k) + getattr(other, k) for k in _SUMS + _COUNTS}
        totals = {k: getattr(self, k) + getattr(other, k)
                  for k in ("documents", "positions", "next_positions", "next_bytes")}
        return CorpusStats(self.rows, **arrays, **totals, settings=self.settings)

    # --- means ---------------------------------------------------------------------------------------
    def mean(self, name: str) -> np.ndarray:
        """``[R]`` the mean of a sum or count over its positions (NaN when none were scored)."""
        n = self.next_positions if name in ("next_xent", "next_correct") else self.positions
        with np.errstate(invalid="ignore", divide="ignore"):
            return getattr(self, name) / n if n else np.full(len(self.rows), np.nan)

    @property
    def bits_per_byte(self) -> np.ndarray:
        """``[R]`` next-token cross-entropy in bits per UTF-8 byte of the predicted tokens."""
        return self.next_xent / math.log(2) / self.next_bytes if self.next_bytes else np.full(len(self.rows), np.nan)

    # --- files ---------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else list(v) if k == "rows" else v) for k, v in out.items()}
        out["format"] = "gpt2np corpus statistics 1"
        return out

    def save(self, path: str | Path) -> None:
        """JSON (sums written with full float64 precision); read back with ``CorpusStats.load``."""
        write_text(path, json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "CorpusStats":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if d.get("format") != "gpt2np corpus statistics 1":
            raise ValueError(f"{path} is not a file of gpt2np corpus statistics")
        R = len(d["rows"])
        kw = {}
        for k in _SUMS + _COUNTS:
            a = np.asarray(d[k], np.float64 if k in _SUMS else np.int64)
            want = (R, RANK_BINS) if k.endswith("rank_hist") else (R,)
            if a.shape != want:
                raise ValueError(f"{path}: {k} has shape {list(a.shape)}, its {R} rows imply {list(want)}")
            kw[k] = a
        return cls(tuple(d["rows"]), **kw, documents=int(d["documents"]), positions=int(d["positions"]),
                   next_positions=int(d["next_positions"]), next_bytes=int(d["next_bytes"]),
                   settings=dict(d["settings"]))


def rank_bin(rank: np.ndarray) -> np.ndarray:
    """Bin of each rank (>= 1): ``floor(log2(rank))``, capped at the last bin."""
    return np.minimum(np.floor(np.log2(rank)).astype(np.int64), RANK_BINS - 1)


def windows(T: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first scored)`` of each window over T tokens: every position scored exactly once."""
    out, begin, done = [], 0, 0
    while done < T:
        end = min(begin + window, T)
        out.append((begin, end, done))
        done = end
        begin += stride
    return out


def lens_stats(model, lens, next_only: int = 0) -> CorpusStats:
    """The statistics of one lens's window (its cells added up as the module describes); its first
    ``next_only`` positions count for the next-token statistics only (scored by an earlier window)."""
    known = lens.next_ids >= 0  # [W] positions whose next token is in the window
    R = len(lens.rows)
    nxt = lens.next_ids[known]
    own = slice(next_only, None)  # the positions this window scores
    nbytes = sum(len(token_bytes(model.tokenizer, int(i), model.config.vocab_size)) for i in nxt)
    fr_hist = np.zeros((R, RANK_BINS), np.int64)
    nr_hist = np.zeros((R, RANK_BINS), np.int64)
    for r in range(R):
        fr_hist[r] = np.bincount(rank_bin(lens.final_rank[r, own]), minlength=RANK_BINS)
        nr_hist[r] = np.bincount(rank_bin(lens.next_rank[r, known]), minlength=RANK_BINS)
    return CorpusStats(
        tuple(lens.rows),
        kl_final=lens.kl_final[:, own].sum(1), kl_input=lens.kl_input[:, own].sum(1),
        entropy=lens.entropy[:, own].sum(1), next_xent=lens.next_xent[:, known].sum(1),
        agree_final=lens.matches_final[:, own].sum(1).astype(np.int64),
        next_correct=(lens.top1[:, known] == nxt[None, :]).sum(1).astype(np.int64),
        final_rank_hist=fr_hist, next_rank_hist=nr_hist,
        lock_in_hist=np.bincount(lens.lock_in[own], minlength=R).astype(np.int64),
        documents=0, positions=int(lens.end - lens.start - next_only), next_positions=int(known.sum()),
        next_bytes=nbytes,
        settings=lens_settings(lens.settings))


def lens_settings(settings: dict) -> dict:
    """What two statistics must share to merge: the model and the lens's row and decoder options."""
    keep = ("model", "step", "include_input", "sublayers", "norm", "decoder_blocks", "translator")
    return {k: settings[k] for k in keep if k in settings}


def corpus_stats(model, texts, *, window: int | None = None, stride: int | None = None, step: int = 1,
                 sublayers: bool = False, norm: str = "ln_f", decoder_blocks: int = 0,
                 include_input: bool = True, translator=None, client=None, progress: bool = False,
                 total_tokens: int | None = None) -> CorpusStats:
    """The lens's statistics over ``texts`` (an iterable of strings, read one at a time).

    Parameters
    ----------
    model : a ``gpt2np.Model``
    texts : iterable of str (a generator keeps the corpus out of memory)
    window : positions per forward pass (default ``n_positions``)
    stride : positions between window starts (default ``window``); later windows score only new positions
    step, sublayers, norm, decoder_blocks, include_input : the lens's rows and decoder, as in ``logit_lens``
    translator : a ``gpt2np.tuned.TunedLens``: the tuned lens's statistics (``compare_stats`` gives both)
    client : a ``dask.distributed.Client``: documents become Dask tasks (``corpus_dask.py``)
    progress : a progress bar on standard error (tokens scored, tokens per second; with ``total_tokens``,
        the corpus's token count, also the fraction done and the time left)

    Returns
    -------
    CorpusStats
    """
    options = dict(window=window, stride=stride, step=step, sublayers=sublayers, norm=norm,
                   decoder_blocks=decoder_blocks, include_input=include_input)
    return _run(model, texts, (translator,), options, client, progress, total_tokens)[0]


def compare_stats(model, texts, translator, **options) -> dict[str, CorpusStats]:
    """``{"logit lens": ..., "tuned lens": ...}``: the statistics of the logit lens and of ``translator``
    (a ``TunedLens``) over the same corpus, in one pass (one forward pass per window, both lenses read
    from its trace). Options as ``corpus_stats``."""
    if translator is None:
        raise ValueError("compare_stats needs a translator (a gpt2np.tuned.TunedLens); corpus_stats gives one lens")
    client, progress, total = (options.pop(k, d) for k, d in (("client", None), ("progress", False),
                                                              ("total_tokens", None)))
    both = _run(model, texts, (None, translator), options, client, progress, total)
    return dict(zip(("logit lens", "tuned lens"), both))


def _run(model, texts, translators: tuple, options: dict, client, progress, total_tokens) -> list[CorpusStats]:
    """The statistics of each lens in ``translators`` (None: the logit lens) over ``texts``."""
    from .decoder import Decoder

    window = check_window(model, options.get("window"))
    stride = window if options.get("stride") is None else options["stride"]
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not 1 <= stride <= window:
        raise ValueError(f"stride={stride!r} must be a whole number from 1 to {window} (the window)")
    for t in translators:
        if t is not None:
            t.check(model)
            Decoder(options.get("norm", "ln_f"), options.get("decoder_blocks", 0), t)  # refuses a translator with decoder blocks
    options = {**options, "window": window, "stride": int(stride), "translators": translators}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="corpus", dynamic_ncols=True)
    try:
        if client is not None:
            try:
                from . import corpus_dask
            except ImportError as e:
                raise ImportError(f"client= needs Dask ({e}): pip install 'gpt2np[dask]'") from None
            totals = corpus_dask.run(client, model, _counted(texts, model, bar), options)
        else:
            totals = None
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"texts must be strings, got {type(text).__name__}")
                docs = document_stats(model, text, **options)
                if docs is not None:
                    totals = docs if totals is None else [t.merge(d) for t, d in zip(totals, docs)]
                    if bar is not None:
                        bar.update(docs[0].positions)
    finally:
        if bar is not None:
            bar.close()
    if totals is None:
        raise ValueError("the corpus has no tokens: give at least one non-empty text")
    return list(totals)


def check_window(model, window) -> int:
    """Positions per forward pass: ``window``, or the model's context for None; refused outside 1..context."""
    n = model.config.n_positions
    window = n if window is None else window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 1 <= window <= n:
        raise ValueError(f"window={window!r} must be a whole number from 1 to {n} (the model's context)")
    return int(window)


def _counted(texts, model, bar):
    """The texts, the bar advanced by each one's tokens as it is handed out (Dask runs)."""
    for text in texts:
        if bar is not None and isinstance(text, str):
            bar.update(len(model.encode(text)))
        yield text


def document_stats(model, text: str, *, window: int, stride: int, step: int = 1, sublayers: bool = False,
                   norm: str = "ln_f", decoder_blocks: int = 0, include_input: bool = True,
                   translators: tuple = (None,)) -> list[CorpusStats] | None:
    """One text's statistics (``documents=1``), window by window, one per lens of ``translators`` (None:
    the logit lens; each window's trace is read by every lens); None for a text with no tokens."""
    from .api import logit_lens

    ids = model.encode(text)
    docs = None
    for begin, end, first in windows(len(ids), window, stride):
        trace = model.forward(ids[begin:end], sublayers=sublayers)
        back = 1 if first > begin else 0  # the position before: its next token is this window's first new one
        parts = [lens_stats(model, logit_lens(model, trace, k=1, step=step, include_input=include_input,
                                              sublayers=sublayers, start=first - begin - back, norm=norm,
                                              decoder_blocks=decoder_blocks, translator=t), next_only=back)
                 for t in translators]
        docs = parts if docs is None else [d.merge(p) for d, p in zip(docs, parts)]
    if docs is None:
        return None
    return [replace(d, documents=1) for d in docs]


def read_texts(paths):
    """The texts of ``paths``, one at a time: a ``.jsonl`` file gives each line's ``"text"``, a folder its
    ``.txt`` and ``.jsonl`` files (sorted, recursively), any other file its whole UTF-8 text."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from read_texts(sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".jsonl")))
        elif path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {n} is not JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise ValueError(f'{path} line {n} has no "text" field holding a string')
                    yield record["text"]
        else:
            yield path.read_text(encoding="utf-8")
