"""The logit lens against references that build the full distributions.

The reference here is deliberately naive: float64 logits for every row and position, a log-softmax,
and each quantity written straight from its definition in lens-spec.md. The lens under test never
builds that array; both must agree to float32 precision, ranks and top-k exactly.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tracemalloc

import numpy as np
import pytest

import gpt2np
from gpt2np import model as M
from gpt2np.config import Config
from gpt2np import Lens, logit_lens
from gpt2np import lens as definition
from gpt2np.lens import self_check

from _strict import host_conversion_blocked, strict_model

QUANTITIES = ("kl_final", "kl_input", "entropy", "next_prob", "next_xent")
EXACT = ("top_ids", "final_ids", "final_rank", "input_rank", "next_rank", "lock_in")


# ---------------------------------------------------------------------------------------------
# The reference: full float64 distributions, definitions written out


def ln64(x, w=None, b=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y if w is None else y * w + b


def expected_rows(L, step=1, include_input=True, sublayers=False, decoder_blocks=0):
    """Written from the spec: shown blocks 0..n-1, keep l when (n-1-l) % step == 0."""
    n = L - decoder_blocks
    rows = [("input", "resid", 0)] if include_input else []
    for l in range(n):
        if (n - 1 - l) % step == 0:
            rows += ([(f"{l}.attn", "resid_mid", l)] if sublayers else []) + [(str(l), "resid", l + 1)]
    return rows


def run_last_blocks(model, x, first):
    p, eps, H = model.params, model.config.layer_norm_epsilon, model.config.n_head
    for l, b in enumerate(p.h[first:], first):
        x = x + M.attention(M.layer_norm(x, b.ln_1_weight, b.ln_1_bias, eps), b, H, model.config.attn_scale(l))[0]
        x = x + M.mlp(M.layer_norm(x, b.ln_2_weight, b.ln_2_bias, eps), b)
    return x


def reference_lens(model, trace, *, k=5, step=1, include_input=True, sublayers=False, start=0, end=None,
                   norm="ln_f", decoder_blocks=0):
    p, L = model.params, model.config.n_layer
    T = trace.resid.shape[1]
    end = T if end is None else end
    Wt = np.asarray(p.unembed, np.float64).T  # [D, V]
    ids = np.asarray(trace.ids)

    def logits(x):  # [T, D] -> [T, V] float64
        if norm == "ln_f":
            x = ln64(x, p.ln_f_weight.astype(np.float64), p.ln_f_bias.astype(np.float64))
        elif norm == "norm":
            x = ln64(x)
        return np.asarray(x, np.float64) @ Wt

    def logp(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def stream(src, i):
        x = getattr(trace, src)[i]
        return run_last_blocks(model, x, L - decoder_blocks) if decoder_blocks else x

    z_final = logits(trace.resid[L])
    lp_final, lp_input = logp(z_final), logp(logits(stream("resid", 0)))
    final_top = z_final.argmax(1)
    nxt = np.r_[ids[1:], -1]
    rows = expected_rows(L, step, include_input, sublayers, decoder_blocks)
    out = {q: [] for q in QUANTITIES + ("top_ids", "final_rank", "input_rank", "next_rank", "top_probs", "z")}
    out.update({f"{q}_bounds": [] for q in ("final_rank", "input_rank", "next_rank")})
    pos = np.arange(T)

    def rank(z, tok):  # 1 + number of strictly larger logits
        return 1 + (z > z[pos, tok][:, None]).sum(1)

    def rank_bounds(z, tok):
        """Ranks a float32 computation may give: logits within float32 resolution of the target's
        may land on either side of it (only near-exact ties are affected)."""
        t, tol = z[pos, tok][:, None], TIE * np.abs(z).max()
        return 1 + (z > t + tol).sum(1), (z > t - tol).sum(1)  # the target itself is within tol

    for _, src, i in rows:
        z = logits(stream(src, i))
        lp = logp(z)
        out["kl_final"].append((np.exp(lp_final) * (lp_final - lp)).sum(1))
        out["kl_input"].append((np.exp(lp_input) * (lp_input - lp)).sum(1))
        out["entropy"].append(-(np.exp(lp) * lp).sum(1))
        out["final_rank"].append(rank(z, final_top))
        out["input_rank"].append(rank(z, ids))
        has = nxt >= 0
        tok = np.where(has, nxt, 0)
        out["next_rank"].append(np.where(has, rank(z, tok), -1))
        for q, target in (("final_rank", final_top), ("input_rank", ids), ("next_rank", tok)):
            lo, hi = rank_bounds(z, target)
            out[f"{q}_bounds"].append(np.stack([np.where(has | (q != "next_rank"), lo, -1),
                                                np.where(has | (q != "next_rank"), hi, -1)]))
        out["z"].append(z)
        out["next_prob"].append(np.where(has, np.exp(lp[pos, tok]), np.nan))
        out["next_xent"].append(np.where(has, -lp[pos, tok], np.nan))
        top = np.argsort(-z, axis=1, kind="stable")[:, :k]  # ties: lower id first
        out["top_ids"].append(top)
        out["top_probs"].append(np.exp(np.take_along_axis(lp, top, 1)))
    ref = {q: np.array(v)[..., start:end] if q.endswith("_bounds") else np.array(v)[:, start:end]
           for q, v in out.items()}
    ref["final_ids"] = final_top[start:end]
    match = ref["top_ids"][:, :, 0] == ref["final_ids"]
    R = len(rows)
    ref["lock_in"] = np.array([next((r for r in range(R) if match[r:, w].all()), R - 1) for w in range(match.shape[1])])
    ref["rows"] = tuple(r[0] for r in rows)
    return ref


TIE = 1e-7  # relative logit difference below which float32 cannot order two tokens reliably


def assert_matches(lens: Lens, ref: dict, atol=2e-5, exact_ties=False):
    """Ranks exactly, except where float32 cannot separate two logits (then within the tie's bounds);
    top-k tokens exactly, except that near-tied tokens may swap (then their logits must tie)."""
    assert lens.rows == ref["rows"]
    for q in ("final_rank", "input_rank", "next_rank"):
        got, (lo, hi) = getattr(lens, q), np.moveaxis(ref[f"{q}_bounds"], 1, 0)
        assert ((got >= lo) & (got <= hi)).all(), q
        if exact_ties:  # ties made on purpose are exact in any precision: ranks must match exactly
            np.testing.assert_array_equal(got, ref[q], err_msg=q)
            continue
        exact = (lo == hi)
        assert exact.mean() > 0.9, f"{q}: the fixture has too many near-ties to test anything"
        np.testing.assert_array_equal(got[exact], ref[q][exact], err_msg=q)
    z = ref["z"]  # [R, W, V] float64 logits of the reference
    tol = TIE * np.abs(z).max()
    got_vals = np.take_along_axis(z, lens.top_ids, axis=-1)
    want_vals = np.take_along_axis(z, ref["top_ids"], axis=-1)
    assert np.abs(got_vals - want_vals).max() <= tol, "top-k tokens differ beyond a float32 tie"
    assert (lens.top_ids == ref["top_ids"]).mean() > 0.99
    for q in ("final_ids", "lock_in"):
        assert (getattr(lens, q) == ref[q]).mean() > 0.95, q
    for q in QUANTITIES + ("top_probs",):
        got, want = getattr(lens, q), ref[q]
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=q)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, equal_nan=True, err_msg=q)


# ---------------------------------------------------------------------------------------------
# Fixtures

SHAPES = {
    "tiny": Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400),
    # vocabulary > 16 x 1024: the NumPy path's column top-k uses its full 1024-wide grouping
    "wide-vocab": Config(n_layer=2, n_head=2, n_embd=32, n_positions=48, vocab_size=20000),
    "deep-odd": Config(n_layer=5, n_head=5, n_embd=40, n_positions=32, vocab_size=300),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def case(request, make_checkpoint):
    cfg = SHAPES[request.param]
    m = gpt2np.load(make_checkpoint(cfg, scale=8.0, seed=3))  # GPT-2-like magnitudes: peaked distributions
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, cfg.n_positions)  # full context
    return m, m.forward(ids, sublayers=True)


OPTIONS = [
    {},
    {"sublayers": True},
    {"sublayers": True, "step": 2, "include_input": False},
    {"step": 3},
    {"norm": "norm"},
    {"norm": "raw"},
    {"decoder_blocks": 1},
    {"decoder_blocks": 2, "sublayers": True, "norm": "norm"},
    {"start": 5, "end": 19, "k": 3},
    {"start": 0, "end": 1},  # first position only
    {"k": 40, "end": 12},  # more top tokens than the NumPy path's columns on small vocabularies
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("impl", ["definition", "public"])
def test_lens_matches_full_float64_reference(case, opts, impl):
    """Both the definition (lens.py's plain loop) and the public lens (lens_fast.py on NumPy)."""
    m, tr = case
    lens = (definition.logit_lens if impl == "definition" else logit_lens)(m, tr, **opts)
    assert_matches(lens, reference_lens(m, tr, **opts))


def test_lens_from_transformers_hidden_states(make_checkpoint, reference_model, reference_run):
    """Rows built from transformers' own hidden states (float64 decoding) agree with gpt2np's lens.

    transformers returns ln_f(last stream) as its last hidden state, so the last row there is
    compared through the model's logits, which are exactly that row read by the ln_f decoder.
    """
    cfg = SHAPES["tiny"]
    path = make_checkpoint(cfg, scale=8.0, seed=5)
    m = gpt2np.load(path)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 40)
    logits_ref, hidden = reference_run(reference_model(path), ids)
    p = m.params
    Wt = p.wte.astype(np.float64).T
    zs = [ln64(h, p.ln_f_weight, p.ln_f_bias) @ Wt for h in hidden[:-1]] + [logits_ref]  # [L+1] x [T, V]

    def logp(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lf = logp(zs[-1])
    pos = np.arange(len(ids))
    top = zs[-1].argmax(1)
    lens = logit_lens(m, m.forward(ids))
    for r, z in enumerate(zs):
        lp = logp(z)
        np.testing.assert_allclose(lens.kl_final[r], (np.exp(lf) * (lf - lp)).sum(1), atol=5e-5)
        np.testing.assert_allclose(lens.entropy[r], -(np.exp(lp) * lp).sum(1), atol=5e-5)
        np.testing.assert_array_equal(lens.final_rank[r], 1 + (z > z[pos, top][:, None]).sum(1))
        np.testing.assert_array_equal(lens.top1[r], z.argmax(1))


# ---------------------------------------------------------------------------------------------
# Mathematics and conventions


def test_kl_of_final_is_zero_and_kl_is_never_negative(case):
    m, tr = case
    for norm in ("ln_f", "norm", "raw"):
        lens = logit_lens(m, tr, norm=norm, sublayers=True)
        assert lens.rows[-1] == str(m.config.n_layer - 1)
        assert np.all(lens.kl_final[-1] == 0.0), norm  # KL(final || final) = 0 exactly, in every mode
        assert np.all(lens.final_rank[-1] == 1)
        assert np.all(lens.kl_final >= 0) and np.all(lens.kl_input >= 0)
        assert np.all(lens.kl_input[0] == 0.0)  # the input row against itself
        assert np.all(lens.lock_in <= len(lens.rows) - 1)


def test_probabilities_and_entropy_bounds(case):
    m, tr = case
    lens = logit_lens(m, tr, k=4)
    V = m.config.vocab_size
    assert np.all(np.diff(lens.top_logits, axis=-1) <= 0)  # sorted, best first
    assert np.all(lens.top_probs.sum(-1) <= 1 + 1e-9)
    assert np.all((lens.entropy >= 0) & (lens.entropy <= np.log(V) + 1e-9))
    finite = ~np.isnan(lens.next_xent)
    np.testing.assert_allclose(np.exp(-lens.next_xent[finite]), lens.next_prob[finite], rtol=1e-12)


def test_last_position_has_no_next_token(case):
    m, tr = case
    T = tr.resid.shape[1]
    lens = logit_lens(m, tr, start=T - 2, end=T)
    assert np.all(lens.next_rank[:, -1] == -1)
    assert np.all(np.isnan(lens.next_prob[:, -1])) and np.all(np.isnan(lens.next_xent[:, -1]))
    assert np.all(lens.next_rank[:, 0] >= 1) and np.all(np.isfinite(lens.next_prob[:, 0]))
    assert lens.next_ids.tolist() == [int(tr.ids[-1]), -1]


def test_trace_of_length_one(tiny_model):
    tr = tiny_model.forward([17], sublayers=True)
    lens = logit_lens(tiny_model, tr, sublayers=True)
    assert lens.top_ids.shape == (len(lens.rows), 1, 5)
    assert_matches(lens, reference_lens(tiny_model, tr, sublayers=True))


def test_ranks_with_ties(make_checkpoint):
    """Tokens with identical unembedding rows have identical logits: a rank counts only strictly
    larger logits (ties in the token's favour) and top-k breaks ties by the lower id.

    The ties must be exact on any BLAS: a BLAS may compute two equal columns of ``x @ W.T`` with
    different kernels (OpenBLAS's Haswell kernels do, at the edges of its tiles), and then a dense row
    gives logits that differ in the last bit. So the five tied rows have one non-zero entry, a power of
    two: each of their logits is that one exact product plus exact zeros, in any order of summation.
    ln_f's gain and bias at that coordinate make the product positive and large, so the tied tokens
    top many distributions (and tie inside the top-k).
    """
    cfg = SHAPES["tiny"]
    m = gpt2np.load(make_checkpoint(cfg, scale=8.0, seed=3))
    j = 7  # the coordinate the tied rows read
    wte, gain, bias = m.params.wte.copy(), m.params.ln_f_weight.copy(), m.params.ln_f_bias.copy()
    wte[[11, 12, 13, 200, 300]] = 0.0
    wte[[11, 12, 13, 200, 300], j] = 4.0  # five equal rows: logit = 4 * ln_f(x)[j], exactly
    gain[j], bias[j] = 0.5, 3.0  # ln_f(x)[j] = 0.5 * normalised + 3 > 0 for |normalised| < 6
    params = dataclasses.replace(m.params, wte=wte, ln_f_weight=gain, ln_f_bias=bias)
    m = dataclasses.replace(m, params=params)
    ids = np.array([12, 300, 5, 11, 13, 200, 7, 300, 12, 9], np.int64)
    tr = m.forward(ids)
    z = np.asarray(tr.logits)
    assert (z[:, [11, 12, 13, 200, 300]] == z[:, [300]]).all(), "the fixture must produce exact ties"
    lens = logit_lens(m, tr, k=6)
    ref = reference_lens(m, tr, k=6)
    assert_matches(lens, ref, exact_ties=True)
    equal_next = lens.top_logits[:, :, 1:] == lens.top_logits[:, :, :-1]  # [R, W, k-1] tied neighbours
    assert equal_next.sum() >= 4, "the fixture must put ties inside the top-k"
    assert (lens.top_ids[:, :, 1:] > lens.top_ids[:, :, :-1])[equal_next].all()  # lower id first
    # rank of token 11, 12, 13, 200 or 300 is the same whichever of them is the input token
    for col in range(len(ids)):
        if ids[col] in (11, 12, 13, 200, 300):
            assert lens.input_rank[-1, col] == 1 + (z[col] > z[col, 300]).sum()


def test_select_rows_labels():
    rows = lambda **kw: gpt2np.lens.select_rows(6, **kw)  # noqa: E731
    assert [r[0] for r in rows()] == ["input", "0", "1", "2", "3", "4", "5"]
    assert [r[0] for r in rows(step=2)] == ["input", "1", "3", "5"]
    assert [r[0] for r in rows(step=4, include_input=False)] == ["1", "5"]
    assert [r[0] for r in rows(step=2, sublayers=True, include_input=False)] == \
        ["1.attn", "1", "3.attn", "3", "5.attn", "5"]
    assert [r[0] for r in rows(decoder_blocks=2, step=3)] == ["input", "0", "3"]
    assert rows(sublayers=True)[1] == ("0.attn", "resid_mid", 0)


def test_self_check(case):
    m, tr = case
    checks = self_check(m, tr)
    assert set(checks) == {"last_row", "decoder_blocks_1"}
    assert all(v < 1e-6 for v in checks.values()), checks
    # a decoder that is wrong must be caught: drop ln_f's gain
    bad = dataclasses.replace(m, params=dataclasses.replace(m.params, ln_f_weight=m.params.ln_f_weight * 2))
    assert self_check(bad, tr)["last_row"] > 1e-2


# ---------------------------------------------------------------------------------------------
# Results: files, JSON, errors


def test_save_and_load_roundtrip(case, tmp_path):
    m, tr = case
    lens = logit_lens(m, tr, sublayers=True, step=2, start=3, end=20)
    for name in ("lens.npz", "lens.json"):
        back = Lens.load(lens.save(tmp_path / name))
        assert back.rows == lens.rows and back.settings == lens.settings
        assert (back.start, back.end) == (3, 20)
        for f in dataclasses.fields(Lens):
            a, b = getattr(lens, f.name), getattr(back, f.name)
            if isinstance(a, np.ndarray):
                assert a.dtype.kind == b.dtype.kind, f.name
                np.testing.assert_array_equal(a, b, err_msg=f"{name}: {f.name}")
    d = json.loads((tmp_path / "lens.json").read_text())
    assert d["next_prob"][0][-1] is not None and d["settings"]["norm"] == "ln_f"
    with pytest.raises(ValueError, match="use .npz or .json"):
        lens.save(tmp_path / "lens.csv")


@pytest.mark.parametrize("name", ["LENS.NPZ", "lens.Json"])
def test_file_type_is_case_blind(case, tmp_path, name):
    """The command line accepts upper-case extensions; so do save and load, and nothing is renamed."""
    m, tr = case
    lens = logit_lens(m, tr, end=5)
    path = lens.save(tmp_path / name)
    assert path == tmp_path / name and sorted(p.name for p in tmp_path.iterdir()) == [name]
    np.testing.assert_array_equal(Lens.load(path).top_ids, lens.top_ids)


def test_tokens_are_display_strings(tiny_model):
    ids = tiny_model.encode("when people say plasma")
    lens = logit_lens(tiny_model, tiny_model.forward(ids))
    assert lens.tokens.tolist() == tiny_model.tokens(ids)
    assert lens.top_tokens[0, 0, 0] == tiny_model.tokens([lens.top_ids[0, 0, 0]])[0]


@pytest.mark.parametrize("kw, msg", [
    ({"norm": "layer"}, "unknown norm 'layer'"),
    ({"k": 0}, "k=0 must be an integer between 1"),
    ({"step": 0}, "step=0 must be a positive integer"),
    ({"start": 5, "end": 5}, "window start=5, end=5"),
    ({"end": 999}, "window start=0, end=999"),
    ({"decoder_blocks": 9}, "decoder_blocks=9 must be between 0 and n_layer=3"),
    ({"decoder_blocks": 3, "include_input": False}, "leaves only the input row"),
    ({"threads": 0}, "threads=0 must be a positive integer"),
    ({"chunk": 0}, "chunk=0 must be a positive integer"),
])
def test_bad_arguments(tiny_model, kw, msg):
    tr = tiny_model.forward([1, 2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match=msg):
        logit_lens(tiny_model, tr, **kw)


def test_sublayers_need_a_sublayer_trace(tiny_model):
    with pytest.raises(ValueError, match="forward\\(ids, sublayers=True\\)"):
        logit_lens(tiny_model, tiny_model.forward([1, 2, 3]), sublayers=True)


# ---------------------------------------------------------------------------------------------
# Backends and memory


def test_array_api_path_matches_numpy_path(case):
    """The lens runs unchanged on array_api_strict (the CPU proof for CuPy) and agrees with NumPy."""
    m, tr = case
    sm = strict_model(m)
    with host_conversion_blocked():
        st = sm.forward(tr.ids, sublayers=True)
        lens_s = logit_lens(sm, st, sublayers=True, step=2, decoder_blocks=1)
    lens_n = logit_lens(m, tr, sublayers=True, step=2, decoder_blocks=1)
    for q in EXACT:
        np.testing.assert_array_equal(getattr(lens_s, q), getattr(lens_n, q), err_msg=q)
    for q in QUANTITIES:
        np.testing.assert_allclose(getattr(lens_s, q), getattr(lens_n, q), atol=2e-5, equal_nan=True, err_msg=q)


# ---------------------------------------------------------------------------------------------
# The lens during generation


def test_generation_trace_equals_full_forward(tiny_model):
    from gpt2np.lens import generate_trace

    ids = tiny_model.encode("when people say plasma")
    new, tr = generate_trace(tiny_model, ids, 12, temperature=0.9, seed=4)
    assert np.array_equal(new, tiny_model.generate(ids, 12, temperature=0.9, seed=4))  # same tokens, same seed
    full = tiny_model.forward(np.concatenate([ids, new]), sublayers=True)
    for f in ("resid", "resid_mid", "logits"):
        a, b = getattr(tr, f), getattr(full, f)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), f


def test_generation_lens_equals_lens_of_full_sequence(tiny_model):
    from gpt2np.lens import generation_lens

    ids = tiny_model.encode("Sometimes, when people say")
    new, lens = generation_lens(tiny_model, ids, 10, temperature=1.0, seed=0, sublayers=True, step=2)
    full_ids = np.concatenate([ids, new])
    ref = logit_lens(tiny_model, tiny_model.forward(full_ids, sublayers=True), sublayers=True, step=2,
                     start=len(ids) - 1, end=len(full_ids) - 1)
    assert (lens.start, lens.end) == (len(ids) - 1, len(full_ids) - 1)
    np.testing.assert_array_equal(lens.next_ids, new)  # each cell's next token is the one generated there
    assert lens.settings["generated"] == 10
    for q in EXACT:
        np.testing.assert_array_equal(getattr(lens, q), getattr(ref, q), err_msg=q)
    for q in QUANTITIES:
        np.testing.assert_allclose(getattr(lens, q), getattr(ref, q), atol=1e-5, equal_nan=True, err_msg=q)


def test_generation_lens_stops_at_eot_and_respects_the_context(tiny_model):
    from gpt2np.lens import generation_lens

    ids = np.arange(60, dtype=np.int64)
    with pytest.raises(ValueError, match="at most 4 new tokens"):
        generation_lens(tiny_model, ids, 5)
    new, lens = generation_lens(tiny_model, ids, 4, temperature=0)  # exactly fills the 64 positions
    assert len(lens.ids) == 64 and lens.end == 63


# ---------------------------------------------------------------------------------------------
# Bad input: settings of NumPy scalars, saves that fail, damaged files


PLAIN = (bool, int, float, str, type(None))


def test_numpy_scalar_settings_are_stored_plain_and_saved(tiny_model, tmp_path):
    """Every argument the lens and generation accept as a NumPy scalar gives a lens that saves."""
    from gpt2np.record import generation_lens

    ids = tiny_model.encode("when people say plasma")
    tr = tiny_model.forward(ids)
    lens = logit_lens(tiny_model, tr, k=np.int64(3), start=np.int64(2), step=np.int64(2))
    plain = logit_lens(tiny_model, tr, k=3, start=2, step=2)
    assert lens.settings == plain.settings and lens.top_ids.shape[-1] == 3
    np.testing.assert_array_equal(lens.top_ids, plain.top_ids)
    _, gen = generation_lens(tiny_model, ids, 3, seed=np.int64(0), top_k=np.int64(5), temperature=np.float32(0.8))
    assert gen.settings["seed"] == 0 and gen.settings["top_k"] == 5
    assert gen.settings["temperature"] == pytest.approx(0.8)
    for made in (lens, gen):
        assert all(type(v) in PLAIN for v in made.settings.values()), made.settings
        assert type(made.start) is int and type(made.end) is int
        for name in ("g.npz", "g.json"):
            back = Lens.load(made.save(tmp_path / name))
            assert back.settings == made.settings
            np.testing.assert_array_equal(back.top_ids, made.top_ids)
    odd = dataclasses.replace(lens, settings={"a": (np.int32(1), np.bool_(True)), "b": {"c": np.str_("x")}})
    assert odd.settings == {"a": [1, True], "b": {"c": "x"}}
    assert [type(v) for v in odd.settings["a"]] == [int, bool] and type(odd.settings["b"]["c"]) is str
    with pytest.raises(TypeError, match=r"settings\['model'\].*not a plain value"):
        dataclasses.replace(lens, settings={"model": object()})


def _failing_write(monkeypatch, suffix):
    """Make the next save write half a file, then fail as a full disk would."""
    import pathlib

    def fail(*_):
        raise OSError(28, "No space left on device")

    if suffix == ".npz":
        def half(f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a zip")
            fail()
        monkeypatch.setattr(np, "savez_compressed", half)
    else:
        def half(self, data, *args, **kwargs):
            with open(self, "w") as f:
                f.write(data[:10])
            fail()
        monkeypatch.setattr(pathlib.Path, "write_text", half)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_a_failed_save_leaves_the_earlier_file_intact(tiny_model, tmp_path, monkeypatch, suffix):
    tr = tiny_model.forward(tiny_model.encode("when people say plasma"))
    path = logit_lens(tiny_model, tr, end=3).save(tmp_path / f"lens{suffix}")
    before = path.read_bytes()
    _failing_write(monkeypatch, suffix)
    with pytest.raises(OSError, match="No space left"):
        logit_lens(tiny_model, tr, start=2).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    np.testing.assert_array_equal(Lens.load(path).top_ids, logit_lens(tiny_model, tr, end=3).top_ids)


def test_a_save_over_a_file_keeps_its_permissions_and_replaces_it_whole(tiny_model, tmp_path):
    import stat

    tr = tiny_model.forward(tiny_model.encode("when people say plasma"))
    path = tmp_path / "lens.npz"
    path.write_bytes(b"old")
    path.chmod(0o640)
    logit_lens(tiny_model, tr).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert Lens.load(path).end == len(tr.ids)


def _edited_npz(path, out, **edits):
    """Copy a saved .npz with entries replaced (an array), or removed (None)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in edits.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(out, "wb") as f:
        np.savez(f, **arrays)
    return out


def test_load_names_the_damaged_field(tiny_model, tmp_path):
    tr = tiny_model.forward(tiny_model.encode("when people say plasma"))
    lens = logit_lens(tiny_model, tr, start=1, end=6)
    good = lens.save(tmp_path / "good.npz")
    meta = json.loads(str(np.load(good)["__meta__"]))
    cases = {
        "missing": (dict(top_ids=None), "field top_ids is missing"),
        "short": (dict(final_rank=lens.final_rank[:-1]), r"final_rank has shape \[3, 5\].*need \[R, W\] = \[4, 5\]"),
        "k": (dict(top_probs=lens.top_probs[..., :2]), r"top_probs has shape \[4, 5, 2\].*\[4, 5, 5\]"),
        "window": (dict(lock_in=lens.lock_in[:3]), r"lock_in has shape \[3\].*\[W\] = \[5\]"),
        "dtype": (dict(ids=lens.ids.astype(np.float64)), "ids must hold integers, got dtype float64"),
        "strings": (dict(tokens=lens.ids), "tokens must hold strings"),
        "meta": (dict(__meta__=None), "__meta__ entry .* is missing"),
        "rows": (dict(__meta__=np.array(json.dumps({**meta, "rows": meta["rows"][:-1]}))), "has shape"),
        "end": (dict(__meta__=np.array(json.dumps({**meta, "end": 99}))), "window start=1, end=99"),
        "no-settings": (dict(__meta__=np.array(json.dumps({k: v for k, v in meta.items() if k != "settings"}))),
                        "field settings is missing"),
    }
    for name, (edits, message) in cases.items():
        path = _edited_npz(good, tmp_path / f"{name}.npz", **edits)
        with pytest.raises(ValueError, match=f"cannot read {re.escape(str(path))} as a saved lens: .*{message}"):
            Lens.load(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(good.read_bytes()[:200])  # cut short
    with pytest.raises(ValueError, match="as a saved lens"):
        Lens.load(junk)

    d = lens.to_dict()
    for name, edit, message in [
        ("missing", lambda d: d.pop("entropy"), "field entropy is missing"),
        ("float-ids", lambda d: d["top_ids"][0][0].__setitem__(0, 1.5), "top_ids is not a regular array of integers"),
        ("ragged", lambda d: d["kl_final"][0].pop(), "kl_final"),
        ("text", lambda d: d["kl_input"][0].__setitem__(0, "x"), "kl_input is not a regular array of numbers"),
        ("list", lambda d: d.clear(), "field rows is missing"),
    ]:
        dd = json.loads(json.dumps(d))
        edit(dd)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dd))
        with pytest.raises(ValueError, match=f"as a saved lens: .*{message}"):
            Lens.load(path)
    (tmp_path / "array.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list, not an object"):
        Lens.load(tmp_path / "array.json")


def test_a_lens_checks_its_fields_when_made(tiny_model):
    lens = logit_lens(tiny_model, tiny_model.forward(tiny_model.encode("when people say plasma")))
    R, W = lens.final_rank.shape
    with pytest.raises(ValueError, match=rf"entropy has shape \[{R}, {W - 1}\]"):
        dataclasses.replace(lens, entropy=lens.entropy[:, 1:])
    with pytest.raises(ValueError, match="top_logits must hold floats"):
        dataclasses.replace(lens, top_logits=lens.top_ids)
    with pytest.raises(ValueError, match="rows must be a non-empty sequence"):
        dataclasses.replace(lens, rows="input")
    with pytest.raises(ValueError, match="next_prob must be a NumPy array"):
        dataclasses.replace(lens, next_prob=lens.next_prob.tolist())
    with pytest.raises(ValueError, match="start must be an integer"):
        dataclasses.replace(lens, start=0.0)


@pytest.mark.parametrize("impl", ["definition", "public"])
def test_a_trace_from_another_model_is_refused(make_checkpoint, tiny_model, impl):
    lens_of = definition.logit_lens if impl == "definition" else logit_lens
    ids = [1, 2, 3, 4, 5]
    for fields_ in (dict(n_embd=36), dict(n_layer=2)):  # another width, another depth
        other = gpt2np.load(make_checkpoint(**fields_))
        with pytest.raises(ValueError, match=r"the trace comes from another model: its streams have shape .*"
                                             r"make the trace with this model's forward"):
            lens_of(tiny_model, other.forward(ids))
    bigger = gpt2np.load(make_checkpoint(vocab_size=500))  # the same width and depth, a larger vocabulary
    with pytest.raises(ValueError, match=r"another model: its token id 450 at position 1 is outside this model's "
                                         r"vocabulary \[0, 400\)"):
        lens_of(tiny_model, bigger.forward([7, 450, 3]))
    full, short = tiny_model.forward(ids, sublayers=True), tiny_model.forward(ids[:3], sublayers=True)
    with pytest.raises(ValueError, match=r"resid_mid has shape \[3, 3, 48\], but its streams \[4, 5, 48\] need "
                                         r"\[3, 5, 48\]"):
        lens_of(tiny_model, dataclasses.replace(full, resid_mid=short.resid_mid), sublayers=True)
    with pytest.raises(ValueError, match=r"the trace's ids \(shape \[3\], dtype int64\) are not the 5 integer token ids"):
        lens_of(tiny_model, dataclasses.replace(full, ids=short.ids))
