"""The object users hold: ``gpt2np.load(...)`` returns a ``Model`` with forward, encode and decode."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken

from . import backend, lens, model, tokenizer
from .fast import forward_fast
from . import generate as generation
from .config import Config
from .decoder import Decoder
from .lens_fast import logit_lens_fast
from .result import Lens
from .weights import Params, read_params, resolve, stored_tensors, weights_path


@dataclass(frozen=True)
class Model:
    """A loaded GPT-2: configuration, parameters (NumPy or CuPy arrays) and tokenizer."""

    config: Config
    params: Params
    tokenizer: tiktoken.Encoding
    name: str = "gpt2"
    path: Path | None = None

    @property
    def device(self) -> str:
        """'cpu' when the weights are NumPy arrays, else 'gpu' (CuPy, or a stand-in array namespace)."""
        return "cpu" if backend.is_numpy(self.params.wte) else "gpu"

    def to(self, device: str) -> "Model":
        """Move the weights once to ``'cpu'`` or ``'gpu'`` (CuPy); every computation follows them."""
        if device == self.device:
            return self
        if device == "cpu":
            return replace(self, params=self.params.map(backend.to_numpy))
        xp = backend.device_namespace(device)
        return replace(self, params=self.params.map(xp.asarray))

    def forward(self, ids, *, sublayers: bool = False, patterns: bool = False, heads: bool = False) -> model.Trace:
        """Run the model on one sequence of token ids ``[T]`` and return its ``Trace``.

        Parameters
        ----------
        ids : sequence of int or ndarray, shape (T,), 1 <= T <= n_positions
        sublayers : also keep ``resid_mid``, ``attn_out`` and ``mlp_out`` (each ``[L, T, D]``)
        patterns : also keep the attention probabilities ``pattern`` (``[L, H, T, T]``)
        heads : also keep each head's write into the stream, ``heads`` (``[L, H, T, D]``: L x H x T x D
            float32, 4 bytes each; gpt2 at T = 1024: 0.42 GiB, gpt2-xl: 7.3 GiB), which with ``c_proj``'s bias sums to ``attn_out``

        Examples
        --------
        >>> m = gpt2np.load("gpt2")
        >>> tr = m.forward(m.encode("The logit lens"))
        >>> tr.resid.shape, tr.logits.shape   # (13, 3, 768), (3, 50257)
        """
        ids = model.check_ids(ids, self.config)
        if backend.is_numpy(self.params.wte):  # the same maths, laid out for speed on CPUs: fast.py
            return forward_fast(self.params, self.config, ids, sublayers=sublayers, patterns=patterns, heads=heads)
        xp = backend.namespace(self.params.wte)
        return model.forward(self.params, self.config, xp.asarray(ids), sublayers=sublayers, patterns=patterns,
                             heads=heads)

    __call__ = forward

    def encode(self, text: str, *, special: bool = True) -> np.ndarray:
        """Text -> ids ``[T]``. ``<|endoftext|>`` becomes the special token unless ``special=False``."""
        return tokenizer.encode(self.tokenizer, text, special=special)

    def decode(self, ids) -> str:
        """Ids -> text. Ids of the model with no text in the tokenizer read ``<id N>``; others are an error."""
        return tokenizer.decode(self.tokenizer, ids, self.config.vocab_size)

    def tokens(self, ids) -> list[str]:
        """One display string per id (``<id N>`` as in ``decode``)."""
        return tokenizer.token_strings(self.tokenizer, ids, self.config.vocab_size)

    def generate(self, ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_at_eot: bool = False) -> np.ndarray:
        """Continue ``ids`` by up to ``max_new_tokens`` tokens with a KV cache; return the new tokens ``[N]``.

        ``temperature=0`` is greedy; sampling applies top-k, then top-p, and is reproducible with ``seed``.
        The prompt and the new tokens must fit in the context: ``len(ids) + max_new_tokens <= n_positions``.
        ``stop_at_eot`` stops after ``<|endoftext|>`` (kept in the result). See ``gpt2np.generate.generate``.

        Examples
        --------
        >>> m = gpt2np.load("gpt2")
        >>> m.decode(m.generate(m.encode("The logit lens"), 20, temperature=0))
        """
        ids = model.check_ids(ids, self.config)
        return generation.generate(self.params, self.config, ids, max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, stop_at_eot=stop_at_eot,
                                   eot_id=self.tokenizer.eot_token)

    def stream(self, ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_at_eot: bool = False):
        """Like ``generate``, but yield each new token (an int) as soon as it is chosen.

        The arguments are checked when this is called, before the first token.

        Examples
        --------
        >>> for t in m.stream(m.encode("Hello"), 10, seed=0):
        ...     print(m.decode([t]), end="", flush=True)
        """
        ids = model.check_ids(ids, self.config)
        return generation.stream(self.params, self.config, ids, max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop_at_eot=stop_at_eot,
                                 eot_id=self.tokenizer.eot_token)

    def score(self, ids) -> np.ndarray:
        """Log-probability (float64, natural log) of each token after the first, ``[T-1]``.

        ``gpt2np.generate.perplexity(m.score(ids))`` gives the mean cross-entropy and the perplexity.
        """
        ids = model.check_ids(ids, self.config)
        xp = backend.namespace(self.params.wte)
        return generation.score(self.params, self.config, xp.asarray(ids))


def load(name_or_path: str | Path = "gpt2", *, weights_dir: str | Path | None = None, offline: bool | None = None,
         device: str = "cpu") -> Model:
    """Load a GPT-2 checkpoint by name (downloading it into ``weights/`` if missing) or from a folder.

    Parameters
    ----------
    name_or_path : ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (or ``openai-community/...``),
        or a folder holding config.json, model.safetensors (or the shards of model.safetensors.index.json),
        vocab.json and merges.txt (or tokenizer.json).
    weights_dir : where named checkpoints live (default ``$GPT2NP_WEIGHTS`` or ``./weights``).
    offline : never download; a missing checkpoint is an immediate error (default: ``$GPT2NP_OFFLINE``).
    device : ``'cpu'`` (NumPy) or ``'gpu'`` (CuPy, moved once after loading).
    """
    xp = backend.device_namespace(device)  # fail early if the GPU is not usable
    folder = resolve(name_or_path, root=weights_dir, offline=offline)
    config, enc = _config_and_tokenizer(folder)
    params = read_params(weights_path(folder), config)
    m = Model(config, params, enc, name=folder.name, path=folder)
    return m if xp is np else m.to(device)


def check_folder(path: str | Path) -> Config:
    """Every check ``load`` makes on a checkpoint folder, without reading tensor data; its Config.

    Files, config.json, the tokenizer, the safetensors headers (or the index and its shards), tensor
    names, shapes and dtypes: whatever would make ``load`` fail raises the same error here.
    """
    folder = resolve(path, download_missing=False)
    config, _ = _config_and_tokenizer(folder)
    stored_tensors(weights_path(folder), config)
    return config


def _config_and_tokenizer(folder: Path) -> tuple[Config, tiktoken.Encoding]:
    """config.json and the tokenizer, which may have fewer tokens than the model (a padded vocabulary)."""
    config = Config.from_json(folder / "config.json")
    enc = tokenizer.load_tokenizer(folder, name=folder.name)
    if enc.n_vocab > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {enc.n_vocab} tokens but config.json says vocab_size="
                         f"{config.vocab_size}; the files do not belong together")
    return config, enc


def logit_lens(model: Model, trace, *, k: int = 5, step: int = 1, include_input: bool = True,
               sublayers: bool = False, start: int = 0, end: int | None = None, norm: str = "ln_f",
               decoder_blocks: int = 0, decoder: Decoder | None = None, translator=None,
               chunk: int = lens.CHUNK, threads: int | None = None, progress: bool = False) -> Lens:
    """The logit lens of ``trace``: every shown row read through the decoder, reduced to the lens quantities.

    The definition is ``gpt2np.lens.logit_lens``, a plain loop over the rows; this gives the same
    ``Lens``, computed by ``gpt2np.lens_fast`` when the arrays are NumPy (the same quantities arranged
    for speed on CPUs, tested equal to the loop) and by the loop itself otherwise (CuPy, any array API).

    Parameters
    ----------
    model, trace : the ``Model`` and its ``model.forward(ids)`` (``sublayers=True`` for sub-rows)
    k : top tokens kept per cell
    step : keep every step-th block row, counting back from the last shown block (always kept)
    include_input : include the embedding row ``input``
    sublayers : add the ``l.attn`` row (stream after block l's attention) for every kept block
    start, end : the position window ``[start, end)``; the model still read the whole prefix
    norm : ``"ln_f"`` (default), ``"norm"`` (the post's figures) or ``"raw"``
    decoder_blocks : run the last blocks inside the decoder for every shown row
    translator : a ``gpt2np.tuned.TunedLens`` (``TunedLens.load``, ``tuned.fit``, ``tuned.read_published``):
        each row it translates is mapped ``h -> h + h @ A.T + b`` before the normalisation (the tuned lens)
    decoder : a ``gpt2np.decoder.Decoder`` instead of ``norm``, ``decoder_blocks`` and ``translator``
    chunk : positions per matrix product (bounds the memory)
    threads : NumPy only: threads for the products and reductions (default: the usable cores, at most 2)
    progress : a progress bar on standard error (time left); silent by default

    Examples
    --------
    >>> m = gpt2np.load("gpt2")
    >>> lens = gpt2np.logit_lens(m, m.forward(m.encode("The logit lens")), k=3)
    >>> lens.top_tokens[-1, :, 0]      # the final row's top-1 token at each position
    """
    options = dict(k=k, step=step, include_input=include_input, sublayers=sublayers, start=start, end=end,
                   norm=norm, decoder_blocks=decoder_blocks, decoder=decoder, translator=translator, chunk=chunk,
                   progress=progress)
    if backend.is_numpy(trace.resid) and backend.is_numpy(model.params.wte):
        return logit_lens_fast(model, trace, threads=threads, **options)
    return lens.logit_lens(model, trace, **options)
