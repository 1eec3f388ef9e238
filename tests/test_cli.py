"""The command line, through ``gpt2np.cli.main([...])`` with captured output, on tiny random checkpoints
passed as ``--model PATH``. Every user error must exit with status 2 and one line on standard error;
``download`` runs against a fake ``huggingface_hub.snapshot_download`` (never the network).
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2np
from gpt2np import cli
from gpt2np.generate import perplexity
from gpt2np.lens import Lens
from gpt2np.plot import visible
from gpt2np.weights import DOWNLOAD_PATTERNS, FILES, HUB_PREFIX

TEXT = "When people say plasma,\nthey mean blood. Other times"  # 32 tokens in the tiny vocabulary
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Tables fit in one block unless a test narrows the terminal; no developer settings leak in."""
    monkeypatch.setenv("COLUMNS", "2000")
    for var in ("GPT2NP_WEIGHTS", "GPT2NP_OFFLINE", "GPT2NP_REVISION"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return str(make_checkpoint())


@pytest.fixture(scope="module")
def model(ckpt):
    return gpt2np.load(ckpt)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(out: str) -> dict[str, list[str]]:
    """Label -> cells of the first table in ``out`` (cells are separated by two or more spaces)."""
    rows = {}
    for line in out.split("\n\n")[1].splitlines():
        label, *cells = [c for c in line.strip().split("  ") if c]
        rows[label.strip()] = [c.strip() for c in cells]
    return rows


# -------------------------------------------------------------------------------------------------
# lens and plot


def test_lens_prints_the_table_of_top1_tokens(capsys, ckpt, model):
    code, out, err = run(capsys, "lens", TEXT, "--model", ckpt, "--start", 3, "--end", 11)
    assert code == 0 and err == ""
    ids = model.encode(TEXT)
    lens = gpt2np.logit_lens(model, model.forward(ids), start=3, end=11)
    lines = out.split("\n\n")[1].splitlines()
    labels = [ln.split()[0] for ln in lines]
    assert labels == ["next", "2", "1", "0", "input", "token", "pos"]  # as in the figure: last block on top
    rows = table_rows(out)
    for r, label in enumerate(lens.rows):
        assert rows[label] == [visible(t, cli.CELL) for t in lens.top_tokens[r, :, 0]]
    assert rows["token"] == [visible(t, cli.CELL) for t in model.tokens(ids[3:11])]
    assert rows["pos"] == [str(p) for p in range(3, 11)]
    assert "positions 3..10 of" in out


def test_lens_table_wraps_to_the_terminal(capsys, ckpt, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    code, out, _ = run(capsys, "lens", TEXT, "--model", ckpt)
    assert code == 0
    blocks = out.split("\n\n")[1:]
    assert len(blocks) > 3
    positions = [int(p) for b in blocks for p in b.splitlines()[-1].split()[1:]]
    assert positions == list(range(len(gpt2np.load(ckpt).encode(TEXT))))
    assert max(len(ln) for b in blocks for ln in b.splitlines() if len(ln.split()) > 2) <= 40


def test_a_long_window_wraps_into_blocks_that_fit_80_columns(capsys, make_checkpoint, monkeypatch, tmp_path):
    """1,000 positions, COLUMNS=80: every line fits (the heading too), and the blocks hold every position
    once, in order, each block every row."""
    monkeypatch.setenv("COLUMNS", "80")
    ckpt = make_checkpoint(n_positions=3000)
    model = gpt2np.load(ckpt)
    text = model.decode((np.arange(1200) * 7 % 397).tolist())
    assert len(model.encode(text)) >= 1000
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    for view in ((), ("--view", "kl")):
        code, out, err = run(capsys, "lens", "--file", tmp_path / "t.txt", "--model", ckpt, "--end", 1000, *view)
        assert code == 0 and err == ""
        assert max(cli._width(line) for line in out.splitlines()) <= 80
        assert max(len(line) for line in out.splitlines()) <= 80
        blocks = [b.splitlines() for b in out.split("\n\n") if b.splitlines()[-1].lstrip().startswith("pos ")]
        assert len(blocks) >= 1000 // 20 and all(len(b) == 3 + 4 for b in blocks)  # next, 4 rows, token, pos
        positions = [int(p) for b in blocks for p in b[-1].split()[1:]]
        assert positions == list(range(1000)) * (1 + len(view) // 2)  # the tokens' table, then the view's


def test_lens_view_without_out_prints_the_numbers(capsys, ckpt, model):
    code, out, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--start", -4, "--view", "ranks", "--view", "next-rank")
    assert code == 0
    tables = out.split("\n\n")
    assert "rank of the final top-1 token" in out and "rank of the true next token" in out
    lens = gpt2np.logit_lens(model, model.forward(model.encode(TEXT)), start=len(model.encode(TEXT)) - 4)
    ranks = {ln.split()[0]: ln.split()[1:] for ln in tables[3].splitlines()}
    assert ranks["input"] == [str(v) for v in lens.final_rank[0]]
    nxt = {ln.split()[0]: ln.split()[1:] for ln in tables[5].splitlines()}
    assert nxt["2"][-1] == "-"  # the last position has no next token


def test_lens_writes_figures(capsys, ckpt, tmp_path):
    out = tmp_path / "kl.png"
    code, stdout, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--view", "kl", "--out", out, "--start", 2, "--end", 9)
    assert code == 0 and stdout == f"wrote {out}\n"
    assert out.read_bytes()[:8] == PNG_MAGIC
    # several views: one grid figure; with {view} in the name: one file per view
    code, _, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--view", "kl", "--view", "ranks", "--out", tmp_path / "g.svg",
                   "--end", 6)
    assert code == 0 and (tmp_path / "g.svg").stat().st_size > 0
    pattern = str(tmp_path / "v-{view}.pdf")
    code, stdout, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--view", "kl-input", "--view", "input-rank",
                          "--out", pattern, "--sublayers", "--no-input", "--step", 2, "--norm", "norm", "--start", -5)
    assert code == 0
    for v in ("kl-input", "input-rank"):
        assert (tmp_path / f"v-{v}.pdf").read_bytes()[:5] == b"%PDF-" and f"v-{v}.pdf" in stdout


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_save_then_plot(capsys, ckpt, model, tmp_path, suffix):
    saved = tmp_path / f"lens{suffix}"
    code, out, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--save", saved, "--start", 4, "--end", 12,
                       "--sublayers", "--top-k", 3, "--norm", "norm", "--decoder-blocks", 1)
    assert code == 0 and out.startswith(f"wrote {saved}\n")
    table = out.split("\n", 1)[1]
    lens = Lens.load(saved)
    want = gpt2np.logit_lens(model, model.forward(model.encode(TEXT), sublayers=True), start=4, end=12, k=3,
                             sublayers=True, norm="norm", decoder_blocks=1)
    assert lens.rows == want.rows == ("input", "0.attn", "0", "1.attn", "1")
    np.testing.assert_array_equal(lens.top_ids, want.top_ids)
    code, out, _ = run(capsys, "plot", saved)  # no --out: the same table
    assert code == 0 and out == table
    png = tmp_path / "p.png"
    code, out, _ = run(capsys, "plot", saved, "--view", "ranks", "--out", png, "--vmax", 50, "--title", "t")
    assert code == 0 and png.read_bytes()[:8] == PNG_MAGIC


