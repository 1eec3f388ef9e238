"""The tokenizer: cross-checked against transformers' GPT-2 tokenizer, on a vocabulary built here and on
GPT-2's real files (where ../shared/data/gpt2-tokenizer exists), plus the traps of the file formats."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import bpe_files
from gpt2np.tokenizer import EOT, decode, encode, load_tokenizer

TEXTS = [
    "Hello world",
    " Hello world",
    "",
    " ",
    "a",
    "The logit lens reads the residual stream.",
    "Sometimes, when people say plasma, they mean a state of matter.",
    "don't you'll we've they're I'm she'd it's DON'T",
    "   leading spaces, trailing spaces   ",
    "whitespace\t\truns\n\n\nand\r\nnewlines \n  \n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-01",
    "unicode: café naïve Ærøskøbing Straße ÅÄÖ",
    "CJK 中文 日本語 한국어",
    "emoji 🎉🤖👍🏽 family 👨‍👩‍👧",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "mixed\u00a0nbsp and\u200bzero-width",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> again",
    "'s'S 're 'RE'll",
]


def write_bpe(folder: Path, vocab: dict, merges: list[str], *, header=True, final_newline=True, newline="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    text = ("#version: 0.2" + newline if header else "") + newline.join(merges) + (newline if final_newline else "")
    (folder / "merges.txt").write_bytes(text.encode("utf-8"))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 400-token byte-level BPE vocabulary built by the tests (scripts/make_checkpoint.bpe_files)."""
    vocab, merges = bpe_files(400)
    return write_bpe(tmp_path_factory.mktemp("bpe400"), vocab, merges), vocab, merges


def hf_tokenizer(transformers, folder):
    return transformers.GPT2Tokenizer.from_pretrained(str(folder))


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# cross-checks against transformers


def test_matches_transformers_on_built_vocabulary(built, transformers):
    folder, vocab, merges = built
    enc, tok = load_tokenizer(folder), hf_tokenizer(transformers, folder)
    assert enc.n_vocab == len(vocab) == 400
    assert len(merges) == 400 - 257
    for text in TEXTS:
        ids = encode(enc, text)
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert ids.tolist() == hf_ids(tok, text), text
        assert decode(enc, ids) == text
        assert decode(enc, ids) == tok.decode(ids.tolist())
    # the vocabulary is really used: words of the sample text become merged tokens
    assert len(encode(enc, " the the the")) < len(" the the the")


def test_matches_transformers_on_real_files(real_tokenizer_dir, transformers):
    enc, tok = load_tokenizer(real_tokenizer_dir), hf_tokenizer(transformers, real_tokenizer_dir)
    for text in TEXTS:
        assert encode(enc, text).tolist() == hf_ids(tok, text), text


def test_real_files_known_ids(real_tokenizer_dir):
    enc = load_tokenizer(real_tokenizer_dir)
    assert enc.n_vocab == 50257
    assert encode(enc, "Hello world").tolist() == [15496, 995]
    assert encode(enc, " Hello world").tolist() == [18435, 995]
    assert decode(enc, [15496, 995]) == "Hello world"


def test_endoftext_is_special_by_default_and_text_on_request(real_tokenizer_dir):
    enc = load_tokenizer(real_tokenizer_dir)
    assert encode(enc, EOT).tolist() == [50256]
    assert encode(enc, "Hello world" + EOT).tolist() == [15496, 995, 50256]
    as_text = encode(enc, EOT, special=False).tolist()
    assert 50256 not in as_text and len(as_text) > 1
    assert decode(enc, as_text) == EOT


def test_endoftext_on_built_vocabulary(built):
    folder, vocab, _ = built
    enc = load_tokenizer(folder)
    assert encode(enc, EOT).tolist() == [vocab[EOT]] == [399]
    plain = encode(enc, EOT, special=False)
    assert vocab[EOT] not in plain.tolist() and decode(enc, plain) == EOT


def test_model_encode_decode(tiny_model):
    ids = tiny_model.encode("Hello world <|endoftext|>")
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int64
    assert ids[-1] == tiny_model.config.vocab_size - 1
    assert tiny_model.decode(ids) == "Hello world <|endoftext|>"
    assert tiny_model.config.vocab_size - 1 not in tiny_model.encode("<|endoftext|>", special=False).tolist()
    with pytest.raises(TypeError, match="takes a str"):
        tiny_model.encode(b"bytes")


