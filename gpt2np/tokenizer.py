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
    """Build the tiktoken Encoding of a checkpoint folder from its vocab.json and merges.txt, or else
    from its tokenizer.json (the same vocabulary and merges, in ``model.vocab`` and ``model.merges``).

    Ranks are rebuilt from the merges (byte tokens first, then one rank per merge, as BPE
    applies them) and must equal the ids in the vocabulary; any disagreement is an error.
    Added tokens (a pad token, say) become special tokens at their ids: see ``added_tokens``.
    """
    folder = Path(folder)
    vocab_path, merges_path, json_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab_path.is_file() and merges_path.is_file():
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_path} is not a JSON object of tokens to ids")
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        # (where, text): the #version header is optional, blank lines are ignored
        merges = [(f"{merges_path} line {n}", ln) for n, ln in enumerate(lines, 1)
                  if ln.strip() and not (n == 1 and ln.startswith("#version"))]
        names = (str(vocab_path), str(merges_path), "vocab.json", "merges.txt")
    elif json_path.is_file():
        vocab, merges = _tokenizer_json(json_path)
        names = (f"{json_path} model.vocab", f"{json_path} model.merges", "model.vocab", "model.merges")
    else:
        p = next(p for p in (vocab_path, merges_path) if not p.is_file())
        raise FileNotFoundError(f"{p} is missing: the tokenizer needs vocab.json and merges.txt, or tokenizer.json")
    ranks = _ranks(vocab, merges, *names)
    added = added_tokens(folder, vocab)
    # <|endoftext|> and the added tokens are matched in the text before BPE, as transformers does
    # (every other token of the vocabulary is one of the ranks: _ranks checks it).
    specials = {t: i for t, i in vocab.items() if t == EOT} | {t: i for t, i in added.items() if t not in vocab}
    return tiktoken.Encoding(name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the merges (as ``(where, "a b")``) of a tokenizer.json, checked to be GPT-2's
    byte-level BPE: anything else would tokenise differently, so it is refused rather than guessed."""
    raw = _read_json(path)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict) \
            or not isinstance(model.get("merges"), list):
        raise ValueError(f"{path} holds no BPE model (model.vocab and model.merges): not a GPT-2 tokenizer.json")
    pre, unlike = raw.get("pre_tokenizer"), []
    if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and pre.get("use_regex", True)):
        unlike.append(f"pre_tokenizer {pre}")
    if raw.get("normalizer") is not None:
        unlike.append(f"normalizer {raw['normalizer']}")
    unlike += [f"model.{k}={model[k]!r}" for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                                     "byte_fallback", "ignore_merges") if model.get(k)]
    if unlike:
        raise ValueError(f"{path} is not GPT-2's byte-level BPE ({unlike[0]}); gpt2np tokenises only the way "
                         "GPT-2 does (ByteLevel pre-tokenizer, no prefix space, no normalizer)")
    merges = []
    for n, m in enumerate(model["merges"]):  # "a b" strings, or [a, b] pairs in newer tokenizers versions
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) and x and " " not in x for x in m):
            m = " ".join(m)
        merges.append((f"{path} model.merges[{n}]", m if isinstance(m, str) else repr(m)))
    return model["vocab"], merges


def _ranks(vocab: dict[str, int], merges: list[tuple[str, str]], vocab_where: str, merges_where: str,
           vocab_name: str, merges_name: str) -> dict[bytes, int]:
    """Byte sequence -> rank of every ordinary token, checked against the vocabulary's ids."""
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
            raise ValueError(f"{vocab_where} lacks the byte token {c!r} (byte {b}): not a GPT-2 byte-level vocabulary")
        ranks[bytes([b])] = vocab[c]
    # BPE applies merges in file order while tiktoken ranks by id: the two agree only when the ids of
    # merged tokens increase down the file (in GPT-2, merge i has id 256 + i).
    previous = -1
    for where, line in merges:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{where}: expected two tokens separated by a space, got {line!r}")
        a, b = parts
        merged = a + b
        if merged not in vocab:
            raise ValueError(f"{where}: merge {line!r} makes {merged!r}, which {vocab_name} lacks; "
                             "the two files do not belong together")
        if vocab[merged] <= previous:
            raise ValueError(f"{where}: merge {line!r} makes {merged!r} with id {vocab[merged]}, "
                             f"not after the previous merge's id {previous}; {vocab_where} and {merges_where} "
                             "disagree on the merge order (GPT-2 numbers merged tokens in merge order)")
        previous = vocab[merged]
        ranks[as_bytes(merged, merges_where)] = vocab[merged]
    ordinary = {as_bytes(t, vocab_where): i for t, i in vocab.items() if t != EOT}
    if ordinary != ranks:
        bad = next((t for t, i in ordinary.items() if ranks.get(t) != i), None)
        raise ValueError(f"{vocab_where} and {merges_where} disagree (first token: {bad!r}); "
                         f"{merges_name} may be truncated or from another vocabulary")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{vocab_where}: merge ranks must be the ids 0..{len(ranks) - 1} in merge order, "
                         "as in GPT-2; this vocabulary orders them differently")
    return ranks


