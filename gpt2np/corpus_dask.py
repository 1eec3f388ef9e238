"""Corpus statistics on a Dask cluster: each document a task, the model loaded once per worker.

``gpt2np.corpus_stats(model, texts, client=client)`` comes here. A worker plugin (``LoadModel``) loads the
checkpoint from the model's folder when a worker starts (weights read once per worker; BLAS limited to
the worker's threads), each task computes one document's ``CorpusStats`` with the serial code
(``corpus.document_stats``), and the client merges the results as they complete. At most a few tasks per
worker are in flight, so the corpus is never all in memory. A worker that dies is replaced by its nanny
and Dask runs its tasks again; since a task is a pure function of its text, the result is the same.
Needs the ``dask`` extra: ``pip install "gpt2np[dask]"``.
"""
from __future__ import annotations

from distributed import WorkerPlugin, as_completed, get_worker

from .corpus import CorpusStats, document_stats

IN_FLIGHT_PER_WORKER = 4


class LoadModel(WorkerPlugin):
    """Load the checkpoint at ``path`` once on each worker, with BLAS at the worker's thread count."""

    name = "gpt2np-model"

    def __init__(self, path: str):
        self.path = str(path)

    def setup(self, worker):
        from .api import load
        try:
            from threadpoolctl import threadpool_limits
            self._blas = threadpool_limits(max(1, worker.state.nthreads))  # held while the worker lives
        except ImportError:
            pass
        worker.gpt2np_model = load(self.path, offline=True)


def worker_document_stats(text: str, options: dict) -> list[CorpusStats] | None:
    """One document's statistics, one per lens, on the worker's own model (a Dask task)."""
    return document_stats(get_worker().gpt2np_model, text, **options)


def run(client, model, texts, options: dict) -> list[CorpusStats] | None:
    """Submit the documents as tasks, a few per worker at a time, and merge their statistics (one per lens
    of ``options["translators"]``; a tuned lens is sent to every worker once, not with each task)."""
    if model.path is None:
        raise ValueError("a Dask run loads the model on each worker from its folder: load it with gpt2np.load(path)")
    client.register_plugin(LoadModel(model.path))
    translators = options["translators"]
    if any(t is not None for t in translators):  # a future in the options: Dask hands each task the worker's copy
        options = {**options, "translators": client.scatter(list(translators), broadcast=True)}
    workers = max(1, len(client.scheduler_info()["workers"]))
    texts = iter(texts)
    pending = as_completed()

    def submit_next() -> None:
        text = next(texts, None)
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__}")
            pending.add(client.submit(worker_document_stats, text, options, pure=False))

    for _ in range(IN_FLIGHT_PER_WORKER * workers):
        submit_next()
    total = None
    for future in pending:
        parts = future.result()
        future.release()
        if parts is not None:
            total = parts if total is None else [t.merge(p) for t, p in zip(total, parts)]
        submit_next()
    return total