# ---------------------------------------------------------------------------------------------
# traps of the file formats


@pytest.mark.parametrize("header,final_newline,newline", [
    (False, False, "\n"), (False, True, "\n"), (True, False, "\n"), (True, True, "\r\n"), (False, False, "\r\n")])
def test_merges_without_header_or_final_newline_load_identically(built, tmp_path, header, final_newline, newline):
    folder, vocab, merges = built
    variant = write_bpe(tmp_path / "variant", vocab, merges, header=header, final_newline=final_newline,
                        newline=newline)
    a, b = load_tokenizer(folder), load_tokenizer(variant)
    assert b.n_vocab == a.n_vocab
    for text in TEXTS:
        assert encode(b, text).tolist() == encode(a, text).tolist()


def test_real_merges_without_header_or_final_newline(real_tokenizer_dir, tmp_path):
    lines = (real_tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    variant = tmp_path / "variant"
    variant.mkdir()
    (variant / "vocab.json").write_bytes((real_tokenizer_dir / "vocab.json").read_bytes())
    (variant / "merges.txt").write_text("\n".join(lines[1:]), encoding="utf-8")  # no header, no final newline
    enc = load_tokenizer(variant)
    # " t" + "he" are among the first merges: losing one would change these ids
    assert encode(enc, "Hello world, the theory").tolist() == encode(load_tokenizer(real_tokenizer_dir),
                                                                      "Hello world, the theory").tolist()
    assert encode(enc, "Hello world").tolist() == [15496, 995]


def test_edited_files_at_the_same_path_are_read_again(tmp_path, transformers):
    vocab, merges = bpe_files(400)
    folder = write_bpe(tmp_path / "tok", vocab, merges)
    text = "Sometimes, when people say plasma"
    first = load_tokenizer(folder)
    assert first.n_vocab == 400
    vocab2, merges2 = bpe_files(300)  # fewer merges: same path, different content
    write_bpe(folder, vocab2, merges2)
    second = load_tokenizer(folder)
    assert second.n_vocab == 300
    assert encode(second, text).tolist() == hf_ids(hf_tokenizer(transformers, folder), text)
    assert encode(second, text).tolist() != encode(first, text).tolist()


def test_merges_that_disagree_with_vocab_are_a_clear_error(built, tmp_path):
    _, vocab, merges = built
    # a merge whose result vocab.json lacks
    bad = write_bpe(tmp_path / "a", vocab, merges[:-1] + ["q z"])
    with pytest.raises(ValueError, match=r"merge 'q z' makes 'qz', which vocab.json lacks.*do not belong together"):
        load_tokenizer(bad)
    # a truncated merges.txt: vocab.json has tokens no merge makes
    short = write_bpe(tmp_path / "b", vocab, merges[:-10])
    with pytest.raises(ValueError, match=r"disagree.*merges.txt may be truncated"):
        load_tokenizer(short)
    # merges from another vocabulary (same tokens, other order): ids do not follow merge order
    swapped = write_bpe(tmp_path / "c", vocab, [merges[1], merges[0], *merges[2:]])
    with pytest.raises(ValueError, match=rf"merges.txt line 3: merge {re.escape(repr(merges[0]))} makes .* with id 256, "
                       r"not after the previous merge's id 257.*merge order"):
        load_tokenizer(swapped)
    # a merge listed twice
    twice = write_bpe(tmp_path / "d", vocab, merges[:5] + [merges[2]] + merges[5:])
    with pytest.raises(ValueError, match=r"merges.txt line 7: .*disagree on the merge order"):
        load_tokenizer(twice)


def test_malformed_files_are_a_clear_error(built, tmp_path):
    _, vocab, merges = built
    with pytest.raises(ValueError, match=r"merges.txt line 4: expected two tokens"):
        load_tokenizer(write_bpe(tmp_path / "a", vocab, merges[:2] + ["a b c"] + merges[3:]))
    no_byte = {k: v for k, v in vocab.items() if k != "!"}
    with pytest.raises(ValueError, match=r"lacks the byte token '!'"):
        load_tokenizer(write_bpe(tmp_path / "b", no_byte, merges))
    (tmp_path / "b" / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json is not valid JSON"):
        load_tokenizer(tmp_path / "b")
    (tmp_path / "b" / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab.json is missing"):
        load_tokenizer(tmp_path / "b")