def test_text_from_stdin_and_file(capsys, ckpt, tmp_path, monkeypatch):
    code, direct, _ = run(capsys, "lens", TEXT, "--model", ckpt)
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT + "\n"))  # the final newline is dropped
    code, piped, _ = run(capsys, "lens", "-", "--model", ckpt)
    assert code == 0 and piped == direct
    f = tmp_path / "t.txt"
    f.write_text(TEXT + "\n", encoding="utf-8")
    code, filed, _ = run(capsys, "lens", "--file", f, "--model", ckpt)
    assert code == 0 and filed == direct


# -------------------------------------------------------------------------------------------------
# generate and score


def test_generate_is_reproducible_with_a_seed(capsys, ckpt, model):
    args = ("generate", TEXT, "--model", ckpt, "--max-new-tokens", 12, "--seed", 3, "--top-k", 50)
    code, a, _ = run(capsys, *args)
    code2, b, _ = run(capsys, *args)
    assert code == code2 == 0 and a == b
    new = model.generate(model.encode(TEXT), 12, seed=3, top_k=50)
    assert a == TEXT + model.decode(new) + "\n"
    code, c, _ = run(capsys, *args[:-4], "--seed", 4, "--no-prompt")
    assert code == 0 and not c.startswith(TEXT[:10])


