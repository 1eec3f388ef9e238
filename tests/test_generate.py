"""Generation and scoring: KV-cache decoding against full recomputation and transformers; sampling
filters checked against hand-computed distributions; reproducibility; the context rule.

Checkpoints are tiny random models written here with scripts/make_checkpoint.py (3 blocks, width 48,
3 heads, vocabulary 400, 64 positions), so the whole file runs in seconds.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_checkpoint import write_checkpoint  # noqa: E402

import gpt2np  # noqa: E402
from gpt2np import generate as G  # noqa: E402
from gpt2np.model import forward as plain_forward  # noqa: E402  (Model.forward runs fast.py)
from gpt2np.config import Config  # noqa: E402

TINY = Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400)
PROMPT = np.array([12, 40, 7, 300, 250, 9, 77], dtype=np.int64)


def rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> gpt2np.Model:
    """Official layout, head tied to wte. Greedy decoding of such a random model repeats one token."""
    return gpt2np.load(write_checkpoint(tmp_path_factory.mktemp("gen-tied"), TINY, seed=0))


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> gpt2np.Model:
    """transformers layout with a separate random head: its greedy continuations vary (31 distinct
    tokens in 50), which makes the comparison with transformers' generate meaningful."""
    folder = write_checkpoint(tmp_path_factory.mktemp("gen-untied"), TINY, layout="hf", seed=1, scale=3.0,
                              untied_head=True)
    return gpt2np.load(folder)


@pytest.fixture(params=["tied", "untied"])
def any_model(request) -> gpt2np.Model:
    return request.getfixturevalue(request.param)


