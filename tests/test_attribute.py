"""The decomposition of the residual stream and direct logit attribution (gpt2np/attribute.py).

Golden values come from transformers' own intermediate values on the same checkpoint (its embedding
modules, each block's attention and MLP outputs and the input of each c_proj, captured with torch hooks
in the reference only), combined in float64 by the convention the module states; never from gpt2np's
arrays. The sums are held against the model's own logits (gpt2np's and transformers').
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import gpt2np
from gpt2np import cli
from gpt2np.attribute import Attribution, attribute, decompose, find_row
from gpt2np.config import Config

F32 = float(np.finfo(np.float32).eps)
CONFIG = Config(n_layer=3, n_head=3, n_embd=48, n_positions=64, vocab_size=400)


@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, make_checkpoint, reference_model):
    """(gpt2np model, transformers model) on one random checkpoint, tied and untied head."""
    untied = request.param == "untied"
    folder = make_checkpoint(CONFIG, layout="hf" if untied else "official", seed=3, scale=10.0, untied_head=untied)
    return gpt2np.load(folder), reference_model(folder)


def reference_parts(ref, torch, ids):
    """transformers' own values, float64: wte[ids], wpe[pos], per block attn / mlp outputs, per-head
    outputs (c_proj's input split by head, times c_proj's rows), the final stream, and the logits."""
    got = {"attn": [], "mlp": [], "z": [], "final": []}
    h = ref.transformer.h
    hooks = [blk.attn.register_forward_hook(lambda m, a, out: got["attn"].append(out[0][0].detach().double().numpy()))
             for blk in h]
    hooks += [blk.mlp.register_forward_hook(lambda m, a, out: got["mlp"].append(out[0].detach().double().numpy()))
              for blk in h]
    hooks += [blk.attn.c_proj.register_forward_pre_hook(lambda m, a: got["z"].append(a[0][0].detach().double().numpy()))
              for blk in h]
    hooks.append(ref.transformer.ln_f.register_forward_pre_hook(
        lambda m, a: got["final"].append(a[0][0].detach().double().numpy())))
    try:
        with torch.no_grad():
            out = ref(torch.as_tensor(np.asarray(ids))[None])
    finally:
        for k in hooks:
            k.remove()
    T = len(ids)
    H = ref.config.n_head
    d = ref.config.n_embd // H
    heads = []
    for blk, z in zip(h, got["z"]):
        w = blk.attn.c_proj.weight.detach().double().numpy()  # [D, D] (Conv1D: x @ w)
        heads.append([z[:, i * d:(i + 1) * d] @ w[i * d:(i + 1) * d, :] for i in range(H)])
    return {
        "embed": ref.transformer.wte.weight.detach().double().numpy()[np.asarray(ids)],
        "pos_embed": ref.transformer.wpe.weight.detach().double().numpy()[:T],
        "attn": got["attn"], "mlp": got["mlp"], "heads": heads,
        "attn_bias": [blk.attn.c_proj.bias.detach().double().numpy() for blk in h],
        "final": got["final"][0], "logits": out.logits[0].detach().double().numpy(),
        "W": ref.lm_head.weight.detach().double().numpy(),
        "g": ref.transformer.ln_f.weight.detach().double().numpy(),
        "b": ref.transformer.ln_f.bias.detach().double().numpy(),
    }


def reference_shares(r, pos, t, v, heads, eps):
    """The stated convention in float64 on transformers' values: (c - mean c) / s . (g * u), and b . u."""
    comps = [r["embed"][pos], r["pos_embed"][pos]]
    for l in range(len(r["attn"])):
        if heads:
            comps += [hd[pos] for hd in r["heads"][l]] + [r["attn_bias"][l]]
        else:
            comps.append(r["attn"][l][pos])
        comps.append(r["mlp"][l][pos])
    x = r["final"][pos]
    s = np.sqrt(np.mean((x - x.mean()) ** 2) + eps)
    u = r["W"][t] - (0 if v is None else r["W"][v])
    c = np.asarray(comps)
    return np.append((c - c.mean(1, keepdims=True)) / s @ (r["g"] * u), r["b"] @ u)


