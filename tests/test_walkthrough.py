"""examples/walkthrough.py: it runs as a plain script on a random checkpoint and writes every figure,
its hand-written lens check fails when the library's lens disagrees, and it is a jupytext percent file."""
from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2np
from conftest import REAL_TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "walkthrough.py"
PNG = b"\x89PNG\r\n\x1a\n"  # the first 8 bytes of every PNG file
FIGURES = [f"abstract-{i}-{view}" for view in ("logits", "ranks", "kl") for i in (1, 2)] + [
    "plasma-logits", "plasma-ranks", "repetition-logits", "repetition-ranks",
    "abstract-1-kl-input", "abstract-1-input-rank", "plasma-first-kl-input", "plasma-first-input-rank",
    "abstract-1-sublayers-kl", "abstract-1-decoder-blocks-1-kl"]
CELL = re.compile(r"^# %%( \[markdown\])?$")  # a cell marker of the percent format


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    """4 random blocks with GPT-2's real tokenizer where its files are (then the abstract is 180 tokens),
    else with a 400-token BPE (the abstract is then 613 tokens, hence 1024 positions): never a skip."""
    if (REAL_TOKENIZER / "vocab.json").is_file() and (REAL_TOKENIZER / "merges.txt").is_file():
        return make_checkpoint(n_layer=4, n_embd=32, n_head=2, n_positions=256, vocab_size=50257,
                               tokenizer_dir=REAL_TOKENIZER, scale=3.0)
    return make_checkpoint(n_layer=4, n_embd=32, n_head=2, n_positions=1024, vocab_size=400, scale=3.0)


def test_the_script_runs_and_writes_every_figure(checkpoint, tmp_path):
    out, cwd = tmp_path / "figures", tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MPLBACKEND", None)  # the script chooses its backend (Agg) itself
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(checkpoint), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=cwd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for norm in ("ln_f", "norm"):
        assert re.search(rf"norm={norm}: by hand and gpt2np.logit_lens agree on 50 cells", r.stdout), r.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{name}.png" for name in FIGURES)
    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG and len(data) > 1000, name
    assert not list(cwd.iterdir())  # nothing written outside --out


def test_the_hand_check_fails_when_the_lens_disagrees(checkpoint, tmp_path, monkeypatch):
    """The script asserts its hand-made lens equals gpt2np.logit_lens: a lens read without normalisation
    (norm="raw" whatever is asked) must stop it at that check."""
    real = gpt2np.logit_lens
    monkeypatch.setattr(gpt2np, "logit_lens", lambda model, trace, **kw: real(model, trace, **{**kw, "norm": "raw"}))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model", str(checkpoint), "--out", str(tmp_path)])
    with pytest.raises(AssertionError, match="differ"):
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert not list(tmp_path.iterdir())  # it stopped before the first figure


def test_it_is_a_jupytext_percent_file():
    """Checked by hand (jupytext is not a dependency): a YAML header naming the percent format, then
    cells that each start with a marker; markdown cells are comments only; the whole file is Python."""
    src = SCRIPT.read_text(encoding="utf-8")
    lines = src.splitlines()
    compile(src, str(SCRIPT), "exec")
    assert lines[0] == "# ---"
    close = lines.index("# ---", 1)
    header = "\n".join(lines[1:close])
    assert all(ln.startswith("#") for ln in lines[:close + 1])
    assert "jupytext:" in header and re.search(r"^#\s+format_name: percent$", header, re.M)
    body = lines[close + 1:]
    first = next(i for i, ln in enumerate(body) if ln.strip())
    assert body[first] == "# %% [markdown]"  # a title cell comes first
    markers = [i for i, ln in enumerate(body) if ln.startswith("# %%")]
    assert all(CELL.match(body[i]) for i in markers), [body[i] for i in markers if not CELL.match(body[i])]
    cells = [(body[i], body[i + 1:j]) for i, j in zip(markers, markers[1:] + [len(body)])]
    markdown = [text for marker, text in cells if marker.endswith("[markdown]")]
    code = [text for marker, text in cells if not marker.endswith("[markdown]")]
    assert len(markdown) >= 10 and len(code) >= 10
    for text in markdown:
        assert any(ln.startswith("# ") for ln in text)
        assert all(ln == "" or ln == "#" or ln.startswith("# ") for ln in text), text[:3]
    for text in code:
        assert any(ln.strip() and not ln.startswith("#") for ln in text), text[:3]
    try:
        import jupytext
    except ImportError:
        return
    nb = jupytext.reads(src, fmt="py:percent")  # where jupytext is installed, it must read the same cells
    assert [c.cell_type for c in nb.cells] == ["markdown" if m.endswith("[markdown]") else "code" for m, _ in cells]