def test_generate_greedy_and_streaming(ckpt, model, monkeypatch):
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self):
            self.flushes += 1

    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["generate", TEXT, "--model", ckpt, "--max-new-tokens", "8", "--temperature", "0",
                     "--no-prompt"]) == 0
    greedy = model.generate(model.encode(TEXT), 8, temperature=0)
    assert out.getvalue() == model.decode(greedy) + "\n"
    assert out.flushes >= 8  # one flush per token at least: the text appears as it comes


def test_generate_lens_out(capsys, ckpt, model, tmp_path):
    """--lens-out streams the same text and saves the lens of the generated window, drawable by plot."""
    from gpt2np import Lens, logit_lens

    path = tmp_path / "gen.npz"
    args = ("generate", TEXT, "--model", ckpt, "--max-new-tokens", 6, "--seed", 2, "--no-prompt")
    code, plain, _ = run(capsys, *args)
    code2, recorded, err = run(capsys, *args, "--lens-out", path, "--sublayers", "--step", 2)
    assert code == code2 == 0 and plain == recorded and "saved to" in err
    lens = Lens.load(path)
    ids = model.encode(TEXT)
    new = model.generate(ids, 6, seed=2)
    assert lens.next_ids.tolist() == new.tolist() and (lens.start, lens.end) == (len(ids) - 1, len(ids) + 5)
    full = np.concatenate([ids, new])
    ref = logit_lens(model, model.forward(full, sublayers=True), sublayers=True, step=2, start=lens.start,
                     end=lens.end)
    assert lens.rows == ref.rows and np.array_equal(lens.top_ids, ref.top_ids)
    code, _, err = run(capsys, "plot", path, "--view", "kl", "--out", tmp_path / "gen.png")
    assert code == 0 and (tmp_path / "gen.png").stat().st_size > 0
    code, _, err = run(capsys, *args, "--lens-out", tmp_path / "gen.txt")
    assert code == 2 and "--lens-out" in err and "unsupported file type" in err


def test_generate_holds_back_split_utf8(model):
    """A character split across two tokens is printed once both halves arrived, never as U+FFFD."""
    byte = {b: i for i in range(256) if len(b := model.tokenizer.decode_single_token_bytes(i)) == 1}
    ids = [byte[bytes([b])] for b in "é!".encode()]
    out = io.StringIO()
    assert cli._write_stream(model, iter(ids), out) == ids
    assert out.getvalue() == "é!"