@pytest.mark.parametrize("heads", [False, True], ids=["blocks", "heads"])
@pytest.mark.parametrize("versus", [None, 7], ids=["logit", "difference"])
def test_shares_match_transformers_and_sum_to_the_logit(pair, torch, heads, versus):
    ours, ref = pair
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 23)
    tr = ours.forward(ids, sublayers=True, heads=True)
    r = reference_parts(ref, torch, ids)
    for pos in (0, 11, 22):
        a = attribute(ours, tr, 42, versus=versus, position=pos, heads=heads)
        want = reference_shares(r, pos, 42, versus, heads, CONFIG.layer_norm_epsilon)
        assert len(a.labels) == len(want)
        scale = np.abs(want).max()
        assert np.max(np.abs(a.shares - want)) < 1e-5 * scale, a.table()
        # the shares add up to the model's own logit (difference): gpt2np's and transformers'
        ref_logit = r["logits"][pos, 42] - (0 if versus is None else r["logits"][pos, versus])
        bound = 64 * F32 * np.abs(want).sum()  # float32 sums of C terms of these magnitudes
        assert abs(a.total - a.logit) < bound
        assert abs(a.total - ref_logit) < bound
        assert a.labels[-1] == "ln_f.bias" and a.position == pos


def test_decomposition_sums_to_every_row(pair):
    ours, _ = pair
    ids = np.random.default_rng(2).integers(0, CONFIG.vocab_size, 17)
    tr = ours.forward(ids, sublayers=True, heads=True)
    L = CONFIG.n_layer
    rows = [("input", tr.resid[0])] + [(f"{l}.attn", tr.resid_mid[l]) for l in range(L)] + \
           [(str(l), tr.resid[l + 1]) for l in range(L)] + [(None, tr.resid[L])]
    for row, want in rows:
        for heads in (False, True):
            labels, parts = decompose(ours, tr, row, heads=heads)
            assert parts.shape == (len(labels), 17, CONFIG.n_embd)
            total = parts.astype(np.float64).sum(0)
            assert np.max(np.abs(total - want)) < 16 * F32 * np.abs(parts).sum(0).max()
    labels, _ = decompose(ours, tr, "1.attn")
    assert labels == ("embed", "pos_embed", "0.attn", "0.mlp", "1.attn")
    labels, _ = decompose(ours, tr, "1", heads=True)
    assert labels == ("embed", "pos_embed", "0.h0", "0.h1", "0.h2", "0.attn_bias", "0.mlp",
                      "1.h0", "1.h1", "1.h2", "1.attn_bias", "1.mlp")


def test_heads_sum_to_attn_out(pair):
    ours, _ = pair
    tr = ours.forward(np.arange(30) % CONFIG.vocab_size, sublayers=True, heads=True)
    assert tr.heads.shape == (CONFIG.n_layer, CONFIG.n_head, 30, CONFIG.n_embd)
    for l in range(CONFIG.n_layer):
        total = tr.heads[l].astype(np.float64).sum(0) + ours.params.h[l].attn_c_proj_bias
        assert np.max(np.abs(total - tr.attn_out[l])) < 16 * F32 * np.abs(tr.attn_out[l]).max()


