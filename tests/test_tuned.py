"""The tuned lens (gpt2np/tuned.py, tuned_fit.py): the lens with translators against a float64 reference,
the KL gradient and optimiser against torch, ridge against a planted map, files, and the fits' effect."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import gpt2np
from gpt2np import lens as plain
from gpt2np import tuned
from gpt2np.tuned import TunedLens, fingerprint, row_labels
from gpt2np.tuned_fit import RidgeSums, kl_and_grad, pack

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [(ROOT / "examples" / "gpt3_abstract.txt").read_text(), (ROOT / "examples" / "plasma.txt").read_text()]
HELD_OUT = (ROOT / "examples" / "repetition.txt").read_text()


def random_lens(model, seed=0, scale=0.05, rows=None) -> TunedLens:
    rng = np.random.default_rng(seed)
    rows = rows or row_labels(model.config.n_layer)
    D = model.config.n_embd
    return TunedLens(tuple(rows), (scale * rng.standard_normal((len(rows), D, D))).astype(np.float32),
                     (scale * rng.standard_normal((len(rows), D))).astype(np.float32),
                     {"model": model.name, "fingerprint": fingerprint(model), "method": "test"})


def log_softmax64(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ln64(x, w, b, eps):
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w + b


# -------------------------------------------------------------------------------------------------
# The lens with a translator


def test_rows_are_tuned_lens_layout():
    assert row_labels(4) == ("input", "0", "1", "2")  # hidden_states[:-1]: the embeddings, after blocks 0..L-2
    assert row_labels(2, sublayers=True) == ("input", "0.attn", "0", "1.attn")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_lens_with_translator_against_float64(tiny_model, fast):
    m = tiny_model
    t = random_lens(m, rows=("input", "1"))  # row 0 has no translator: read as the logit lens reads it
    ids = m.encode(TRAIN[1])[:40]
    tr = m.forward(ids)
    run = gpt2np.logit_lens if fast else plain.logit_lens
    got = run(m, tr, k=3, translator=t)
    p, eps = m.params, m.config.layer_norm_epsilon
    W = p.unembed.astype(np.float64)
    resid = tr.resid.astype(np.float64)
    lp_final = log_softmax64(ln64(resid[-1], p.ln_f_weight, p.ln_f_bias, eps) @ W.T)
    L = m.config.n_layer
    for r, label in enumerate(got.rows):
        h = resid[0 if label == "input" else int(label) + 1]
        if label in t.rows:
            i = t.rows.index(label)
            h = h + h @ t.weight[i].astype(np.float64).T + t.bias[i]
        lp = log_softmax64(ln64(h, p.ln_f_weight, p.ln_f_bias, eps) @ W.T)
        want_kl = (np.exp(lp_final) * (lp_final - lp)).sum(-1)
        assert np.allclose(got.kl_final[r], want_kl, rtol=1e-4, atol=1e-6), label
        assert np.allclose(got.top_probs[r], np.exp(np.sort(lp, -1)[:, ::-1][:, :3]), rtol=1e-4, atol=1e-7), label
    assert got.rows[-1] == str(L - 1) and np.allclose(got.kl_final[-1], 0, atol=1e-9)  # the output row is untouched
    base = run(m, tr, k=3)
    assert np.array_equal(got.kl_final[got.rows.index("0")], base.kl_final[base.rows.index("0")])
    assert "tuned lens" in got.settings["translator"]


def test_fast_equals_plain_with_translator(tiny_model):
    m = tiny_model
    t = random_lens(m, seed=3, rows=row_labels(3, sublayers=True))
    tr = m.forward(m.encode(TRAIN[0])[:64], sublayers=True)
    a = gpt2np.logit_lens(m, tr, k=4, sublayers=True, translator=t, chunk=16)
    b = plain.logit_lens(m, tr, k=4, sublayers=True, translator=t, chunk=16)
    assert np.array_equal(a.top_ids, b.top_ids) and np.array_equal(a.final_rank, b.final_rank)
    for name in ("kl_final", "kl_input", "entropy", "next_xent"):
        assert np.allclose(getattr(a, name), getattr(b, name), rtol=1e-4, atol=1e-6, equal_nan=True), name


def test_translator_refusals(tiny_model, make_checkpoint):
    m = tiny_model
    tr = m.forward(m.encode("hello world"))
    with pytest.raises(ValueError, match="translator= or decoder_blocks="):
        gpt2np.logit_lens(m, tr, translator=random_lens(m), decoder_blocks=1)
    other = gpt2np.load(make_checkpoint(n_embd=24, n_head=2))
    with pytest.raises(ValueError, match="width 24"):
        gpt2np.logit_lens(m, tr, translator=random_lens(other))
    D = m.config.n_embd
    last = TunedLens(("2",), np.zeros((1, D, D), np.float32), np.zeros((1, D), np.float32))
    with pytest.raises(ValueError, match="need no translator"):
        gpt2np.logit_lens(m, tr, translator=last)


# -------------------------------------------------------------------------------------------------
# ridge


def test_ridge_recovers_a_planted_affine_map():
    rng = np.random.default_rng(0)
    D, N = 16, 3000
    A = rng.standard_normal((D, D)) * 0.3
    b = rng.standard_normal(D) * 2
    mean = rng.standard_normal(D) * 5  # streams far from the origin, as real ones are
    s = RidgeSums.zeros(D)
    for _ in range(3):  # streamed in parts
        x = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) + mean
        s.add(x, x + x @ A.T + b)
    A_fit, b_fit = s.solve(0.0)
    assert np.allclose(A_fit, A, atol=1e-9) and np.allclose(b_fit, b, atol=1e-8)
    A_r, _ = s.solve(1.0)  # the ridge term shrinks toward the identity translator (A = 0)
    assert np.linalg.norm(A_r) < np.linalg.norm(A_fit)


def test_ridge_equals_one_least_squares_on_the_streams(tiny_model):
    """The streamed fit equals numpy's lstsq on all streams at once (float64)."""
    m = tiny_model
    lens = tuned.fit(m, TRAIN, method="ridge", ridge=0.0, skip_first=False)
    ids = pack(m, TRAIN)
    xs, ys = [], []
    for a in range(0, len(ids), m.config.n_positions):
        tr = m.forward(ids[a:a + m.config.n_positions])
        xs.append(tr.resid[2].astype(np.float64))  # row "1"
        ys.append(tr.resid[-1].astype(np.float64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    M, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y - x, rcond=None)
    r = lens.rows.index("1")
    assert lens.settings["tokens"] == len(ids)
    assert np.allclose(lens.weight[r], M[:-1].T, atol=2e-4) and np.allclose(lens.bias[r], M[-1], atol=2e-4)


# -------------------------------------------------------------------------------------------------
# kl: the gradient and the optimiser against torch


def test_kl_gradient_against_torch_autograd(tiny_model, torch):
    m = tiny_model
    tr = m.forward(m.encode(TRAIN[0])[:30])
    t = random_lens(m, seed=1, scale=0.1)
    lp_final = plain.log_softmax(tr.logits)
    h = tr.resid[1]
    total, dA, db = kl_and_grad(m, h, lp_final, t.weight[1], t.bias[1])
    p = m.params
    T = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731
    A, b = T(t.weight[1]).requires_grad_(), T(t.bias[1]).requires_grad_()
    u = T(h) + T(h) @ A.T + b
    z = torch.nn.functional.layer_norm(u, (m.config.n_embd,), T(p.ln_f_weight), T(p.ln_f_bias),
                                       m.config.layer_norm_epsilon) @ T(p.unembed).T
    ref = torch.nn.functional.kl_div(torch.log_softmax(z, -1), T(lp_final), log_target=True, reduction="sum")
    ref.backward()
    assert math.isclose(total, ref.item(), rel_tol=1e-4)
    assert np.allclose(dA, A.grad.numpy(), rtol=1e-3, atol=1e-3 * np.abs(A.grad.numpy()).max())
    assert np.allclose(db, b.grad.numpy(), rtol=1e-3, atol=1e-3 * np.abs(b.grad.numpy()).max())


def test_kl_fit_matches_torch_sgd_nesterov_schedule_and_clipping(tiny_model, torch):
    """Three steps of fit_kl against the same steps made by torch: autograd, clip_grad_norm_, SGD with
    Nesterov momentum and weight decay, a linear schedule."""
    m = tiny_model
    steps, tps, window = 3, 96, 48
    ids = pack(m, TRAIN)
    init = random_lens(m, seed=2, scale=0.05)
    got = tuned.fit(m, None, method="kl", ids=ids, init=init, steps=steps, tokens_per_step=tps, window=window,
                    lr_scale=20.0, clip=0.03)  # a large rate and a low clip, so that both matter

    p = m.params
    T = lambda a: torch.tensor(np.asarray(a, np.float64))  # noqa: E731
    Ws = [T(w).requires_grad_() for w in init.weight]
    bs = [T(b).requires_grad_() for b in init.bias]
    opt = torch.optim.SGD(Ws + bs, lr=20.0 * 0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    src = [0] + [i + 1 for i in range(m.config.n_layer - 1)]  # row input, 0, 1 -> resid index
    for s in range(steps):
        opt.zero_grad()
        chunk = ids[s * tps:(s + 1) * tps]
        for a in range(0, tps, window):
            tr = m.forward(chunk[a:a + window])
            lp_final = T(plain.log_softmax(tr.logits))
            for r, i in enumerate(src):
                h = T(tr.resid[i])
                u = h + h @ Ws[r].T + bs[r]
                z = torch.nn.functional.layer_norm(u, (m.config.n_embd,), T(p.ln_f_weight), T(p.ln_f_bias),
                                                   m.config.layer_norm_epsilon) @ T(p.unembed).T
                loss = torch.nn.functional.kl_div(torch.log_softmax(z, -1), lp_final, log_target=True,
                                                  reduction="sum") / tps
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(Ws + bs, 0.03)
        assert norm.item() > 0.03  # the clipping is exercised
        opt.step()
        sched.step()
    for r in range(len(src)):
        assert np.allclose(got.weight[r], Ws[r].detach().numpy(), atol=2e-5), r
        assert np.allclose(got.bias[r], bs[r].detach().numpy(), atol=2e-5), r


def test_kl_resumes_from_a_checkpoint(tiny_model, tmp_path):
    m = tiny_model
    ids = pack(m, TRAIN)
    kw = dict(ids=ids, init="identity", steps=4, tokens_per_step=64, window=32, lr_scale=5.0)
    whole = tuned.fit(m, None, method="kl", **kw)
    ck = tmp_path / "run.ckpt"
    first = tuned.fit(m, None, method="kl", checkpoint=ck, checkpoint_every=2, **{**kw, "steps": 4})
    assert np.array_equal(first.weight, whole.weight)
    # a run stopped after step 2: its checkpoint holds step 2; resuming finishes the same run
    from safetensors import safe_open
    part = tmp_path / "part.ckpt"

    class Stop(Exception):
        pass

    import gpt2np.tuned_fit as F
    real = F.write_checkpoint

    def stop_after_first(*a, **k):
        real(*a, **k)
        raise Stop

    F.write_checkpoint = stop_after_first
    try:
        with pytest.raises(Stop):
            tuned.fit(m, None, method="kl", checkpoint=part, checkpoint_every=2, **kw)
    finally:
        F.write_checkpoint = real
    with safe_open(str(part), framework="numpy") as f:
        assert f.metadata()["step"] == "2"
    resumed = tuned.fit(m, None, method="kl", checkpoint=part, resume=True, **kw)
    assert np.array_equal(resumed.weight, whole.weight) and np.array_equal(resumed.bias, whole.bias)
    with pytest.raises(ValueError, match="another run: its .*steps differ"):
        tuned.fit(m, None, method="kl", checkpoint=part, resume=True, **{**kw, "steps": 5})


def test_kl_refuses_a_corpus_too_small_before_any_work(tiny_model):
    with pytest.raises(ValueError, match=r"the corpus has \d+ tokens, 250 steps of 262144 tokens need"):
        tuned.fit(tiny_model, ["hello world"], method="kl")


# -------------------------------------------------------------------------------------------------
# The fits lower KL(final || row) on held-out text


@pytest.mark.parametrize("method", ["ridge", "kl"])
def test_fitted_lens_beats_the_logit_lens_on_held_out_text(make_checkpoint, method):
    m = gpt2np.load(make_checkpoint(seed=5, scale=3.0))  # larger weights: rows that differ from the output
    opts = dict(steps=8, tokens_per_step=64, window=64, init="identity", lr_scale=5.0) if method == "kl" else {}
    t = tuned.fit(m, TRAIN, method=method, **opts)
    tr = m.forward(m.encode(HELD_OUT)[:64])
    base, tl = gpt2np.logit_lens(m, tr), gpt2np.logit_lens(m, tr, translator=t)
    for label in t.rows:
        r = base.rows.index(label)
        assert tl.kl_final[r].mean() < base.kl_final[r].mean(), (label, tl.kl_final[r].mean(), base.kl_final[r].mean())


# -------------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path, make_checkpoint):
    t = random_lens(tiny_model, rows=row_labels(3, sublayers=True))
    path = tmp_path / "lens.safetensors"
    t.save(path)
    u = TunedLens.load(path, tiny_model)
    assert u.rows == t.rows and u.settings == t.settings
    assert np.array_equal(u.weight, t.weight) and np.array_equal(u.bias, t.bias)
    other = gpt2np.load(make_checkpoint(seed=9))  # same shapes, other weights
    with pytest.raises(ValueError, match="fitted against other weights"):
        TunedLens.load(path, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a lens")
    with pytest.raises(ValueError, match="cannot read tuned lens"):
        TunedLens.load(tmp_path / "bad.safetensors")


def write_published(torch, folder: Path, model, *, seed=0, extra=None, config=None):
    """A lens in tuned-lens's layout, written with torch as tuned-lens's TunedLens.save does."""
    g = torch.Generator().manual_seed(seed)
    L, D = model.config.n_layer, model.config.n_embd
    layers = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(L)])
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(D, D, generator=g) * 0.05)
            lin.bias.copy_(torch.randn(D, generator=g) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    state = layers.state_dict()
    if extra is not None:
        state["extra"] = extra
    torch.save(state, folder / "params.pt")
    cfg = {"base_model_name_or_path": "gpt2", "d_model": D, "num_hidden_layers": L, "bias": True,
           "base_model_revision": None, "unemebd_hash": "0" * 64, "lens_type": "linear_tuned_lens"}
    (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return layers


def test_read_published_without_torch_or_pickle(tiny_model, tmp_path, torch, monkeypatch):
    folder = tmp_path / "gpt2"
    layers = write_published(torch, folder, tiny_model)
    loaded = torch.load(folder / "params.pt", weights_only=True)
    import pickle
    import sys

    def refuse(*a, **k):
        raise AssertionError("unpickling is not allowed")

    for name in ("load", "loads", "Unpickler", "_Unpickler", "_load", "_loads"):
        monkeypatch.setattr(pickle, name, refuse, raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    t = tuned.read_published(folder, tiny_model)
    monkeypatch.undo()
    assert t.rows == ("input", "0", "1")  # translator i reads hidden_states[i]
    for i in range(tiny_model.config.n_layer):
        assert np.array_equal(t.weight[i], loaded[f"{i}.weight"].numpy())
        assert np.array_equal(t.bias[i], loaded[f"{i}.bias"].numpy())
    # and the lens applies them as tuned-lens does: h + Linear(h), read through ln_f and the unembedding
    m = tiny_model
    tr = m.forward(m.encode("hello world, the logit lens"))
    got = gpt2np.logit_lens(m, tr, k=1, translator=t)
    with torch.no_grad():
        h = torch.tensor(tr.resid[1])
        u = h + layers[1](h)
        z = torch.nn.functional.layer_norm(u, (m.config.n_embd,), torch.tensor(m.params.ln_f_weight),
                                           torch.tensor(m.params.ln_f_bias), m.config.layer_norm_epsilon)
        top = (z @ torch.tensor(m.params.unembed).T).argmax(-1).numpy()
    assert np.array_equal(got.top_ids[got.rows.index("0"), :, 0], top)


def test_read_published_refusals(tiny_model, tmp_path, torch):
    write_published(torch, tmp_path / "wide", tiny_model, config={"d_model": 999})
    with pytest.raises(ValueError, match="d_model = 999"):
        tuned.read_published(tmp_path / "wide", tiny_model)
    with pytest.raises(ValueError, match="params.pt is missing"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        tuned.read_published(tmp_path / "empty", tiny_model)
    write_published(torch, tmp_path / "foreign", tiny_model, extra=Path("x"))  # a foreign object in the pickle
    with pytest.raises(ValueError, match="refus"):
        tuned.read_published(tmp_path / "foreign", tiny_model)


# -------------------------------------------------------------------------------------------------
# The command line


def test_the_command_line_fits_runs_and_compares_a_tuned_lens(tiny_checkpoint, tiny_model, tmp_path, capsys):
    from gpt2np import cli
    from gpt2np.corpus import CorpusStats, corpus_stats

    m, ck = tiny_model, str(tiny_checkpoint)
    train = [str(ROOT / "examples" / f) for f in ("gpt3_abstract.txt", "plasma.txt")]
    out = tmp_path / "t.safetensors"
    assert cli.main(["tune", *train, "--model", ck, "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    t = TunedLens.load(out, m)
    want = tuned.fit(m, TRAIN)  # the same corpus through the Python API
    assert np.array_equal(t.weight, want.weight) and np.array_equal(t.bias, want.bias)
    # gpt2np lens --lens: the saved lens equals the API's
    assert cli.main(["lens", "the tuned lens", "--model", ck, "--lens", str(out), "--save",
                     str(tmp_path / "l.npz")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    got = gpt2np.Lens.load(tmp_path / "l.npz")
    api = gpt2np.logit_lens(m, m.forward(m.encode("the tuned lens")), translator=t)
    assert np.array_equal(got.kl_final, api.kl_final) and "tuned lens (ridge" in got.settings["translator"]
    # gpt2np stats --lens: both lenses on the same windows, two files, one figure with both curves
    held = tmp_path / "held.txt"
    held.write_text(HELD_OUT)
    s = tmp_path / "s.json"
    assert cli.main(["stats", str(held), "--model", ck, "--lens", str(out), "--out", str(s), "--plot",
                     str(tmp_path / "s.png"), "--no-progress"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "logit lens and tuned lens on the same windows" in printed and "s.tuned.json" in printed
    logit, tl = CorpusStats.load(s), CorpusStats.load(tmp_path / "s.tuned.json")
    serial = corpus_stats(m, [HELD_OUT], translator=t)
    assert np.allclose(tl.kl_final, serial.kl_final, rtol=1e-12) and tl.settings == serial.settings
    assert np.allclose(logit.kl_final, corpus_stats(m, [HELD_OUT]).kl_final, rtol=1e-12)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # kl with a checkpoint, then its result used as the init of another run
    kl = tmp_path / "kl.safetensors"
    code = cli.main(["tune", *train, "--model", ck, "--method", "kl", "--steps", "2", "--tokens-per-step", "64",
                     "--window", "32", "--checkpoint", str(tmp_path / "run.safetensors"), "--checkpoint-every", "1",
                     "--out", str(kl), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "tuned lens (kl, 128 tokens" in capsys.readouterr().out
    assert (tmp_path / "run.safetensors").is_file()
    want = tuned.fit(m, TRAIN, method="kl", steps=2, tokens_per_step=64, window=32)
    assert np.array_equal(TunedLens.load(kl, m).weight, want.weight)


@pytest.mark.parametrize("argv, message", [
    (["tune", "{train}", "--out", "{tmp}/t.pt"], "unsupported file type .pt"),
    (["tune", "{train}", "--out", "{tmp}/t.safetensors", "--steps", "3"], "--steps belong to --method kl"),
    (["tune", "{tmp}/missing.txt", "--out", "{tmp}/t.safetensors"], "no such file or folder"),
    (["tune", "{train}", "--out", "{tmp}/t.safetensors", "--method", "kl", "--resume"], "--resume continues from"),
    (["tune", "{train}", "--out", "{tmp}/t.safetensors", "--method", "kl", "--init", "nowhere"], "--init nowhere"),
    (["tune", "{train}", "--out", "{tmp}/t.safetensors", "--method", "kl"], "the corpus has 63 tokens, 250 steps of 262144"),
    (["lens", "hi", "--lens", "{tmp}/missing.safetensors"], "no such file or folder"),
    (["lens", "hi", "--lens", "{train}"], "give a tuned lens saved by `gpt2np tune`"),
    (["lens", "hi", "--lens", "{tmp}", "--decoder-blocks", "1"], "give one of them"),
    (["lens", "hi", "--lens", "{tmp}"], "config.json is missing"),
    (["generate", "hi", "--lens", "{tmp}"], "give --lens-out FILE too"),
    (["lens", "hi", "--lens", "{other}"], "fitted against other weights"),
])
def test_the_command_line_refuses_bad_tuned_lens_requests(tiny_checkpoint, make_checkpoint, tmp_path, capsys,
                                                         argv, message):
    from gpt2np import cli

    other = tmp_path / "other.safetensors"
    tuned.fit(gpt2np.load(make_checkpoint(seed=5, scale=3.0)), TRAIN[:1]).save(other)
    fill = dict(train=str(ROOT / "examples" / "plasma.txt"), tmp=str(tmp_path), other=str(other))
    argv = [a.format(**fill) for a in argv] + ["--model", str(tiny_checkpoint)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t.safetensors").exists()
