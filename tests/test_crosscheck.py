"""Cross-check against transformers' GPT2LMHeadModel on random weights, through the real loader.

Each case writes a random checkpoint folder (scripts/make_checkpoint.py, plain safetensors.numpy),
loads it with ``gpt2np.load(folder)`` and with ``GPT2LMHeadModel.from_pretrained(folder)`` (eager
attention, float32), runs both on the same ids and compares the logits and every hidden state.

Convention: transformers' ``output_hidden_states`` returns L+1 arrays. ``hidden_states[0]`` is the
embedding and ``hidden_states[i]`` for 0 < i < L the output of block i-1: these equal gpt2np's
``resid[i]``. But ``hidden_states[L]`` has ``ln_f`` already applied (the raw last stream is never
returned), so it is compared with ``ln_f(resid[L])``, not with ``resid[L]``.

Tolerances are relative: max |gpt2np - transformers| / max |transformers|, both in float32, for the
logits and for each hidden state: < 1e-5 (REL_TOL) in every case with residuals up to about 30
(measured: at most 9e-7). At GPT-2's own magnitudes (residuals near 300, logits near 100) float32
itself is the limit: transformers in float32 is about 1e-5 from transformers in float64, and so is
gpt2np (measured 9e-6 and 1.05e-5; the two differ by 9.5e-6), so that case allows 5e-5. In every case
gpt2np must also be at least as close to the float64 reference as transformers' float32 run is
(within a factor 2 plus 1e-6): float32 precision, not just agreement. The argmax of the logits must
agree wherever the top two reference logits are not tied within the tolerance.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import gpt2np
from gpt2np.config import Config
from gpt2np.model import layer_norm

REL_TOL = 1e-5
REL_TOL_GPT2_MAGNITUDES = 5e-5

# (id, config, layout, untied_head, scale, T): T=None means the full context (n_positions)
CASES = [
    ("odd-heads", Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400), "official", False, 1.0, 29),
    ("five-heads-n_inner-full-context-scale10",
     Config(n_layer=3, n_head=5, n_embd=80, n_positions=64, vocab_size=300, n_inner=100), "official", False, 10.0, None),
    ("head64-full-context-128-scale30",  # logits near 25, as in GPT-2
     Config(n_layer=2, n_head=2, n_embd=128, n_positions=128, vocab_size=512), "official", False, 30.0, None),
    ("gpt2-magnitudes-scale100",  # residuals near 300, as in GPT-2 (logits near 100)
     Config(n_layer=4, n_head=2, n_embd=128, n_positions=128, vocab_size=512), "official", False, 100.0, None),
    ("single-token", Config(n_layer=2, n_head=1, n_embd=16, n_positions=32, vocab_size=260), "official", False, 1.0, 1),
    ("hf-odd-heads-full-context", Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400),
     "hf", False, 1.0, None),
    ("hf-five-heads-scale10", Config(n_layer=4, n_head=5, n_embd=40, n_positions=64, vocab_size=350, n_inner=72),
     "hf", False, 10.0, 40),
    ("hf-untied-head", Config(n_layer=2, n_head=3, n_embd=48, n_positions=64, vocab_size=400), "hf", True, 1.0, 64),
    ("hf-untied-head-scale10", Config(n_layer=3, n_head=5, n_embd=80, n_positions=64, vocab_size=400, n_inner=160),
     "hf", True, 10.0, 50),
]


def ln_f64(x, params, eps):
    x = np.asarray(x, np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * params.ln_f_weight + params.ln_f_bias


def compare(tr, params, logits, hidden, eps, relative_error) -> dict[str, float]:
    """Relative errors of a gpt2np trace against a reference's logits and hidden_states."""
    L = hidden.shape[0] - 1
    errors = {"logits": relative_error(tr.logits, logits)}
    for i in range(L):  # hidden_states[i] == resid[i] for i < L
        errors[f"hidden[{i}]"] = relative_error(tr.resid[i], hidden[i])
    # hidden_states[L] is ln_f(last stream): transformers applies ln_f before returning it
    errors[f"hidden[{L}]"] = relative_error(ln_f64(tr.resid[L], params, eps), hidden[L])
    errors[f"hidden[{L}] (gpt2np's layer_norm)"] = relative_error(
        layer_norm(tr.resid[L], params.ln_f_weight, params.ln_f_bias, eps), hidden[L])
    return errors


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(case, make_checkpoint, reference_model, reference_run, relative_error):
    name, config, layout, untied, scale, T = case
    tol = REL_TOL_GPT2_MAGNITUDES if scale >= 100 else REL_TOL
    folder = make_checkpoint(config, layout=layout, seed=len(name), scale=scale, untied_head=untied)
    ours = gpt2np.load(folder)
    assert ours.config == replace(config, tie_word_embeddings=not untied)
    assert (ours.params.lm_head_weight is not None) == untied
    ref = reference_model(folder)

    T = T or config.n_positions
    rng = np.random.default_rng(T)
    ids = rng.integers(0, config.vocab_size, T)
    ids[0], ids[-1] = config.vocab_size - 1, 0  # <|endoftext|> and the first byte token
    tr = ours.forward(ids)
    ref_logits, ref_hidden = reference_run(ref, ids)
    L, eps = config.n_layer, config.layer_norm_epsilon
    assert ref_hidden.shape == (L + 1, T, config.n_embd)

    errors = compare(tr, ours.params, ref_logits, ref_hidden, eps, relative_error)
    worst = max(errors, key=errors.get)
    print(f"\n{name} ({layout}{', untied' if untied else ''}, T={T}): max |logit| {np.abs(ref_logits).max():.3g}, "
          f"max |resid| {np.abs(ref_hidden[:L]).max():.3g}; worst relative error {errors[worst]:.2e} ({worst})")
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"

    # float32 precision: gpt2np is as close to a float64 run as transformers' float32 run is
    logits64, hidden64 = reference_run(ref.double(), ids)
    ours64 = compare(tr, ours.params, logits64, hidden64, eps, relative_error)
    ref_own = {"logits": relative_error(ref_logits, logits64)}
    ref_own |= {f"hidden[{i}]": relative_error(ref_hidden[i], hidden64[i]) for i in range(L + 1)}
    print(f"  logits vs transformers in float64: gpt2np {ours64['logits']:.2e}, "
          f"transformers in float32 {ref_own['logits']:.2e}")
    worse = {k: f"{ours64[k]:.2e} vs {v:.2e}" for k, v in ref_own.items() if not ours64[k] <= 2 * v + 1e-6}
    assert not worse, f"gpt2np is less precise than transformers in float32 (error vs float64): {worse}"

    # the last hidden state really is ln_f(resid[L]): resid[L] itself is far from it
    assert relative_error(tr.resid[L], ref_hidden[L]) > 1e-2
    # greedy predictions agree wherever the reference's top two are not tied within the tolerance
    top2 = np.sort(ref_logits, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 10 * tol * np.abs(ref_logits).max()
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(tr.logits.argmax(-1)[clear], ref_logits.argmax(-1)[clear])


def test_sublayers_match_transformers_blocks(make_checkpoint, reference_model, torch, relative_error):
    """resid_mid, attn_out, mlp_out and the attention patterns against transformers' own modules."""
    config = Config(n_layer=2, n_head=3, n_embd=48, n_positions=64, vocab_size=400)
    folder = make_checkpoint(config, layout="hf", seed=11, scale=10.0)
    ours, ref = gpt2np.load(folder), reference_model(folder)
    ids = np.random.default_rng(0).integers(0, 400, 37)
    tr = ours.forward(ids, sublayers=True, patterns=True)
    # capture each reference sub-block's output with torch hooks (the reference's own machinery)
    got: dict[str, list] = {"attn": [], "mlp": []}
    hooks = [m.register_forward_hook(lambda mod, args, out, key=key: got[key].append(
        (out[0] if isinstance(out, tuple) else out)[0].double().numpy()))
        for block in ref.transformer.h for key, m in (("attn", block.attn), ("mlp", block.mlp))]
    try:
        with torch.no_grad():
            out = ref(torch.as_tensor(ids)[None], output_hidden_states=True, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    assert len(got["attn"]) == len(got["mlp"]) == config.n_layer
    for l in range(config.n_layer):
        assert relative_error(tr.attn_out[l], got["attn"][l]) < REL_TOL
        assert relative_error(tr.resid_mid[l], out.hidden_states[l][0].double().numpy() + got["attn"][l]) < REL_TOL
        assert relative_error(tr.mlp_out[l], got["mlp"][l]) < REL_TOL
        assert relative_error(tr.pattern[l], out.attentions[l][0].double().numpy()) < REL_TOL


def test_greedy_continuation_matches_transformers(make_checkpoint, reference_model, torch):
    """minGPT's check: 20 greedy tokens, each from a full forward pass, identical to transformers'."""
    config = Config(n_layer=2, n_head=3, n_embd=48, n_positions=64, vocab_size=400)
    folder = make_checkpoint(config, layout="official", seed=5, scale=10.0)
    ours, ref = gpt2np.load(folder), reference_model(folder)
    ids = list(ours.encode("The logit lens"))
    ref_ids = list(ids)
    for _ in range(20):
        ids.append(int(ours.forward(ids).logits[-1].argmax()))
        with torch.no_grad():
            ref_ids.append(int(ref(torch.as_tensor([ref_ids])).logits[0, -1].argmax()))
    assert ids == ref_ids
