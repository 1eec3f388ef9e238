"""GPT-2's byte-level BPE tokenizer, built as a tiktoken ``Encoding`` from a checkpoint's own files.

We parse ``vocab.json`` and ``merges.txt`` ourselves instead of calling
``tiktoken.load.data_gym_to_mergeable_bpe_ranks``: that loader drops the first line of
merges.txt unconditionally (losing a merge when the ``#version`` header is absent) and caches
files by path (an edited file would be served stale). Here every load reads the files again.

``<|endoftext|>`` inside user text: by default it becomes the special token (id 50256 in GPT-2),
as in transformers, so ids match the reference; pass ``special=False`` to read it as plain text.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (OpenAI's encoder.py), as tiktoken's "gpt2" encoding uses it.
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (OpenAI's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_tokenizer(folder: str | Path, name: str = "gpt2") -> tiktoken.Encoding:
    """Build the tiktoken Encoding of a checkpoint folder from its vocab.json and merges.txt.

    Ranks are rebuilt from the merges (byte tokens first, then one rank per merge, as BPE
    applies them) and must equal the ids in vocab.json; any disagreement is an error.
    """
    folder = Path(folder)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: the tokenizer needs vocab.json and merges.txt")
    try:
        vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{vocab_path} is not valid JSON ({e})") from None
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    # (line number in the file, text): the #version header is optional, blank lines are ignored
    merges = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip() and not (n == 1 and ln.startswith("#version"))]

    to_byte = {c: b for b, c in byte_to_unicode().items()}

    def as_bytes(token: str, where: str) -> bytes:
        try:
            return bytes(to_byte[c] for c in token)
        except KeyError as e:
            raise ValueError(f"{where}: {token!r} has a character {e.args[0]!r} outside GPT-2's byte alphabet") from None

    # Ranks as BPE applies them: the 256 single bytes in bytes_to_unicode order, then each merge.
    ranks: dict[bytes, int] = {}
    for b, c in byte_to_unicode().items():
        if c not in vocab:
            raise ValueError(f"{vocab_path} lacks the byte token {c!r} (byte {b}): not a GPT-2 byte-level vocabulary")
        ranks[bytes([b])] = vocab[c]
    # BPE applies merges in file order while tiktoken ranks by id: the two agree only when the ids of
    # merged tokens increase down the file (in GPT-2, merge i has id 256 + i).
    previous = -1
    for n, line in merges:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{merges_path} line {n}: expected two tokens separated by a space, got {line!r}")
        a, b = parts
        merged = a + b
        if merged not in vocab:
            raise ValueError(f"{merges_path} line {n}: merge {line!r} makes {merged!r}, which vocab.json lacks; "
                             "the two files do not belong together")
        if vocab[merged] <= previous:
            raise ValueError(f"{merges_path} line {n}: merge {line!r} makes {merged!r} with id {vocab[merged]}, "
                             f"not after the previous merge's id {previous}; {vocab_path} and {merges_path} "
                             "disagree on the merge order (GPT-2 numbers merged tokens in merge order)")
        previous = vocab[merged]
        ranks[as_bytes(merged, str(merges_path))] = vocab[merged]
    specials = {t: i for t, i in vocab.items() if t == EOT}
    ordinary = {as_bytes(t, str(vocab_path)): i for t, i in vocab.items() if t not in specials}
    if ordinary != ranks:
        bad = next((t for t, i in ordinary.items() if ranks.get(t) != i), None)
        raise ValueError(f"{vocab_path} and {merges_path} disagree (first token: {bad!r}); "
                         "merges.txt may be truncated or from another vocabulary")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{vocab_path}: merge ranks must be the ids 0..{len(ranks) - 1} in merge order, "
                         "as in GPT-2; this vocabulary orders them differently")
    return tiktoken.Encoding(name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials,
                             explicit_n_vocab=len(ranks) + len(specials))


def encode(enc: tiktoken.Encoding, text: str, *, special: bool = True) -> np.ndarray:
    """Text -> token ids ``[T]`` (int64). ``special=False`` reads ``<|endoftext|>`` as plain text."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids = enc.encode(text, allowed_special="all") if special else enc.encode_ordinary(text)
    return np.asarray(ids, dtype=np.int64)


def decode(enc: tiktoken.Encoding, ids) -> str:
    """Token ids -> text (invalid UTF-8 from split characters is shown as U+FFFD)."""
    return enc.decode([int(i) for i in np.asarray(ids).reshape(-1)], errors="replace")


def token_strings(enc: tiktoken.Encoding, ids) -> list[str]:
    """One display string per token (partial UTF-8 bytes shown as U+FFFD)."""
    return [enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace") for i in np.asarray(ids).reshape(-1)]
