"""Corpus statistics (gpt2np/corpus.py) against per-text lenses reduced here, independently, in float64."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import gpt2np
from gpt2np import cli
from gpt2np.corpus import RANK_BINS, CorpusStats, corpus_stats, windows

TEXTS = ["The logit lens reads the residual stream.", "hello world", "a",
         "Sometimes, when people say plasma, they mean a state of matter."]


def by_hand(model, texts, **kw):
    """Per-text lenses of the whole text (each fits the context), summed in float64 in this test."""
    out = {k: 0.0 for k in ("kl_final", "entropy", "next_xent", "agree", "correct", "n", "n_next", "bytes")}
    for t in texts:
        ids = model.encode(t)
        lens = gpt2np.logit_lens(model, model.forward(ids, sublayers=kw.get("sublayers", False)), k=1, **kw)
        known = np.arange(len(ids)) < len(ids) - 1  # every position but the text's last has a next token
        out["kl_final"] += lens.kl_final.astype(np.float64).sum(1)
        out["entropy"] += lens.entropy.astype(np.float64).sum(1)
        out["next_xent"] += lens.next_xent[:, known].astype(np.float64).sum(1)
        out["agree"] += (lens.top_ids[:, :, 0] == lens.final_ids[None]).sum(1)
        out["correct"] += (lens.top_ids[:, known, 0] == ids[1:][None]).sum(1)
        out["n"] += len(ids)
        out["n_next"] += len(ids) - 1
        out["bytes"] += len(model.decode(ids[1:]).encode("utf-8"))
    return out


@pytest.mark.parametrize("kw", [{}, {"sublayers": True, "step": 2, "norm": "norm"}], ids=["default", "options"])
def test_equals_the_token_weighted_average_of_per_text_lenses(tiny_model, kw):
    s = corpus_stats(tiny_model, iter(TEXTS), **kw)
    want = by_hand(tiny_model, TEXTS, **kw)
    assert s.documents == len(TEXTS) and s.positions == want["n"] and s.next_positions == want["n_next"]
    assert s.next_bytes == want["bytes"]
    np.testing.assert_allclose(s.mean("kl_final"), want["kl_final"] / want["n"], rtol=1e-12)
    np.testing.assert_allclose(s.mean("entropy"), want["entropy"] / want["n"], rtol=1e-12)
    np.testing.assert_allclose(s.mean("next_xent"), want["next_xent"] / want["n_next"], rtol=1e-12)
    np.testing.assert_allclose(s.bits_per_byte, want["next_xent"] / np.log(2) / want["bytes"], rtol=1e-12)
    np.testing.assert_array_equal(s.agree_final, want["agree"])
    np.testing.assert_array_equal(s.next_correct, want["correct"])
    assert s.final_rank_hist.sum() == len(s.rows) * want["n"] and s.lock_in_hist.sum() == want["n"]
    assert s.next_rank_hist.sum() == len(s.rows) * want["n_next"]
    assert s.agree_final[-1] == want["n"]  # the last row is the final one (no decoder blocks)
    assert s.final_rank_hist[-1, 0] == want["n"]  # ... so the final top-1 has rank 1 (bin 0) there


@pytest.mark.parametrize("T,window,stride", [(1, 1, 1), (10, 4, 4), (10, 4, 1), (100, 64, 17), (64, 64, 10)])
def test_windows_score_every_position_once(T, window, stride):
    scored = []
    for begin, end, first in windows(T, window, stride):
        assert begin <= first < end <= begin + window and end <= T
        scored += range(first, end)
    assert scored == list(range(T))


def test_a_text_longer_than_the_context(tiny_model):
    """Windows with a stride: each token scored once, under the lens of the window that scores it."""
    text = " ".join(TEXTS * 6)
    ids = tiny_model.encode(text)
    assert len(ids) > 2 * tiny_model.config.n_positions
    s = corpus_stats(tiny_model, [text], window=40, stride=25)
    kl, n = 0.0, 0
    for begin, end, first in windows(len(ids), 40, 25):  # by hand: each window's lens, its new positions
        lens = gpt2np.logit_lens(tiny_model, tiny_model.forward(ids[begin:end]), k=1)
        kl = kl + lens.kl_final[:, first - begin:].astype(np.float64).sum(1)
        n += end - first
    assert s.positions == n == len(ids)
    assert s.next_positions == len(ids) - 1  # with a stride below the window: every position but the last
    np.testing.assert_allclose(s.kl_final, kl, rtol=1e-6)


def test_merge_of_any_split_is_the_whole(tiny_model):
    whole = corpus_stats(tiny_model, TEXTS)
    parts = [corpus_stats(tiny_model, [t]) for t in TEXTS]
    for merged in (parts[0].merge(parts[1]).merge(parts[2].merge(parts[3])),
                   parts[3].merge(parts[1]).merge(parts[0]).merge(parts[2])):
        for k in ("agree_final", "next_correct", "final_rank_hist", "next_rank_hist", "lock_in_hist"):
            np.testing.assert_array_equal(getattr(merged, k), getattr(whole, k))
        for k in ("kl_final", "kl_input", "entropy", "next_xent"):
            np.testing.assert_allclose(getattr(merged, k), getattr(whole, k), rtol=1e-13)
        assert (merged.documents, merged.positions, merged.next_bytes) == \
            (whole.documents, whole.positions, whole.next_bytes)
    other = corpus_stats(tiny_model, TEXTS[:1], norm="norm")
    with pytest.raises(ValueError, match="cannot merge statistics of other rows or settings"):
        whole.merge(other)


def test_save_and_load(tiny_model, tmp_path):
    s = corpus_stats(tiny_model, TEXTS, sublayers=True)
    s.save(tmp_path / "s.json")
    t = CorpusStats.load(tmp_path / "s.json")
    assert t.rows == s.rows and t.settings == s.settings and t.next_bytes == s.next_bytes
    for k in ("kl_final", "entropy", "next_rank_hist", "lock_in_hist"):
        np.testing.assert_array_equal(getattr(t, k), getattr(s, k))  # float64 written in full
    d = json.loads((tmp_path / "s.json").read_text())
    d["next_rank_hist"] = d["next_rank_hist"][:-1]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"next_rank_hist has shape .*imply \\[{len(s.rows)}, {RANK_BINS}\\]"):
        CorpusStats.load(tmp_path / "bad.json")


def test_bad_input(tiny_model):
    with pytest.raises(ValueError, match="stride=9 must be a whole number from 1 to 8"):
        corpus_stats(tiny_model, TEXTS, window=8, stride=9)
    with pytest.raises(ValueError, match="window=65 must be a whole number from 1 to 64"):
        corpus_stats(tiny_model, TEXTS, window=65)
    with pytest.raises(ValueError, match="the corpus has no tokens"):
        corpus_stats(tiny_model, ["", ""])
    with pytest.raises(TypeError, match="texts must be strings"):
        corpus_stats(tiny_model, [b"bytes"])


def test_the_command_line_reads_files_folders_jsonl_and_stdin(tiny_checkpoint, tiny_model, tmp_path, capsys,
                                                              monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXTS[0])
    (folder / "b.txt").write_text(TEXTS[1])
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[2:]) + "\n")
    out = tmp_path / "s.json"
    code = cli.main(["stats", str(folder), str(tmp_path / "c.jsonl"), "--model", str(tiny_checkpoint),
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    got, want = CorpusStats.load(out), corpus_stats(tiny_model, TEXTS)
    assert got.documents == 4 and got.positions == want.positions
    np.testing.assert_allclose(got.kl_final, want.kl_final, rtol=1e-12)
    assert "input" in capsys.readouterr().out  # a per-row table of the means
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(TEXTS[0].encode())))
    assert cli.main(["stats", "-", "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    assert CorpusStats.load(out).positions == len(tiny_model.encode(TEXTS[0]))
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"title": "no text"}\n')
    assert cli.main(["stats", str(tmp_path / "bad.jsonl"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert 'bad.jsonl line 2 has no "text" field' in capsys.readouterr().err
    assert cli.main(["stats", str(tmp_path / "missing"), "--model", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# On a Dask cluster (two worker processes on this machine)


@pytest.fixture(scope="module")
def client():
    import distributed  # in the test extra: never skipped
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as c:
        yield c


def _same(a, b):
    assert (a.rows, a.settings, a.documents, a.positions, a.next_positions, a.next_bytes) == \
        (b.rows, b.settings, b.documents, b.positions, b.next_positions, b.next_bytes)
    for k in ("agree_final", "next_correct", "final_rank_hist", "next_rank_hist", "lock_in_hist"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    for k in ("kl_final", "kl_input", "entropy", "next_xent"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=1e-12)


def test_a_dask_run_equals_the_serial_one(client, tiny_model):
    corpus = TEXTS * 5 + [""]
    serial = corpus_stats(tiny_model, corpus, window=20, stride=12, sublayers=True)
    _same(corpus_stats(tiny_model, iter(corpus), window=20, stride=12, sublayers=True, client=client), serial)
    # each worker loaded the model once, from the model's folder
    paths = client.run(lambda dask_worker: str(dask_worker.gpt2np_model.path))
    assert len(paths) == 2 and set(paths.values()) == {str(tiny_model.path)}


def test_a_worker_that_dies_mid_run_is_replaced_with_the_same_result(client, tiny_model, tmp_path):
    marker = tmp_path / "died"

    def die_once_on_first_task(dask_worker, marker=str(marker)):
        import os

        import gpt2np.corpus_dask as cd
        original = cd.document_stats

        def dying(model, text, **kw):
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)  # the worker process dies with its task running
            return original(model, text, **kw)
        cd.document_stats = dying

    first = next(iter(client.scheduler_info()["workers"]))
    client.run(die_once_on_first_task, workers=[first])
    got = corpus_stats(tiny_model, TEXTS * 3, client=client)
    assert marker.exists()  # a worker did die mid-run
    _same(got, corpus_stats(tiny_model, TEXTS * 3))


def test_the_command_line_on_a_local_dask_cluster(tiny_checkpoint, tiny_model, tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    out = tmp_path / "s.json"
    code = cli.main(["stats", str(tmp_path / "c.jsonl"), "--model", str(tiny_checkpoint), "--out", str(out),
                     "--dask", "local:2", "--progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "tok" in err and "100%" in err  # the progress bar: tokens, tokens per second, fraction and time left
    n = sum(len(tiny_model.encode(t)) for t in TEXTS)
    assert re.search(rf"\b{n}(\.0)?/{n}(\.0)?\b", err)  # the total was known from the start
    _same(CorpusStats.load(out), corpus_stats(tiny_model, TEXTS))
    assert cli.main(["stats", str(tmp_path / "c.jsonl"), "--model", str(tiny_checkpoint), "--out", str(out),
                     "--dask", "local"]) == 2
    assert "use local:N" in capsys.readouterr().err


def test_the_figure_overlays_several_statistics(tiny_checkpoint, tiny_model, tmp_path, capsys):
    from gpt2np.plot_corpus import PANELS, plot_stats

    a, b = corpus_stats(tiny_model, TEXTS), corpus_stats(tiny_model, TEXTS, norm="norm")
    fig = plot_stats({"ln_f": a, "norm": b})
    panels = [ax for ax in fig.axes if ax.get_label().startswith("stats:")]
    assert len(panels) == len(PANELS)
    kl = panels[0].get_lines()
    assert [ln.get_label() for ln in kl] == ["ln_f", "norm"]
    np.testing.assert_allclose(kl[1].get_ydata(), b.mean("kl_final"))
    b.save(tmp_path / "norm.json")
    (tmp_path / "t.txt").write_text(TEXTS[0])
    code = cli.main(["stats", str(tmp_path / "t.txt"), "--model", str(tiny_checkpoint), "--out",
                     str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
                     "--with", str(tmp_path / "norm.json")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["stats", str(tmp_path / "t.txt"), "--model", str(tiny_checkpoint), "--out",
                     str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.gif")]) == 2


# ---------------------------------------------------------------------------------------------
# The tuned lens beside the logit lens


def _tuned(model, seed=0):
    from gpt2np.tuned import TunedLens, fingerprint, row_labels

    rng = np.random.default_rng(seed)
    rows, D = row_labels(model.config.n_layer), model.config.n_embd
    return TunedLens(rows, (0.05 * rng.standard_normal((len(rows), D, D))).astype(np.float32),
                     (0.05 * rng.standard_normal((len(rows), D))).astype(np.float32),
                     {"model": model.name, "fingerprint": fingerprint(model), "method": "test"})


def test_tuned_lens_statistics_equal_per_text_lenses_and_compare_runs_both_in_one_pass(tiny_model):
    from gpt2np.corpus import compare_stats

    t = _tuned(tiny_model)
    s = corpus_stats(tiny_model, TEXTS, translator=t)
    want = by_hand(tiny_model, TEXTS, translator=t)
    np.testing.assert_allclose(s.kl_final, want["kl_final"], rtol=1e-6)
    np.testing.assert_allclose(s.next_xent, want["next_xent"], rtol=1e-6)
    np.testing.assert_array_equal(s.agree_final, want["agree"])
    assert "tuned lens" in s.settings["translator"]
    both = compare_stats(tiny_model, TEXTS, t, window=20, stride=12)
    assert list(both) == ["logit lens", "tuned lens"]
    _same(both["logit lens"], corpus_stats(tiny_model, TEXTS, window=20, stride=12))
    _same(both["tuned lens"], corpus_stats(tiny_model, TEXTS, window=20, stride=12, translator=t))
    assert not np.allclose(both["logit lens"].kl_final[:-1], both["tuned lens"].kl_final[:-1])
    np.testing.assert_array_equal(both["logit lens"].kl_final[-1], both["tuned lens"].kl_final[-1])  # output row
    with pytest.raises(ValueError, match="cannot merge statistics"):
        both["logit lens"].merge(both["tuned lens"])
    with pytest.raises(ValueError, match="not both"):
        corpus_stats(tiny_model, TEXTS, translator=t, decoder_blocks=1)


def test_a_dask_run_with_a_tuned_lens_equals_the_serial_one(client, tiny_model):
    from gpt2np.corpus import compare_stats

    t = _tuned(tiny_model, seed=1)
    serial = compare_stats(tiny_model, TEXTS * 3, t, window=20, stride=12)
    got = compare_stats(tiny_model, iter(TEXTS * 3), t, window=20, stride=12, client=client)
    for name in serial:
        _same(got[name], serial[name])
