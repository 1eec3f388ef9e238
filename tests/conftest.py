"""Shared fixtures: tiny random checkpoints, the real tokenizer files, and the transformers reference.

Checkpoints are written by ``scripts/make_checkpoint.py`` (plain ``safetensors.numpy``, independent of
gpt2np's reader) into session-wide temporary folders, once per distinct set of arguments.
Treat them as read-only: a test that edits or breaks files copies one first (``copy_checkpoint``)
or asks for a private one (``make_checkpoint(..., cache=False)``).

The reference is transformers' ``GPT2LMHeadModel`` (eager attention, float32, eval mode). Where
torch or transformers is missing its tests skip, except when ``GPT2NP_REQUIRE_REFERENCE=1`` (as in
``.ci/run``): then the fixture errors, and any skip whose reason names torch, transformers, the
reference or array_api_strict (all in the ``test`` extra; for example ``pytest.importorskip("torch")``
in another test file) is turned into a failure, so a cross-check can never pass CI by being skipped.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import bpe_files, write_checkpoint  # noqa: E402,F401  (bpe_files re-exported for tests)

import gpt2np  # noqa: E402
from gpt2np.config import Config  # noqa: E402

REAL_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2-tokenizer"
REQUIRE_ENV = "GPT2NP_REQUIRE_REFERENCE"
# Skip reasons that mean "the reference was not there"; under GPT2NP_REQUIRE_REFERENCE=1 they fail.
_REFERENCE_SKIP = re.compile(r"\b(torch|transformers|reference|array_api_strict)\b", re.IGNORECASE)

# The default tiny model: 3 blocks, an odd head count (3 heads of 16), a vocabulary of 400
# (256 bytes, 143 merges, <|endoftext|> = 399), 64 positions. Loads and runs in milliseconds.
TINY = Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400)


def reference_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _require(module: str):
    """Import ``module`` or skip (fail under GPT2NP_REQUIRE_REFERENCE=1)."""
    try:
        return __import__(module)
    except ImportError as e:
        msg = f"the reference needs {module} ({e}); install it with: pip install -e '.[test]'"
        if reference_required():
            pytest.fail(f"{REQUIRE_ENV}=1 but {msg}", pytrace=False)
        pytest.skip(msg)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under GPT2NP_REQUIRE_REFERENCE=1 a skip for a missing torch/transformers is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and reference_required() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _REFERENCE_SKIP.search(reason):
            report.outcome = "failed"
            report.longrepr = f"{REQUIRE_ENV}=1 forbids skipping a cross-check: {reason}"


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """Factory: ``make_checkpoint(config=None, *, layout="official", seed=0, scale=1.0, untied_head=False,
    tokenizer_dir=None, cache=True, **config_fields) -> Path`` of a complete checkpoint folder.

    ``config_fields`` override fields of ``config`` (default ``TINY``), e.g. ``n_head=5, n_inner=100``.
    With ``cache=True`` the same arguments return the same (read-only) folder for the whole session.
    """
    store: dict = {}

    def make(config: Config | None = None, *, layout: str = "official", seed: int = 0, scale: float = 1.0,
             untied_head: bool = False, tokenizer_dir: str | Path | None = None, cache: bool = True,
             **config_fields) -> Path:
        base = config or TINY
        if config_fields:
            base = Config(**{**base.__dict__, **config_fields})
        key = (base, layout, seed, float(scale), untied_head, str(tokenizer_dir))
        if cache and key in store:
            return store[key]
        folder = tmp_path_factory.mktemp(f"ckpt-{layout}-L{base.n_layer}H{base.n_head}D{base.n_embd}")
        write_checkpoint(folder, base, layout=layout, seed=seed, scale=scale, tokenizer_dir=tokenizer_dir,
                         untied_head=untied_head)
        if cache:
            store[key] = folder
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return TINY


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """Folder of the default tiny model (official layout: no prefix, mask buffers stored, tied head)."""
    return make_checkpoint(TINY, layout="official", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint) -> gpt2np.Model:
    """The default tiny model loaded through ``gpt2np.load`` (shared: don't mutate it)."""
    return gpt2np.load(tiny_checkpoint)


@pytest.fixture
def copy_checkpoint(tmp_path):
    """``copy_checkpoint(folder) -> Path``: a private, writable copy of a checkpoint folder."""
    def copy(folder: Path, name: str = "ckpt") -> Path:
        return Path(shutil.copytree(folder, tmp_path / name))
    return copy


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> Path:
    """GPT-2's real vocab.json and merges.txt (../shared/data/gpt2-tokenizer); skips where absent."""
    if not (REAL_TOKENIZER / "vocab.json").is_file() or not (REAL_TOKENIZER / "merges.txt").is_file():
        pytest.skip(f"GPT-2's real tokenizer files are not in {REAL_TOKENIZER}")
    return REAL_TOKENIZER


# ---------------------------------------------------------------------------------------------
# The transformers reference


@pytest.fixture(scope="session")
def torch():
    """The torch module (skips, or errors under GPT2NP_REQUIRE_REFERENCE=1, where it is missing)."""
    return _require("torch")


@pytest.fixture(scope="session")
def transformers(torch):
    """The transformers module, quiet (no load reports or progress bars)."""
    tf = _require("transformers")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


# Buffers that official files carry and transformers does not keep as parameters.
_MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


@pytest.fixture(scope="session")
def reference_model(torch, transformers):
    """``reference_model(path)``: transformers' GPT2LMHeadModel from a checkpoint folder, loaded with
    ``from_pretrained`` (eager attention, float32, eval mode). Fails if any weight was left at its
    random initialisation (a missing key) or a tensor other than a mask buffer was not used."""
    def load(path: str | Path):
        model, info = transformers.GPT2LMHeadModel.from_pretrained(
            str(path), attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"], f"transformers initialised {sorted(info['missing_keys'])} at random"
        unexpected = [k for k in info["unexpected_keys"] if not _MASK_BUFFER.match(k)]
        assert not unexpected, f"transformers ignored tensors {unexpected}"
        assert not info["mismatched_keys"], info["mismatched_keys"]
        return model.float().eval()
    return load


@pytest.fixture(scope="session")
def reference_run(torch):
    """``reference_run(model, ids) -> (logits [T, V], hidden_states [L+1, T, D])`` as float64 NumPy."""
    def run(model, ids):
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None], output_hidden_states=True)
        hidden = np.stack([h[0].double().numpy() for h in out.hidden_states])
        return out.logits[0].double().numpy(), hidden
    return run


def rel_err(got, ref) -> float:
    """Relative error used in every cross-check: max |got - ref| / max |ref| (float64)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="session")
def relative_error():
    """``relative_error(got, ref) = max |got - ref| / max |ref|``, computed in float64."""
    return rel_err
