"""The search worker's engine thread, without Ray: batches handed in from several threads are searched
side by side, a failed batch or round releases its callers with the error, and the worker goes on."""

from __future__ import annotations

import threading

import pytest

from rewards.config import compose
from rewards.driver import build_spec
from rewards.pipeline import check_config, resolve_models
from rewards.worker import SearchWorker


@pytest.fixture(scope="module")
def worker_and_job(job_overrides, tmp_path_factory):
    job = check_config(compose(job_overrides(tmp_path_factory.mktemp("w") / "out")))
    return SearchWorker(build_spec(job, resolve_models(job))), job


def _in_threads(worker: SearchWorker, batches, seed: int = 0, timeout: float = 120.0) -> list:
    """`run_batch` of each batch from its own thread, all at once; each result or the error raised
    (a caller still waiting after `timeout` fails the test: the engine must release everyone)."""
    results: list = [None] * len(batches)

    def call(i: int) -> None:
        try:
            results[i] = worker.run_batch(batches[i], seed)
        except Exception as e:  # noqa: BLE001 - what the caller got is the result under test
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a run_batch caller was never released"
    return results


def test_batches_from_threads_run_side_by_side_as_they_run_alone(worker_and_job):
    worker, job = worker_and_job
    alone = [worker.run_batch(b, 0)[0] for b in job.batches[:3]]
    together = _in_threads(worker, job.batches[:3])
    assert max(stats["side_by_side"] for _, stats in together) >= 2, "no two batches shared a round"
    for (trees, _), lone in zip(together, alone, strict=True):
        assert [t.steps for t in trees] == [t.steps for t in lone]
        assert [t.nodes["visits"].tolist() for t in trees] == [t.nodes["visits"].tolist() for t in lone]


def test_a_bad_batch_fails_alone_and_the_worker_goes_on(worker_and_job):
    worker, job = worker_and_job
    bad, good = _in_threads(worker, [[], job.batches[0]])
    assert isinstance(bad, ValueError) and "num_trees" in str(bad)
    assert len(good[0]) == len(job.batches[0])


def test_a_failed_round_releases_every_batch_in_it(worker_and_job, monkeypatch):
    worker, job = worker_and_job
    calls = {"n": 0}
    propose = worker.policy.propose

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the model broke")
        return propose(*args, **kwargs)

    monkeypatch.setattr(worker.policy, "propose", broken)
    results = _in_threads(worker, job.batches[:2])
    assert any(isinstance(r, RuntimeError) and "the model broke" in str(r) for r in results)
    assert all(isinstance(r, RuntimeError) or len(r[0]) == 2 for r in results)
    monkeypatch.undo()
    assert len(worker.run_batch(job.batches[1], 0)[0]) == len(job.batches[1]), "the next batch runs"