def test_score_table_and_json(capsys, ckpt, model):
    ids = model.encode(TEXT)
    logp = model.score(ids)
    xent, ppl = perplexity(logp)
    code, out, _ = run(capsys, "score", TEXT, "--model", ckpt)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["pos", "token", "logprob", "prob"]
    assert len(lines) == len(ids) + 2
    assert lines[1].split()[-2:] == ["-", "-"]
    assert float(lines[2].split()[-2]) == pytest.approx(logp[0], abs=1e-3)
    assert f"{xent:.4f}" in lines[-1] and f"{ppl:.2f}" in lines[-1]
    code, out, _ = run(capsys, "score", TEXT, "--model", ckpt, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["n_tokens"] == len(ids) and data["n_scored"] == len(ids) - 1
    assert [t["id"] for t in data["tokens"]] == ids.tolist()
    assert data["tokens"][0]["logprob"] is None
    np.testing.assert_allclose([t["logprob"] for t in data["tokens"][1:]], logp)
    assert data["mean_cross_entropy"] == pytest.approx(xent) and data["perplexity"] == pytest.approx(ppl)


# -------------------------------------------------------------------------------------------------
# info and download


def test_info_of_a_folder(capsys, ckpt, model):
    code, out, _ = run(capsys, "info", ckpt)
    assert code == 0
    assert "n_layer=3  n_head=3  n_embd=48" in out and "n_positions=64  vocab_size=400" in out
    assert f"{model.config.n_params:,}" in out and "[complete]" in out
    for f in FILES:
        size = (model.path / f).stat().st_size
        assert any(f in ln and f"  {size:,} B" in ln for ln in out.splitlines()), f


def test_info_of_a_name_not_downloaded(capsys, tmp_path):
    code, out, _ = run(capsys, "info", "gpt2-xl", "--weights-dir", tmp_path)
    assert code == 0
    assert "n_layer=48" in out and "1,557,611,200" in out and "not downloaded" in out
    assert f"gpt2np download gpt2-xl --weights-dir {tmp_path}" in out


@pytest.fixture
def fake_hub(monkeypatch, ckpt):
    """``huggingface_hub.snapshot_download`` replaced by a copy of the tiny checkpoint's files."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, *, local_dir, allow_patterns, revision=None, **kw):
        calls.append({"repo_id": repo_id, "allow_patterns": list(allow_patterns), "revision": revision})
        for f in os.listdir(ckpt):  # the files the patterns match, as the real one fetches them
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copyfile(f"{ckpt}/{f}", f"{local_dir}/{f}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_uses_the_hub_and_skips_complete_folders(capsys, tmp_path, fake_hub):
    code, out, _ = run(capsys, "download", "gpt2", "openai-community/gpt2-medium", "--weights-dir", tmp_path,
                       "--revision", "abc")
    assert code == 0
    assert [c["repo_id"] for c in fake_hub] == [HUB_PREFIX + "gpt2", HUB_PREFIX + "gpt2-medium"]
    assert all(sorted(c["allow_patterns"]) == sorted(DOWNLOAD_PATTERNS) and c["revision"] == "abc" for c in fake_hub)
    assert all((tmp_path / n / f).is_file() for n in ("gpt2", "gpt2-medium") for f in FILES)
    assert "gpt2: done" in out
    code, out, _ = run(capsys, "download", "gpt2", "--weights-dir", tmp_path)
    assert code == 0 and "already complete" in out and len(fake_hub) == 2
    code, out, _ = run(capsys, "download", "gpt2", "--weights-dir", tmp_path, "--force")
    assert code == 0 and len(fake_hub) == 3
    # the downloaded folder is usable by name
    code, out, _ = run(capsys, "info", "gpt2", "--weights-dir", tmp_path)
    assert code == 0 and "[complete]" in out


def test_download_failure_is_one_line(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, out, err = run(capsys, "download", "gpt2", "--weights-dir", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("gpt2np: error: downloading gpt2 into") and "network is unreachable" in err


# -------------------------------------------------------------------------------------------------
# Errors


def _errors(ckpt, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    m = ("--model", ckpt)
    return [
        (("lens", "hi", "--model", "gpt9"), "neither a checkpoint folder nor a known model name"),
        (("lens", "hi", "--model", tmp_path / "nowhere"), "neither a checkpoint folder"),
        (("lens", "hi", "--model", "gpt2", "--offline", "--weights-dir", tmp_path), "downloads are off"),
        (("lens", "--file", tmp_path / "missing.txt", *m), "cannot read"),
        (("lens", "--file", bad, *m), "not UTF-8"),
        (("lens", "--file", empty, *m), "the text is empty"),
        (("lens", "", *m), "the text is empty"),
        (("lens", *m), "no text"),
        (("lens", "hi", "--file", bad, *m), "not both"),
        (("lens", "a b " * 40, *m), "tokens long, more than the 64-position context"),
        (("lens", TEXT, "--start", 5, "--end", 3, *m), "bad window --start 5 --end 3"),
        (("lens", TEXT, "--start", 40, *m), "bad window --start 40"),
        (("lens", TEXT, "--end", 0, *m), "bad window"),
        (("lens", TEXT, "--end", 99, *m), "bad window"),
        (("lens", TEXT, "--view", "kl-final", *m), "invalid choice: 'kl-final'"),
        (("lens", TEXT, "--norm", "layer", *m), "invalid choice: 'layer'"),
        (("lens", TEXT, "--step", 0, *m), "must be at least 1"),
        (("lens", TEXT, "--top-k", "x", *m), "not a whole number"),
        (("lens", TEXT, "--decoder-blocks", 4, *m), "--decoder-blocks 4 leaves no row"),
        (("lens", TEXT, "--decoder-blocks", 3, "--no-input", *m), "--no-input drops the input row"),
        (("lens", TEXT, "--out", tmp_path / "x.jpg", *m), "unsupported file type .jpg"),
        (("lens", TEXT, "--out", tmp_path / "x", *m), "unsupported file type (none)"),
        (("lens", TEXT, "--save", tmp_path / "x.pkl", *m), "unsupported file type .pkl"),
        (("lens", TEXT, "--out", tmp_path / "no" / "dir" / "x.png", *m), "cannot write"),
        (("plot", tmp_path / "none.npz"), "no such file"),
        (("plot", junk), "as a saved lens"),
        (("plot", tmp_path / "lens.csv"), "unsupported file type .csv"),
        (("generate", "hi", "--max-new-tokens", 100, *m), "exceeds the context of 64"),
        (("generate", "hi", "--top-p", 2, *m), "top_p=2.0 must be in (0, 1]"),
        (("generate", "", *m), "the prompt is empty"),
        (("score", "h", *m), "at least two tokens"),
        (("download", "gpt3"), "unknown model name 'gpt3'"),
        (("info", tmp_path / "nowhere"), "neither a checkpoint folder"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "choose a command"),
    ]


def test_every_user_error_is_one_line_with_status_2(capsys, ckpt, tmp_path):
    for argv, message in _errors(ckpt, tmp_path):
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("gpt2np: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
        assert "Traceback" not in err and out == ""


def test_missing_gpu_is_a_user_error(capsys, ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails, as without CuPy
    for cmd in (("lens", TEXT), ("generate", "hi"), ("score", TEXT)):
        code, _, err = run(capsys, *cmd, "--model", ckpt, "--device", "gpu")
        assert code == 2 and err.startswith("gpt2np: error: ") and "CuPy" in err and err.count("\n") == 1


def test_debug_shows_the_traceback(capsys, ckpt):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        cli.main(["lens", "hi", "--model", "gpt9", "--debug"])
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        cli.main(["--debug", "lens", "hi", "--model", "gpt9"])
    from gpt2np.cli import UserError

    with pytest.raises(UserError, match="bad window"):
        cli.main(["lens", TEXT, "--model", ckpt, "--start", "50", "--debug"])


def test_an_unexpected_failure_is_reported_as_internal(capsys, ckpt, monkeypatch):
    def broken(*a, **kw):
        raise KeyError("oops")

    monkeypatch.setattr(gpt2np.api, "logit_lens", broken)
    code, _, err = run(capsys, "lens", TEXT, "--model", ckpt)
    assert code == 1 and err.startswith("gpt2np: error: internal error (KeyError") and "--debug" in err


@pytest.mark.parametrize("command", ["lens", "plot", "generate", "score", "download", "info"])
def test_help_has_an_example(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "examples:" in out and f"gpt2np {command}" in out


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpt2np", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "lens" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gpt2np", "lens", "hi", "--model", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("gpt2np: error: ") and "Traceback" not in r.stderr


def _gpu_usable() -> bool:
    try:
        from gpt2np import backend

        backend.gpu()
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _gpu_usable(), reason="needs CuPy and a usable GPU")
def test_device_gpu_gives_the_cpu_results(capsys, ckpt):
    _, cpu, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--view", "ranks")
    code, gpu, err = run(capsys, "lens", TEXT, "--model", ckpt, "--view", "ranks", "--device", "gpu")
    assert code == 0, err
    assert gpu == cpu
    _, a, _ = run(capsys, "generate", "hi", "--model", ckpt, "--temperature", "0", "--max-new-tokens", 10)
    _, b, _ = run(capsys, "generate", "hi", "--model", ckpt, "--temperature", "0", "--max-new-tokens", 10,
                  "--device", "gpu")
    assert a == b
    code, out, _ = run(capsys, "score", TEXT, "--model", ckpt, "--device", "gpu", "--json")
    assert code == 0 and json.loads(out)["n_scored"] > 0


# -------------------------------------------------------------------------------------------------
# info says [complete] only for a folder that loads


def test_info_of_a_folder_that_does_not_load(capsys, ckpt, tmp_path):
    folder = shutil.copytree(ckpt, tmp_path / "damaged")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    begin = header["ln_f.bias"]["data_offsets"][0]
    header["ln_f.bias"]["data_offsets"] = [begin, begin + 4]  # the span does not fit the shape
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    code, out, _ = run(capsys, "info", folder)
    assert code == 1 and "[complete]" not in out
    assert f"[does not load: {path}: tensor ln_f.bias's data_offsets [{begin}, {begin + 4}] hold 4 bytes" in out
    cfg = json.loads((folder / "config.json").read_text())
    path.write_bytes(data)
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": 399}))
    code, out, _ = run(capsys, "info", folder)
    assert code == 1 and "[does not load: " in out and "the tokenizer has 400 tokens but config.json says " \
                                                        "vocab_size=399" in out


def test_info_of_a_sharded_folder_and_of_a_padded_vocabulary(capsys, ckpt, tmp_path, make_checkpoint):
    from safetensors.numpy import load_file, save_file

    folder = shutil.copytree(ckpt, tmp_path / "sharded")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    weight_map = {k: s for s, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, out, _ = run(capsys, "info", folder)
    assert code == 0 and "[complete]" in out
    lines = out.splitlines()
    files = next(i for i, ln in enumerate(lines) if ln.startswith("files"))
    listed = [ln[12:].split()[0] for ln in lines[files:]]  # "files       NAME  SIZE", then "            NAME  SIZE"
    assert listed == ["config.json", "model.safetensors.index.json", *shards, "vocab.json", "merges.txt"]
    padded = make_checkpoint(vocab_size=448, tokenizer_dir=ckpt)  # the 400-token tokenizer, V = 448
    code, out, _ = run(capsys, "info", padded)
    assert code == 0 and "[complete]" in out and "vocab_size=448" in out


def test_generate_prints_ids_without_text_as_their_number(ckpt, make_checkpoint):
    m = gpt2np.load(make_checkpoint(vocab_size=448, tokenizer_dir=ckpt))
    out = io.StringIO()
    assert cli._write_stream(m, iter([72, 420, 447]), out) == [72, 420, 447]
    assert out.getvalue() == m.decode([72]) + "<id 420><id 447>"


# Bad input: refused before any work, never a crash, never lost data


@pytest.fixture
def no_work(monkeypatch):
    """Record (and stop) any model load, forward pass or generation: ``started`` must stay empty."""
    started = []

    def stop(what):
        def f(*a, **k):
            started.append(what)
            raise RuntimeError(f"{what} started")
        return f

    monkeypatch.setattr(gpt2np.api, "load", stop("load"))
    monkeypatch.setattr(cli, "_token_stream", stop("generation"))
    monkeypatch.setattr(gpt2np.api.Model, "forward", stop("forward"))
    return started


@pytest.fixture
def lens_file(model, tmp_path):
    return gpt2np.logit_lens(model, model.forward([1, 2, 3])).save(tmp_path / "l.npz")


def _refused_early(ckpt, tmp_path, lens_file):
    m = ("--model", ckpt)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    (tmp_path / "d.png").mkdir()
    missing = tmp_path / "no" / "dir"
    ok = tmp_path / "ok.png"
    return [
        (("lens", TEXT, "--out", missing / "x.png", *m), f"cannot write --out {missing / 'x.png'}: the folder "
                                                         f"{missing} does not exist"),
        (("lens", TEXT, "--out", str(missing / "{view}.png"), "--view", "kl", *m), "cannot write --out"),
        (("lens", TEXT, "--save", missing / "x.npz", *m), "cannot write --save"),
        (("lens", TEXT, "--out", a_file / "x.png", *m), f"{a_file} is not a folder"),
        (("lens", TEXT, "--out", tmp_path / "d.png", *m), "it is a folder; give a file name"),
        (("generate", "hi", "--lens-out", missing / "g.npz", *m), "cannot write --lens-out"),
        (("lens", TEXT, "--out", ok, "--dpi", 100000, *m), "--dpi 100000 is too high: even the smallest figure"),
        (("plot", lens_file, "--out", ok, "--dpi", 100000), "the limit of 150 megapixels; use --dpi"),
        (("lens", TEXT, "--out", ok, "--vmin", 5, "--vmax", 1, *m), "--vmin 5 must be below --vmax 1"),
        (("plot", lens_file, "--out", ok, "--vmin", 2, "--vmax", 2), "--vmin 2 must be below --vmax 2"),
        (("lens", TEXT, "--out", ok, "--vmin", 50, "--view", "kl", *m), "--vmin 50 leaves no range for --view kl"),
        (("lens", TEXT, "--out", ok, "--vmax", 0.5, "--view", "ranks", *m), "--vmax 0.5 leaves no range"),
        (("lens", TEXT, "--out", ok, "--vmin", 0, "--view", "ranks", *m), "must be above 0 for --view ranks"),
        (("plot", lens_file, "--vmin", "nan"), "argument --vmin: 'nan' is not a finite number"),
        (("generate", "hi", "--seed", -1, *m), "argument --seed: -1 must be at least 0"),
    ]


def test_bad_output_options_are_refused_before_any_work(capsys, ckpt, tmp_path, lens_file, no_work):
    cases = _refused_early(ckpt, tmp_path, lens_file)
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.startswith("gpt2np: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
        assert out == "" and no_work == [], (argv, no_work)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "l.npz", "notes.txt"]  # nothing written


def test_an_unwritable_folder_is_refused_before_the_model_loads(capsys, ckpt, tmp_path, monkeypatch, no_work):
    """A folder the user may not write into (simulated: this test may run as root, who writes anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    for argv in (("lens", TEXT, "--out", ro / "x.png"), ("lens", TEXT, "--save", ro / "x.json"),
                 ("generate", "hi", "--lens-out", ro / "x.npz")):
        code, out, err = run(capsys, *argv, "--model", ckpt)
        assert code == 2 and f"the folder {ro} is not writable" in err and no_work == [], (argv, err)
    (tmp_path / "old.npz").write_bytes(b"old")
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p).name == "old.npz" else real(p, mode))
    code, _, err = run(capsys, "lens", TEXT, "--save", tmp_path / "old.npz", "--model", ckpt)
    assert code == 2 and "the file is read-only" in err and no_work == []