def test_lens_frame_is_the_lens(pair):
    """lens_logit at each row is the logit lens's own logit (ln_f at the row's scale), from gpt2np.logit_lens."""
    ours, _ = pair
    ids = np.random.default_rng(4).integers(0, CONFIG.vocab_size, 12)
    tr = ours.forward(ids, sublayers=True)
    a = attribute(ours, tr, 5, position=-1)
    lens = gpt2np.logit_lens(ours, tr, k=CONFIG.vocab_size, sublayers=True, start=11)
    assert a.rows == lens.rows
    order = lens.top_ids[:, 0, :]  # [R, V] all tokens by logit
    want = np.array([lens.top_logits[i, 0, list(order[i]).index(5)] for i in range(len(lens.rows))])
    assert np.allclose(a.lens_logit, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.allclose(a.lens_change, np.diff(want), atol=2e-5 * np.abs(want).max())
    assert a.lens_logit[-1] == pytest.approx(a.logit, rel=1e-5)


def test_a_lens_row_is_attributed_to_its_own_logit(pair):
    ours, _ = pair
    tr = ours.forward(np.arange(9), sublayers=True)
    for row in ("0.attn", "1"):
        a = attribute(ours, tr, 3, row=row)
        assert a.row == row and a.labels[-2] == ("0.attn" if row == "0.attn" else "1.mlp")
        assert abs(a.total - a.lens_logit[-1]) < 64 * F32 * np.abs(a.shares).sum()


def test_bad_input(tiny_model):
    m = tiny_model
    tr = m.forward(np.arange(6), sublayers=True)
    with pytest.raises(ValueError, match="sublayers=True"):
        attribute(m, m.forward(np.arange(6)), 3)
    with pytest.raises(ValueError, match="heads=True"):
        attribute(m, tr, 3, heads=True)
    with pytest.raises(ValueError, match="position=6 is outside the text's 6 tokens"):
        attribute(m, tr, 3, position=6)
    with pytest.raises(ValueError, match="position=-7"):
        attribute(m, tr, 3, position=-7)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(m, tr, m.config.vocab_size)
    with pytest.raises(ValueError, match="encodes to 0 tokens"):
        attribute(m, tr, "")
    several = m.encode("hello world")
    assert len(several) > 1
    named = re.escape(" + ".join(repr(t) for t in m.tokens(several)))  # every token, by its text
    with pytest.raises(ValueError, match=f"encodes to {len(several)} tokens \\({named}\\)"):
        attribute(m, tr, "hello world")
    with pytest.raises(ValueError, match="row='9' names no row"):
        decompose(m, tr, "9")
    with pytest.raises(ValueError, match="target and versus are the same token"):
        attribute(m, tr, 3, versus=3)
    with pytest.raises(TypeError, match="token id or a string"):
        attribute(m, tr, 2.0)
    assert find_row(3, None) == find_row(3, "2")


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tr = tiny_model.forward(np.arange(5), sublayers=True, heads=True)
    a = attribute(tiny_model, tr, 3, versus=4, heads=True)
    a.save(tmp_path / "a.json")
    b = type(a).load(tmp_path / "a.json")
    assert b.labels == a.labels and np.array_equal(b.shares, a.shares) and b.versus == 4
    assert np.array_equal(b.lens_logit, a.lens_logit) and b.tokens == a.tokens
    assert b.head_grid().shape == (3, 3)


# ---------------------------------------------------------------------------------------------
# The figure and the command line


@pytest.fixture(scope="module")
def words(make_checkpoint, real_tokenizer_dir):
    """A random checkpoint with GPT-2's real tokenizer (names are one token each)."""
    return make_checkpoint(n_layer=3, n_embd=32, n_head=2, vocab_size=50257, tokenizer_dir=real_tokenizer_dir,
                           scale=3.0)


IOI = "When John and Mary went to the shops, John gave the bag to"


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_figure_draws_every_component(tiny_model):
    from gpt2np.plot_attribute import plot_attribution

    tr = tiny_model.forward(np.arange(7), sublayers=True, heads=True)
    for heads in (False, True):
        a = attribute(tiny_model, tr, 3, versus=9, heads=heads)
        fig = plot_attribution(a)
        bars = next(ax for ax in fig.axes if ax.get_label() == "attribution:bars")
        labels = [t.get_text() for t in bars.get_yticklabels()]
        assert labels == [s for s in a.labels if ".h" not in s]
        widths = [p.get_width() for p in bars.patches]
        assert np.allclose(widths, [v for s, v in zip(a.labels, a.shares) if ".h" not in s])
        grids = [ax for ax in fig.axes if ax.get_label() == "attribution:heads"]
        assert len(grids) == heads
        if heads:
            assert np.array_equal(grids[0].images[0].get_array(), a.head_grid())
        fig.canvas.draw()  # renders (Agg) without error


def test_the_command_line_prints_the_ranked_table(capsys, words, tmp_path):
    m = gpt2np.load(words)
    code, out, err = run(capsys, "attribute", IOI, "--model", words, "--target", " Mary", "--versus", " John",
                         "--top", 100)
    assert code == 0 and err == ""
    tr = m.forward(m.encode(IOI), sublayers=True)
    a = attribute(m, tr, " Mary", versus=" John")
    lines = [ln.split() for ln in out.splitlines() if ln[:4].strip().isdigit()]
    assert [ln[1] for ln in lines] == [k for k, _ in a.table()]
    assert [float(ln[2]) for ln in lines] == pytest.approx([v for _, v in a.table()], abs=1e-4)
    assert "logit(' Mary') - logit(' John')" in out
    code, out2, _ = run(capsys, "attribute", IOI, "--model", words, "--target", " Mary", "--versus", " John",
                        "--top", 100, "--save", tmp_path / "a.json")
    assert code == 0 and out2 == f"wrote {tmp_path / 'a.json'}\n" + out  # --save alone still prints the table


def test_the_command_line_writes_figure_and_file(capsys, words, tmp_path):
    fig, js = tmp_path / "ioi.png", tmp_path / "ioi.json"
    code, out, err = run(capsys, "attribute", IOI, "--model", words, "--target", " Mary", "--versus", " John",
                         "--heads", "--out", fig, "--save", js, "--dpi", 50)
    assert code == 0, err
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    a = Attribution.load(js)
    m = gpt2np.load(words)
    assert a.target == m.encode(" Mary")[0] and a.versus == m.encode(" John")[0]
    assert a.head_grid().shape == (3, 2) and a.position == len(m.encode(IOI)) - 1


@pytest.mark.parametrize("argv,message", [
    (["--target", " Paris is"], r"--target=' Paris is' encodes to 2 tokens \(' Paris' \+ ' is'\)"),
    (["--target", " Mary", "--versus", ""], "--versus='' encodes to 0 tokens"),
    (["--target", " Mary", "--position", "40"], "--position=40 is outside the text's 14 tokens"),
    (["--target", " Mary", "--row", "7"], "row='7' names no row"),
    (["--target", "60000"], r"--target=60000 is outside the vocabulary \[0, 50257\)"),
    (["--target", " Mary", "--out", "x.gif"], "unsupported file type .gif"),
    (["--target", " Mary", "--save", "x.npz"], "unsupported file type .npz"),
    (["--target", " Mary", "--out", "x.png", "--dpi", "100000"], "megapixels"),
])
def test_bad_input_on_the_command_line(capsys, words, tmp_path, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(gpt2np.api.Model, "forward", lambda *a, **k: calls.append(1))  # no work before the check
    code, out, err = run(capsys, "attribute", IOI, "--model", words, *argv)
    assert code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and not calls and not list(tmp_path.iterdir())


def test_the_example_runs_and_its_shares_add_up(capsys, words, tmp_path):
    """examples/ioi_attribution.py on a random checkpoint: per-block totals add up to the logit difference."""
    import runpy

    out = tmp_path / "ioi.png"
    ns = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "ioi_attribution.py"))
    ns["main"](["--model", str(words), "--out", str(out)])
    text = capsys.readouterr().out
    total = float(text.split(" = ")[1].split()[0])
    rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and len(ln.split()) == 3]
    m = gpt2np.load(words)
    a = attribute(m, m.forward(m.encode(IOI), sublayers=True), " Mary", versus=" John")
    assert total == pytest.approx(a.logit, abs=1e-3) and len(rows) == m.config.n_layer
    rest = dict(zip(a.labels, a.shares))
    assert sum(float(r[1]) + float(r[2]) for r in rows) + rest["embed"] + rest["pos_embed"] + rest["ln_f.bias"] \
        == pytest.approx(a.total, abs=1e-2)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_heads_of_the_fast_path_equal_the_plain_one(pair):
    """forward_fast keeps the same heads as model.forward (within float32 rounding)."""
    from gpt2np import model as M

    ours, _ = pair
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 33)
    fast = ours.forward(ids, sublayers=True, heads=True)
    plain = M.forward(ours.params, ours.config, ids, sublayers=True, heads=True)
    assert fast.heads.shape == plain.heads.shape
    assert np.max(np.abs(fast.heads - plain.heads)) < 1e-5 * np.abs(plain.heads).max()
    assert ours.forward(ids).heads is None


def test_decompose_and_attribute_on_another_array_namespace(tiny_model):
    """The heads and the decomposition run on array_api_strict (the CPU proof of the GPU path)."""
    from _strict import host_conversion_blocked, is_strict, strict_model

    ids = np.arange(11)
    sm = strict_model(tiny_model)
    with host_conversion_blocked():
        tr = sm.forward(ids, sublayers=True, heads=True)
        labels, parts = decompose(sm, tr, heads=True)
    assert is_strict(parts) and is_strict(tr.heads)
    ref = tiny_model.forward(ids, sublayers=True, heads=True)
    want = decompose(tiny_model, ref, heads=True)
    assert labels == want.labels
    assert np.max(np.abs(np.from_dlpack(parts) - want.parts)) < 1e-5 * np.abs(want.parts).max()
    a, b = attribute(sm, tr, 3, heads=True), attribute(tiny_model, ref, 3, heads=True)
    assert np.allclose(a.shares, b.shares, atol=1e-5 * np.abs(b.shares).max())