def reference(model: gpt2np.Model):
    """transformers' GPT2LMHeadModel on the same folder (eager attention, float32, eval mode)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(model.path), attn_implementation="eager",
                                                      dtype=torch.float32).eval()
    return torch, hf


# ---------------------------------------------------------------------------------------------
# The KV cache


def test_prefill_equals_forward(any_model):
    m = any_model
    logits, cache, resid, mid = G.prefill(m.params, m.config, PROMPT, keep_resid=True)
    tr = plain_forward(m.params, m.config, np.asarray(PROMPT), sublayers=True)  # the plain operations
    L, H, d = m.config.n_layer, m.config.n_head, m.config.d_head
    assert logits.shape == (m.config.vocab_size,)
    assert resid.shape == (L + 1, len(PROMPT), m.config.n_embd) and mid.shape == (L, len(PROMPT), m.config.n_embd)
    assert cache.length == len(PROMPT) and len(cache.kv) == L
    assert all(k.shape == v.shape == (H, len(PROMPT), d) for k, v in cache.kv)
    assert rel_err(logits, tr.logits[-1]) < 1e-6
    np.testing.assert_array_equal(resid, tr.resid)  # the same operations in the same order
    np.testing.assert_array_equal(mid, tr.resid_mid)


def test_cached_decoding_equals_full_recomputation(any_model):
    """At every step up to the full context: the cached logits, residual rows and resid_mid rows equal
    the last row of a forward pass over the whole sequence so far."""
    m = any_model
    rng = np.random.default_rng(0)
    seq = list(PROMPT)
    logits, cache = G.prefill(m.params, m.config, PROMPT)
    while len(seq) < m.config.n_positions:
        token = int(rng.integers(m.config.vocab_size))  # any token: the cache must not care
        seq.append(token)
        logits, cache, resid, mid = G.step(m.params, m.config, cache, token, keep_resid=True)
        tr = m.forward(np.array(seq), sublayers=True)
        assert cache.length == len(seq)
        assert resid.shape == (m.config.n_layer + 1, 1, m.config.n_embd)
        assert rel_err(logits, tr.logits[-1]) < 1e-5, len(seq)
        assert rel_err(resid, tr.resid[:, -1:]) < 1e-5, len(seq)
        assert rel_err(mid, tr.resid_mid[:, -1:]) < 1e-5, len(seq)
    with pytest.raises(ValueError, match="whole context of 64"):
        G.step(m.params, m.config, cache, 0)


def test_step_leaves_the_cache_unchanged(tied):
    m = tied
    _, cache = G.prefill(m.params, m.config, PROMPT)
    a, c1 = G.step(m.params, m.config, cache, 5)
    G.step(m.params, m.config, cache, 6)  # a second branch from the same cache
    b, c2 = G.step(m.params, m.config, cache, 5)
    assert cache.length == len(PROMPT) and c1.length == c2.length == len(PROMPT) + 1
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Against transformers


def test_greedy_50_tokens_match_transformers(any_model):
    m = any_model
    torch, hf = reference(m)
    hf.generation_config.eos_token_id = None  # generate exactly 50 tokens, like ours
    hf.generation_config.pad_token_id = 0
    ours = m.generate(PROMPT, 50, temperature=0)
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(PROMPT)[None], attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=50, do_sample=False)
    theirs = out[0, len(PROMPT):].numpy()
    assert ours.dtype == np.int64 and ours.shape == (50,)
    np.testing.assert_array_equal(ours, theirs)


def test_untied_greedy_is_not_degenerate(untied):
    assert len(set(untied.generate(PROMPT, 50, temperature=0).tolist())) > 10


def test_score_matches_transformers_log_softmax(any_model):
    m = any_model
    torch, hf = reference(m)
    ids = np.concatenate([PROMPT, np.random.default_rng(1).integers(0, m.config.vocab_size, 40)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.as_tensor(ids)[None]).logits[0].double(), dim=-1)  # [T, V]
        want = logp[:-1].gather(1, torch.as_tensor(ids[1:])[:, None])[:, 0].numpy()
        xent = torch.nn.functional.cross_entropy(hf(torch.as_tensor(ids)[None]).logits[0, :-1].double(),
                                                 torch.as_tensor(ids[1:])).item()
    got = m.score(ids)
    assert got.dtype == np.float64 and got.shape == (len(ids) - 1,)
    assert np.max(np.abs(got - want)) < 1e-5
    mean_xent, ppl = G.perplexity(got)
    assert mean_xent == pytest.approx(xent, rel=1e-6)
    assert ppl == pytest.approx(np.exp(xent), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Scoring


def test_score_is_a_log_softmax_of_the_forward_logits(tied):
    m = tied
    z = plain_forward(m.params, m.config, np.asarray(PROMPT)).logits.astype(np.float64)  # [T, V]
    want = z[np.arange(len(PROMPT) - 1), PROMPT[1:]] - np.log(np.exp(z[:-1]).sum(-1))
    np.testing.assert_allclose(m.score(PROMPT), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(m.score(PROMPT), G.score(m.params, m.config, PROMPT))


def test_perplexity_definition():
    lp = np.log([0.5, 0.25, 0.125])
    xent, ppl = G.perplexity(lp)
    assert xent == pytest.approx(2 * np.log(2))  # mean of log 2, log 4, log 8
    assert ppl == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least two tokens"):
        G.perplexity(np.zeros(0))


def test_score_of_one_token_is_empty(tied):
    assert tied.score([5]).shape == (0,)


# ---------------------------------------------------------------------------------------------
# Sampling: the distribution, filters, seeds


P5 = np.array([1 / 16, 1 / 2, 1 / 8, 1 / 4, 1 / 16])  # exact binary fractions: sums are exact


def probs_of(p, **kw):
    return G.next_token_probs(np.log(p), **kw)


@pytest.mark.parametrize("kw, want", [
    ({}, P5),
    (dict(top_k=1), [0, 1, 0, 0, 0]),
    (dict(top_k=2), [0, 2 / 3, 0, 1 / 3, 0]),
    (dict(top_k=4), np.array([1 / 16, 1 / 2, 1 / 8, 1 / 4, 0]) / (15 / 16)),  # tie at 1/16: lower id kept
    (dict(top_k=400), P5),
    (dict(top_p=1e-9), [0, 1, 0, 0, 0]),
    (dict(top_p=0.5), [0, 1, 0, 0, 0]),  # 1/2 already reaches 0.5
    (dict(top_p=0.6), [0, 2 / 3, 0, 1 / 3, 0]),
    (dict(top_p=0.75), [0, 2 / 3, 0, 1 / 3, 0]),  # exactly reached by the two largest
    (dict(top_p=0.8), np.array([0, 1 / 2, 1 / 8, 1 / 4, 0]) / (7 / 8)),
    (dict(top_p=1.0), P5),
    # top-k first, then top-p on the renormalised survivors: [4/7, 2/7, 1/7] reaches 0.8 with two
    (dict(top_k=3, top_p=0.8), [0, 2 / 3, 0, 1 / 3, 0]),
    (dict(temperature=0.5), P5 ** 2 / np.sum(P5 ** 2)),
    (dict(temperature=2.0), np.sqrt(P5) / np.sum(np.sqrt(P5))),
    (dict(temperature=0), [0, 1, 0, 0, 0]),
    (dict(temperature=0, top_k=3, top_p=0.1), [0, 1, 0, 0, 0]),
])
def test_next_token_probs_exact(kw, want):
    got = probs_of(P5, **kw)
    assert got.dtype == np.float64 and got.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_greedy_ties_go_to_the_lower_id():
    np.testing.assert_array_equal(G.next_token_probs(np.array([1.0, 3.0, 3.0]), temperature=0), [0, 1, 0])
    assert G.pick(np.array([1.0, 3.0, 3.0]), np.random.default_rng(0), temperature=0) == 1


@pytest.mark.parametrize("seed", range(5))
def test_top_k_keeps_exactly_k_with_ties_broken_by_lower_id(seed):
    """Many equal logits: the kept set is the first k of a stable sort by decreasing probability."""
    logits = np.random.default_rng(seed).integers(0, 4, 30).astype(np.float64)
    order = np.argsort(-logits, kind="stable")
    for k in range(1, 31):
        assert set(np.flatnonzero(G.next_token_probs(logits, top_k=k))) == set(order[:k].tolist()), k


@pytest.mark.parametrize("seed", range(20))
def test_top_p_keeps_the_smallest_set_reaching_p(seed):
    """Against the definition, by brute force over every subset of a 7-token vocabulary."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=7) * 2
    top_p = float(rng.uniform(0.05, 1.0))
    p = np.exp(logits - logits.max())
    p /= p.sum()
    sets = (set(s) for n in range(1, 8) for s in itertools.combinations(range(7), n) if p[list(s)].sum() >= top_p)
    smallest = min(sets, key=lambda s: (len(s), -p[list(s)].sum()))  # the top tokens: the most mass
    got = G.next_token_probs(logits, top_p=top_p)
    assert set(np.flatnonzero(got)) == smallest
    np.testing.assert_allclose(got[list(smallest)], p[list(smallest)] / p[list(smallest)].sum(), rtol=1e-12)


# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one in 1000
# seeds; the seeds are fixed, so the test is deterministic.
CHI2_999 = {3: 16.266, 5: 20.515}


@pytest.mark.parametrize("kw, df", [({}, 5), (dict(temperature=1.5, top_k=4), 3)])
def test_pick_draws_follow_the_probabilities(kw, df):
    logits = np.log([0.3, 0.05, 0.2, 0.15, 0.1, 0.2])
    want = G.next_token_probs(logits, **kw)
    rng = np.random.default_rng(123)
    n = 20_000
    counts = np.bincount([G.pick(logits, rng, **kw) for _ in range(n)], minlength=6)
    kept = want > 0
    assert counts[~kept].sum() == 0  # filtered tokens never drawn
    chi2 = float(np.sum((counts[kept] - n * want[kept]) ** 2 / (n * want[kept])))
    assert kept.sum() - 1 == df and chi2 < CHI2_999[df], chi2


def test_sampled_generation_draws_from_the_model_probabilities(untied):
    """generate(seed=s) equals a by-hand loop that recomputes the whole sequence each step and draws with
    the same generator from ``next_token_probs`` of its logits: the tokens come from the model's own
    filtered distribution, and the cache changes nothing."""
    m = untied
    kw = dict(temperature=0.8, top_k=50, top_p=0.9)
    got = m.generate(PROMPT, 30, seed=7, **kw)
    rng, seq = np.random.default_rng(7), list(PROMPT)
    for _ in range(30):
        probs = G.next_token_probs(m.forward(np.array(seq)).logits[-1], **kw)
        seq.append(int(rng.choice(len(probs), p=probs)))
    np.testing.assert_array_equal(got, seq[len(PROMPT):])


def test_seed_reproducibility(untied):
    m = untied
    a = m.generate(PROMPT, 20, seed=3)
    np.testing.assert_array_equal(a, m.generate(PROMPT, 20, seed=3))
    assert not np.array_equal(a, m.generate(PROMPT, 20, seed=4))
    assert m.generate(PROMPT, 20).shape == (20,)  # seed=None: fresh entropy


def test_stream_yields_the_same_tokens_one_at_a_time(untied):
    m = untied
    s = m.stream(PROMPT, 12, seed=5, top_k=20)
    first = next(s)
    assert isinstance(first, int)
    np.testing.assert_array_equal([first, *s], m.generate(PROMPT, 12, seed=5, top_k=20))


def test_stop_at_eot(untied):
    m = untied
    full = m.generate(PROMPT, 20, temperature=0)
    eot = int(full[5])
    i = int(np.flatnonzero(full == eot)[0])
    got = G.generate(m.params, m.config, PROMPT, 20, temperature=0, stop_at_eot=True, eot_id=eot)
    np.testing.assert_array_equal(got, full[:i + 1])  # the end token is kept
    np.testing.assert_array_equal(G.generate(m.params, m.config, PROMPT, 20, temperature=0, eot_id=eot), full)


# ---------------------------------------------------------------------------------------------
# The context rule and argument checks