def test_lens_out_options_are_checked_before_generation(capsys, ckpt, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(cli, "_token_stream", lambda *a: started.append(1) or iter(()))
    path = tmp_path / "g.npz"
    for extra, message in [(("--decoder-blocks", 4), "--decoder-blocks 4 leaves no row to show"),
                           (("--decoder-blocks", 3, "--no-input"), "--no-input drops the input row"),
                           (("--max-new-tokens", 0), "--lens-out needs at least one new token")]:
        code, out, err = run(capsys, "generate", "hi", "--model", ckpt, "--lens-out", path, *extra)
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert out == "" and started == [] and not path.exists(), extra


def test_a_figure_too_large_is_refused_before_drawing(capsys, ckpt, tmp_path, monkeypatch):
    """A dpi the smallest figure allows, but not this 32-position window: refused before drawing."""
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: pytest.fail("the figure was drawn"))
    out = tmp_path / "big.png"
    code, stdout, err = run(capsys, "lens", TEXT, "--model", ckpt, "--out", out, "--dpi", 3000)
    assert code == 2 and err.count("\n") == 1
    assert f"--dpi 3000 is too high for {out}: a figure of " in err and "the limit of 150 megapixels" in err
    best = int(err.rsplit("use --dpi ", 1)[1].split()[0])
    assert best < 3000 and not out.exists()
    monkeypatch.undo()
    code, _, _ = run(capsys, "lens", TEXT, "--model", ckpt, "--out", out, "--dpi", min(best, 20))
    assert code == 0 and out.read_bytes()[:8] == PNG_MAGIC


