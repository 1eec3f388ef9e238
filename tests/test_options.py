"""config.json options that change the arithmetic: implemented ones against transformers, the rest refused.

transformers' GPT2Attention multiplies the scores by ``head_dim ** -0.5`` (``scale_attn_weights``, on by
default) and divides them by ``layer_idx + 1`` (``scale_attn_by_inverse_layer_idx``). Each case runs
every path that computes attention (the plain forward, the fast forward, the KV cache of generation,
the lens's decoder blocks) against transformers on the same random checkpoint, and also checks that
ignoring the option would have been caught (GPT-2's plain arithmetic is far from the reference).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

import gpt2np
from gpt2np import cli
from gpt2np import generate as G
from gpt2np import model as M
from gpt2np.config import TANH_GELU, Config

REL_TOL = 1e-5
BASE = Config(n_layer=4, n_head=2, n_embd=32, n_positions=48, vocab_size=300)
CASES = {
    "inverse-layer-idx": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled": dict(scale_attn_weights=False),
    "both": dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
}


def rewrite_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, make_checkpoint, reference_model):
    config = replace(BASE, **CASES[request.param])
    folder = make_checkpoint(config, layout="hf", seed=9, scale=3.0)
    return gpt2np.load(folder), reference_model(folder)


def test_the_options_reach_the_model(case):
    ours, ref = case
    for k, v in ours.config.options.items():
        assert getattr(ref.config, k) == v  # transformers read the same options from config.json


def test_forward_matches_transformers(case, reference_run, relative_error):
    ours, ref = case
    ids = np.random.default_rng(0).integers(0, BASE.vocab_size, 40)
    logits, hidden = reference_run(ref, ids)
    fast = ours.forward(ids)
    plain = M.forward(ours.params, ours.config, ids)
    for tr in (fast, plain):
        assert relative_error(tr.logits, logits) < REL_TOL
        for i in range(BASE.n_layer):  # hidden_states[i] == resid[i] for i < L
            assert relative_error(tr.resid[i], hidden[i]) < REL_TOL
    # the test can fail: GPT-2's own scaling is far from this checkpoint's arithmetic
    plain_gpt2 = M.forward(ours.params, replace(ours.config, **{k: getattr(BASE, k) for k in ours.config.options}),
                           ids)
    assert relative_error(plain_gpt2.logits, logits) > 1e-3


def test_generation_with_the_cache_matches_transformers(case, torch, relative_error):
    """The KV cache's logits (prefill, then one step per token) equal transformers' on the whole sequence;
    greedy tokens are transformers' argmax; the scores agree."""
    ours, ref = case
    prompt = [5, 17, 250, 3]
    got = [int(t) for t in ours.generate(prompt, 15, temperature=0)]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            ids.append(int(ref(torch.as_tensor([ids])).logits[0, -1].argmax()))
        ref_logits = ref(torch.as_tensor([ids])).logits[0].double().numpy()  # [T, V]
    assert got == ids[len(prompt):]
    logits, cache = G.prefill(ours.params, ours.config, np.asarray(prompt))
    cached = [logits]
    for t in ids[len(prompt):-1]:
        logits, cache = G.step(ours.params, ours.config, cache, t)
        cached.append(logits)
    assert relative_error(np.stack(cached), ref_logits[len(prompt) - 1:-1]) < REL_TOL
    ref_lp = ref_logits - np.log(np.exp(ref_logits - ref_logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - ref_logits.max(-1, keepdims=True)
    assert relative_error(ours.score(ids), ref_lp[np.arange(len(ids) - 1), ids[1:]]) < REL_TOL


def test_lens_decoder_blocks_match_transformers(case, reference_run, relative_error):
    """The decoder's blocks run at their own layer index: the last shown row, read through the last two
    blocks, is the model's output."""
    ours, ref = case
    ids = np.random.default_rng(1).integers(0, BASE.vocab_size, 30)
    logits, _ = reference_run(ref, ids)
    for lens_fn in (gpt2np.logit_lens, gpt2np.lens.logit_lens):
        lens = lens_fn(ours, ours.forward(ids), k=3, decoder_blocks=2)
        assert lens.rows[-1] == str(BASE.n_layer - 3)
        assert relative_error(lens.top_logits[-1], np.sort(logits, -1)[:, ::-1][:, :3]) < REL_TOL


def test_reorder_and_upcast_attn_is_the_same_arithmetic_in_float32(make_checkpoint, copy_checkpoint,
                                                                   reference_model, reference_run, relative_error):
    """transformers' reordered, upcast attention (float16 training) is the same product in float32."""
    folder = copy_checkpoint(make_checkpoint(BASE, layout="hf", seed=4, scale=3.0))
    rewrite_config(folder, reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    ours, ref = gpt2np.load(folder), reference_model(folder)
    assert ref.config.reorder_and_upcast_attn
    ids = np.random.default_rng(2).integers(0, BASE.vocab_size, 40)
    logits, _ = reference_run(ref, ids)
    assert relative_error(ours.forward(ids).logits, logits) < REL_TOL


@pytest.mark.parametrize("act", [a for a in TANH_GELU if a != "gelu_new"])
def test_other_names_of_the_tanh_gelu(act, torch, transformers, make_checkpoint, copy_checkpoint, reference_model,
                                      reference_run, relative_error):
    """transformers' gelu_pytorch_tanh, gelu_fast and gelu_python_tanh are GPT-2's formula (to float32
    rounding); a checkpoint naming one loads and matches transformers running that very function."""
    from transformers.activations import ACT2FN

    x = torch.linspace(-12, 12, 200001, dtype=torch.float32)
    new, other = ACT2FN["gelu_new"](x).double(), ACT2FN[act](x).double()
    assert float((new - other).abs().max()) < 4 * np.finfo(np.float32).eps * 12
    assert relative_error(M.gelu_new(x.numpy()), other.numpy()) < 1e-6
    folder = copy_checkpoint(make_checkpoint(BASE, layout="hf", seed=6, scale=3.0))
    rewrite_config(folder, activation_function=act)
    ours, ref = gpt2np.load(folder), reference_model(folder)
    ids = np.random.default_rng(3).integers(0, BASE.vocab_size, 40)
    logits, _ = reference_run(ref, ids)
    assert relative_error(ours.forward(ids).logits, logits) < REL_TOL


@pytest.mark.parametrize("change,named", [
    ({"activation_function": "gelu"}, 'activation_function="gelu"'),
    ({"activation_function": "relu"}, 'activation_function="relu"'),
    ({"activation_function": "silu"}, 'activation_function="silu"'),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"is_causal": False}, "is_causal=false"),
    ({"model_type": "gpt_neo"}, 'model_type="gpt_neo"'),
    ({"quantization_config": {"load_in_8bit": True}}, 'quantization_config={"load_in_8bit": true}'),
    ({"scale_attn_weights": "yes"}, 'scale_attn_weights="yes" must be true or false'),
])
def test_options_not_implemented_are_refused(change, named, tiny_checkpoint, copy_checkpoint, capsys):
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_config(folder, **change)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("{", r"\{")):
        gpt2np.load(folder)
    assert cli.main(["info", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "[does not load:" in out and named.split("=")[0] in out and "[complete]" not in out
    assert f"options     {next(iter(change))}=" in out


def test_an_untied_config_needs_its_head(tiny_checkpoint, copy_checkpoint):
    """tie_word_embeddings=false without lm_head.weight: transformers would start the head at random."""
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_config(folder, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="has no lm_head.weight, but config.json says tie_word_embeddings=false"):
        gpt2np.load(folder)


def test_info_shows_the_options(make_checkpoint, tiny_checkpoint, copy_checkpoint, capsys):
    folder = make_checkpoint(replace(BASE, **CASES["both"]), layout="hf", seed=9, scale=3.0)
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "[complete]" in out
    assert "options     scale_attn_weights=false  scale_attn_by_inverse_layer_idx=true" in out
    assert cli.main(["info", str(tiny_checkpoint)]) == 0
    assert "options     none: the arithmetic of GPT-2 itself" in capsys.readouterr().out
    folder = copy_checkpoint(tiny_checkpoint)
    rewrite_config(folder, activation_function="gelu_fast", layer_norm_epsilon=1e-6, reorder_and_upcast_attn=True)
    assert cli.main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert 'activation_function="gelu_fast"  layer_norm_epsilon=1e-06' in out and "reorder_and_upcast_attn=true" in out
    shutil.rmtree(folder)