def test_context_limit(tied):
    m = tied
    ids = np.arange(60)
    assert m.generate(ids, 4, seed=0).shape == (4,)  # prompt + new tokens == n_positions: allowed
    with pytest.raises(ValueError, match="at most 4 new tokens can be generated"):
        m.generate(ids, 5)
    with pytest.raises(ValueError, match="at most 4 new tokens"):
        m.stream(ids, 5)  # raised when called, before any token is asked for
    with pytest.raises(ValueError, match="context of 64"):
        m.generate(np.arange(65) % 400, 1)  # the prompt alone is too long
    assert m.generate(np.arange(64), 0).shape == (0,)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_are_rejected_before_running(tied, kw, match):
    n = kw.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        tied.stream(PROMPT, n, **kw)


def test_ids_are_checked(tied):
    with pytest.raises(TypeError, match="integers"):
        tied.generate(np.array([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tied.score([1, 400])
    with pytest.raises(ValueError, match="one sequence"):
        tied.score(PROMPT[None])


# ---------------------------------------------------------------------------------------------
# Backend-clean: the same code on array_api_strict, with implicit conversions to NumPy refused


def test_generate_and_score_run_on_the_array_api_alone(untied):
    pytest.importorskip("array_api_strict")
    from _strict import host_conversion_blocked, is_strict, strict_model

    m = untied
    sm = strict_model(m)
    with host_conversion_blocked():
        greedy = sm.generate(PROMPT, 10, temperature=0)
        sampled = sm.generate(PROMPT, 10, seed=2, top_k=30, top_p=0.9)
        logprobs = sm.score(PROMPT)
        logits, cache, resid, _ = G.prefill(sm.params, sm.config, sm.params.wte.__array_namespace__().asarray(PROMPT),
                                            keep_resid=True)
    assert is_strict(logits) and is_strict(resid) and is_strict(cache.kv[0][0])
    np.testing.assert_array_equal(greedy, m.generate(PROMPT, 10, temperature=0))
    np.testing.assert_array_equal(sampled, m.generate(PROMPT, 10, seed=2, top_k=30, top_p=0.9))
    np.testing.assert_allclose(logprobs, m.score(PROMPT), rtol=1e-6, atol=1e-6)


def test_generate_benchmark_runs(untied):
    """scripts/bench_generate.py's function on the tiny model: it runs and the two agree."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bench_generate import bench_generate, table

    r = bench_generate(untied.path, n_new=4, repeats=1)
    assert r["same_tokens"] and r["new_tokens"] == 4
    assert r["gpt2np"]["tokens_per_s"] > 0 and r["transformers"]["tokens_per_s"] > 0
    assert "tokens/s" in table(r)


# ---------------------------------------------------------------------------------------------
# Arguments of the wrong type: a TypeError naming the argument, before anything runs


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=None), r"temperature=None must be a number >= 0 .*not NoneType"),
    (dict(temperature="0.5"), r"temperature='0.5' must be a number >= 0 .*not str"),
    (dict(temperature=True), r"temperature=True must be a number"),
    (dict(top_k="5"), r"top_k='5' must be a whole number >= 1 or None .*not str"),
    (dict(top_k=[5]), r"top_k=\[5\] must be a whole number"),
    (dict(top_p="0.9"), r"top_p='0.9' must be a number in \(0, 1\] or None .*not str"),
    (dict(max_new_tokens="3"), r"max_new_tokens='3' must be a whole number >= 0, not str"),
    (dict(max_new_tokens=None), r"max_new_tokens=None must be a whole number"),
    (dict(seed="0"), r"seed='0' must be a whole number >= 0 or None"),
    (dict(seed=1.5), r"seed=1.5 must be a whole number >= 0 or None"),
])
def test_arguments_of_the_wrong_type_are_named(tied, kw, match):
    from gpt2np.record import record

    n = kw.pop("max_new_tokens", 3)
    for make in (tied.stream, tied.generate, lambda *a, **k: record(tied, *a, **k)):
        with pytest.raises(TypeError, match=match):
            make(PROMPT, n, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(seed=-1), r"seed=-1 must be a whole number >= 0"),
    (dict(seed=np.int64(-3)), r"seed=-3 must be a whole number >= 0"),
    (dict(top_k=float("inf")), r"top_k=inf must be a whole number >= 1"),
    (dict(max_new_tokens=float("nan")), r"max_new_tokens=nan must be a whole number >= 0"),
])
def test_out_of_range_values_are_named(tied, kw, match):
    n = kw.pop("max_new_tokens", 3)
    with pytest.raises(ValueError, match=match):
        tied.stream(PROMPT, n, **kw)


def test_numpy_numbers_and_generators_are_accepted(tied):
    want = tied.generate(PROMPT, 4, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    got = tied.generate(PROMPT, np.int64(4), temperature=np.float32(0.8), top_k=np.int64(5), top_p=np.float64(0.9),
                        seed=np.int64(3))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tied.generate(PROMPT, 4, seed=np.random.SeedSequence(3)),
                                  tied.generate(PROMPT, 4, seed=3))