# The special-token names transformers reads from special_tokens_map.json and tokenizer_config.json,
# in the order it gives ids to those missing from the vocabulary (then additional_special_tokens).
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def added_tokens(folder: str | Path, vocab: dict[str, int]) -> dict[str, int]:
    """Text -> id of the tokens added to the vocabulary, as transformers saves them beside it.

    Ids come from tokenizer.json's ``added_tokens``, added_tokens.json and tokenizer_config.json's
    ``added_tokens_decoder``, which must agree with each other and with ``vocab``; a special token
    that special_tokens_map.json or tokenizer_config.json names (``"pad_token": "[PAD]"``) and that
    none of them gives an id is appended after the last id, as transformers does.
    """
    folder = Path(folder)
    by_id: dict[int, tuple[str, Path]] = {}
    words = {i: t for t, i in vocab.items()}

    def add(i, text, entry, path: Path):
        if isinstance(entry, dict):
            flags = [k for k in ("lstrip", "rstrip", "single_word") if entry.get(k)]
            if flags:
                raise ValueError(f"{path}: added token {text!r} has {flags[0]}=true, which gpt2np does not implement; "
                                 "remove the flag or the token")
        if type(i) is not int or i < 0 or not isinstance(text, str) or not text:
            raise ValueError(f"{path}: added token {text!r} with id {i!r} is not a non-empty text with an id >= 0")
        if i in words and words[i] != text:
            raise ValueError(f"{path} gives id {i} to {text!r}, but the vocabulary gives it to {words[i]!r}; "
                             "the tokenizer files do not belong together")
        if i in by_id and by_id[i][0] != text:
            raise ValueError(f"{path} gives id {i} to {text!r}, but {by_id[i][1].name} gives it to {by_id[i][0]!r}; "
                             "the tokenizer files do not belong together")
        known = vocab.get(text, next((j for j, (t, _) in by_id.items() if t == text), i))
        if known != i:
            raise ValueError(f"{path} gives {text!r} the id {i}, but it already has the id {known}; "
                             "the tokenizer files do not belong together")
        by_id[i] = (text, path)

    files = {f: folder / f for f in ("tokenizer.json", "added_tokens.json", "tokenizer_config.json",
                                     "special_tokens_map.json")}
    raw = {f: _read_json(p) for f, p in files.items() if p.is_file()}
    for f, content in raw.items():
        if not isinstance(content, dict):
            raise ValueError(f"{files[f]} is not a JSON object; is it a transformers tokenizer file?")
    for entry in (raw.get("tokenizer.json") or {}).get("added_tokens") or []:
        add(entry.get("id"), entry.get("content"), entry, files["tokenizer.json"])
    for text, i in (raw.get("added_tokens.json") or {}).items():
        add(i, text, None, files["added_tokens.json"])
    for i, entry in (raw.get("tokenizer_config.json") or {}).get("added_tokens_decoder", {}).items():
        add(int(i) if str(i).isdigit() else i, entry.get("content"), entry, files["tokenizer_config.json"])
    added = {t: i for i, (t, _) in sorted(by_id.items())}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        config = raw.get(f) or {}
        named = [config.get(k) for k in SPECIAL_NAMES] + list(config.get("additional_special_tokens") or [])
        for entry in named:
            text = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(text, str) and text and text not in vocab and text not in added:
                add(max([*vocab.values(), *added.values()]) + 1, text, entry, files[f])
                added[text] = max(by_id)
    return added


def encode(enc: tiktoken.Encoding, text: str, *, special: bool = True) -> np.ndarray:
    """Text -> token ids ``[T]`` (int64). ``special=False`` reads ``<|endoftext|>`` as plain text."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids = enc.encode(text, allowed_special="all") if special else enc.encode_ordinary(text)
    return np.asarray(ids, dtype=np.int64)


def decode(enc: tiktoken.Encoding, ids, vocab_size: int | None = None) -> str:
    """Token ids -> text (invalid UTF-8 from split characters is shown as U+FFFD).

    ``vocab_size``: the model's vocabulary (default: the tokenizer's). Its ids that the tokenizer has
    no text for (an unembedding padded past the tokenizer) read ``<id N>``; ids outside it are an error.
    """
    ids = _checked(ids, enc.n_vocab if vocab_size is None else vocab_size)
    try:
        return enc.decode(ids, errors="replace")
    except KeyError:  # an id without text: slower, token by token
        return b"".join(_bytes(enc, i) for i in ids).decode("utf-8", errors="replace")


def token_bytes(enc: tiktoken.Encoding, i: int, vocab_size: int | None = None) -> bytes:
    """One token's bytes (``b"<id N>"`` for an id the tokenizer has no text for)."""
    return _bytes(enc, _checked([i], enc.n_vocab if vocab_size is None else vocab_size)[0])


def token_strings(enc: tiktoken.Encoding, ids, vocab_size: int | None = None) -> list[str]:
    """One display string per token (partial UTF-8 bytes shown as U+FFFD, ``<id N>`` as in ``decode``)."""
    ids = _checked(ids, enc.n_vocab if vocab_size is None else vocab_size)
    return [_bytes(enc, i).decode("utf-8", errors="replace") for i in ids]


def _bytes(enc: tiktoken.Encoding, i: int) -> bytes:
    try:
        return enc.decode_single_token_bytes(i)
    except KeyError:
        return f"<id {i}>".encode()


def _checked(ids, vocab_size: int) -> list[int]:
    """The ids as Python ints, each in [0, vocab_size)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    bad = next((p for p, i in enumerate(ids) if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {ids[bad]} at position {bad} is outside the vocabulary [0, {vocab_size}); "
                         "ids must come from this model's tokenizer or logits")
    return ids