def test_a_damaged_lens_file_is_one_line_and_no_half_table(capsys, ckpt, model, tmp_path):
    good = gpt2np.logit_lens(model, model.forward(model.encode(TEXT)), start=2, end=9).save(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["top_tokens"] = arrays["top_tokens"][:2]  # two rows of four
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    code, out, err = run(capsys, "plot", bad)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"cannot read {bad} as a saved lens: Lens top_tokens has shape [2, 7, 5]" in err
    assert "internal error" not in err


def test_non_utf8_standard_input_is_refused(capsys, ckpt, monkeypatch):
    """As with --file: bytes that are not UTF-8 are an error, never replaced by U+FFFD."""
    def stdin(data: bytes):
        return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")

    monkeypatch.setattr(sys, "stdin", stdin("café".encode("latin-1")))
    code, out, err = run(capsys, "lens", "-", "--model", ckpt)
    assert code == 2 and out == "" and "cannot read standard input: not UTF-8 text (unexpected end of data at byte 3)" in err
    monkeypatch.setattr(sys, "stdin", stdin("café".encode("latin-1")))
    code, out, err = run(capsys, "generate", "-", "--model", ckpt, "--max-new-tokens", 2)
    assert code == 2 and out == "" and "not UTF-8" in err
    monkeypatch.setattr(sys, "stdin", stdin((TEXT + "\n").encode("utf-8")))
    code, piped, _ = run(capsys, "lens", "-", "--model", ckpt)
    code2, direct, _ = run(capsys, "lens", TEXT, "--model", ckpt)
    assert code == code2 == 0 and piped == direct


def test_dollar_signs_in_the_text_draw_literally(capsys, make_checkpoint, real_tokenizer_dir, tmp_path):
    """GPT-2's tokenizer makes ' $$' one token; the figure draws it as text (mathtext raised before)."""
    ckpt = make_checkpoint(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, tokenizer_dir=real_tokenizer_dir)
    assert " $$" in gpt2np.load(ckpt).tokens(gpt2np.load(ckpt).encode("a $$ b"))
    out = tmp_path / "x.png"
    code, stdout, err = run(capsys, "lens", "a $$ b", "--model", ckpt, "--out", out, "--dpi", 40)
    assert code == 0 and err == "" and out.read_bytes()[:8] == PNG_MAGIC


def test_a_failed_checkpoint_write_leaves_the_older_checkpoint(tmp_path, monkeypatch):
    """scripts/make_checkpoint.py writes each file beside and renames it: a failure midway (a full disk)
    leaves the older checkpoint whole and loadable, and no temporary file behind."""
    import make_checkpoint
    from gpt2np.config import Config

    config = Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=300)
    folder = make_checkpoint.write_checkpoint(tmp_path / "ckpt", config, seed=0)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(make_checkpoint, "save_file", half)
    with pytest.raises(OSError, match="No space left"):
        make_checkpoint.write_checkpoint(folder, config, seed=1)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert gpt2np.load(folder).config == config
