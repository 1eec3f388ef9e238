"""The tokenizer: cross-checked against transformers' GPT-2 tokenizer, on a vocabulary built here and on
GPT-2's real files (where ../shared/data/gpt2-tokenizer exists), plus the traps of the file formats."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpt2np
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


# ---------------------------------------------------------------------------------------------
# tokenizer.json alone (what transformers 5 saves), and tokens added to the vocabulary

MORE_TEXTS = TEXTS + ["x" * 300, "1234567890" * 5, "\n\n\n", " \n \t", "naïve\u0301 e\u0301", "[PAD]", "a[PAD]b [PAD] "]


def saved_by_transformers(transformers, source: Path, folder: Path, **added) -> Path:
    """``GPT2Tokenizer.from_pretrained(source)`` (+ ``add_special_tokens(added)``) saved into ``folder``."""
    tok = hf_tokenizer(transformers, source)
    if added:
        tok.add_special_tokens(added)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def real_tokenizer_json(real_tokenizer_dir, transformers, tmp_path_factory):
    folder = saved_by_transformers(transformers, real_tokenizer_dir, tmp_path_factory.mktemp("tokenizer-json"))
    assert (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").exists()
    return folder


def pairs_as_strings(folder: Path, out: Path) -> Path:
    """The same tokenizer.json with its merges written as "a b" strings (older tokenizers versions)."""
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(isinstance(m, list) for m in raw["model"]["merges"])  # tokenizers 0.2x writes pairs
    raw["model"]["merges"] = [" ".join(m) for m in raw["model"]["merges"]]
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return out


def test_tokenizer_json_alone_matches_transformers(real_tokenizer_json, real_tokenizer_dir, transformers, tmp_path):
    tok = hf_tokenizer(transformers, real_tokenizer_json)
    for folder in (real_tokenizer_json, pairs_as_strings(real_tokenizer_json, tmp_path / "strings")):
        enc = load_tokenizer(folder)
        assert enc.n_vocab == 50257
        for text in MORE_TEXTS:
            ids = encode(enc, text)
            assert ids.tolist() == hf_ids(tok, text), text
            assert decode(enc, ids) == tok.decode(ids.tolist()), text
        assert encode(enc, "Hello world").tolist() == [15496, 995]
    # the same ranks as vocab.json and merges.txt
    assert load_tokenizer(real_tokenizer_json)._mergeable_ranks == load_tokenizer(real_tokenizer_dir)._mergeable_ranks


def test_model_with_tokenizer_json_alone(make_checkpoint, copy_checkpoint, transformers, tmp_path):
    folder = copy_checkpoint(make_checkpoint())
    saved_by_transformers(transformers, folder, tmp_path / "tok")
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    shutil.copyfile(tmp_path / "tok" / "tokenizer.json", folder / "tokenizer.json")
    m = gpt2np.load(folder)
    tok = hf_tokenizer(transformers, tmp_path / "tok")
    for text in TEXTS:
        assert m.encode(text).tolist() == hf_ids(tok, text), text


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["pre_tokenizer"].update(add_prefix_space=True), r"is not GPT-2's byte-level BPE \(pre_tokenizer "),
    (lambda t: t.update(normalizer={"type": "NFC"}), r"is not GPT-2's byte-level BPE \(normalizer "),
    (lambda t: t["model"].update(type="WordPiece"), r"holds no BPE model"),
    (lambda t: t["model"]["merges"].insert(2, ["a", "b", "c"]), r"tokenizer.json model.merges\[2\]: expected two "
                                                               r"tokens separated by a space, got \"\['a', 'b', 'c'\]\""),
    (lambda t: t["model"]["merges"].insert(3, "q z"), r"model.merges\[3\]: merge 'q z' makes 'qz', which model.vocab "
                                                      r"lacks"),
    (lambda t: t["model"]["merges"].pop(), r"model.vocab and .*model.merges disagree .*model.merges may be truncated"),
])
def test_tokenizer_json_that_is_not_gpt2s(built, transformers, tmp_path, edit, message):
    folder = saved_by_transformers(transformers, built[0], tmp_path / "tok")
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(raw)
    (folder / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_tokenizer(folder)


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab.json is missing: the tokenizer needs vocab.json and merges.txt, "
                                                r"or tokenizer.json"):
        load_tokenizer(tmp_path)


def check_against(tok, enc, n_vocab: int):
    assert enc.n_vocab == n_vocab == len(tok)
    for text in MORE_TEXTS + ["[PAD][CLS]<x> [MASK]<y>", "<|endoftext|>[PAD]"]:
        ids = encode(enc, text)
        assert ids.tolist() == hf_ids(tok, text), text
        assert decode(enc, ids) == tok.decode(ids.tolist()), text
    added = list(range(50257, n_vocab))
    assert [decode(enc, [i]) for i in added] == tok.convert_ids_to_tokens(added)


def test_added_pad_token_as_transformers_5_saves_it(real_tokenizer_dir, transformers, tmp_path):
    """tokenizer.json with [PAD] in its added_tokens, tokenizer_config.json naming it as pad_token."""
    folder = saved_by_transformers(transformers, real_tokenizer_dir, tmp_path / "tok", pad_token="[PAD]")
    assert json.loads((folder / "tokenizer_config.json").read_text())["pad_token"] == "[PAD]"
    enc = load_tokenizer(folder)
    check_against(hf_tokenizer(transformers, folder), enc, 50258)
    assert encode(enc, "a[PAD]b").tolist() == [64, 50257, 65]
    assert 50257 not in encode(enc, "a[PAD]b", special=False).tolist()


def v4_folder(real_tokenizer_dir: Path, folder: Path, added: dict, special_map: dict, decoder: bool) -> Path:
    """The files transformers 4 saves for GPT2Tokenizer after add_special_tokens: vocab.json, merges.txt,
    added_tokens.json, special_tokens_map.json, tokenizer_config.json (with added_tokens_decoder)."""
    folder.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(real_tokenizer_dir / f, folder / f)
    if added:
        (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
              "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    if decoder:
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config["added_tokens_decoder"] = {str(i): {"content": t, **entry} for t, i in
                                          {"<|endoftext|>": 50256, **added}.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_added_tokens_as_transformers_4_saves_them(real_tokenizer_dir, transformers, tmp_path):
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": {"content": "[PAD]", "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False}}
    for n, decoder in enumerate((True, False)):
        folder = v4_folder(real_tokenizer_dir, tmp_path / f"v4-{n}", {"[PAD]": 50257}, special, decoder)
        check_against(hf_tokenizer(transformers, folder), load_tokenizer(folder), 50258)


def test_special_tokens_named_without_an_id_follow_transformers(real_tokenizer_dir, transformers, tmp_path):
    special = {"mask_token": "[MASK]", "additional_special_tokens": ["<x>", "<y>"], "pad_token": "[PAD]",
               "cls_token": {"content": "[CLS]"}, "eos_token": "<|endoftext|>"}
    folder = v4_folder(real_tokenizer_dir, tmp_path / "named", {}, special, decoder=False)
    enc = load_tokenizer(folder)
    check_against(hf_tokenizer(transformers, folder), enc, 50262)


def test_added_tokens_that_disagree(real_tokenizer_dir, tmp_path):
    folder = v4_folder(real_tokenizer_dir, tmp_path / "a", {"[PAD]": 50257}, {}, decoder=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["50257"]["content"] = "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config.json gives id 50257 to '<pad>', but added_tokens.json gives "
                                         r"it to '\[PAD\]'; the tokenizer files do not belong together"):
        load_tokenizer(folder)
    folder = v4_folder(real_tokenizer_dir, tmp_path / "b", {"hello": 50257}, {}, decoder=False)
    with pytest.raises(ValueError, match=r"added_tokens.json gives 'hello' the id 50257, but it already has the id 31373"):
        load_tokenizer(folder)
    folder = v4_folder(real_tokenizer_dir, tmp_path / "c", {"[PAD]": 100}, {}, decoder=False)
    with pytest.raises(ValueError, match=r"added_tokens.json gives id 100 to '\[PAD\]', but the vocabulary gives it to"):
        load_tokenizer(folder)
