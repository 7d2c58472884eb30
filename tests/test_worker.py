"""The search worker's engine thread, without Ray: batches handed in from several threads are searched
side by side, a failed batch or round releases its callers with the error, and the worker goes on."""

from __future__ import annotations

import threading
import time

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

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a run_batch caller was never released"
    return results


def test_batches_from_threads_run_side_by_side_as_they_run_alone(worker_and_job):
    worker, job = worker_and_job
    alone = [_in_threads(worker, [b])[0][0] for b in job.batches[:3]]
    t0 = time.perf_counter()
    together = _in_threads(worker, job.batches[:3])
    wall = time.perf_counter() - t0
    assert max(stats["side_by_side"] for _, stats in together) >= 2, "no two batches shared a round"
    # busy seconds split each shared round among its batches: they add up to the engine's time, where
    # the batches' hand-in-to-finish spans overlap
    busy = [stats["busy_seconds"] for _, stats in together]
    assert all(0 < b <= stats["seconds"] for b, (_, stats) in zip(busy, together, strict=True))
    assert sum(busy) <= wall < sum(stats["seconds"] for _, stats in together)
    for (trees, _), lone in zip(together, alone, strict=True):
        assert [t.steps for t in trees] == [t.steps for t in lone]
        assert [t.nodes["visits"].tolist() for t in trees] == [t.nodes["visits"].tolist() for t in lone]


def test_a_bad_batch_fails_alone_and_the_worker_goes_on(worker_and_job):
    worker, job = worker_and_job
    bad, good = _in_threads(worker, [[], job.batches[0]])
    assert isinstance(bad, ValueError) and "num_trees" in str(bad)
    assert len(good[0]) == len(job.batches[0])


def test_a_failed_round_releases_every_batch_in_it(worker_and_job, monkeypatch):
    """The model fails in a round two batches share (its call carries two seeds): both callers get
    the error, each its own copy of it, and the next batch runs."""
    worker, job = worker_and_job
    propose = worker.policy.propose

    def broken(prompts, num_options, seed, stop="\n"):
        if not isinstance(seed, int):  # one seed per prompt: batches side by side
            raise RuntimeError("the model broke")
        return propose(prompts, num_options, seed, stop)

    monkeypatch.setattr(worker.policy, "propose", broken)
    first, second = _in_threads(worker, job.batches[:2])
    for error in (first, second):
        assert isinstance(error, RuntimeError) and "the model broke" in str(error)
        assert isinstance(error.__cause__, RuntimeError)
    assert first is not second and first.__cause__ is second.__cause__
    monkeypatch.undo()
    ((trees, _),) = _in_threads(worker, [job.batches[1]])
    assert len(trees) == len(job.batches[1]), "the next batch runs"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine's end
def test_a_broken_engine_releases_its_callers_and_the_next_call_starts_a_new_one(worker_and_job, monkeypatch):
    """Something that is not an Exception escapes a round (SystemExit here): the engine thread ends,
    its caller gets a plain error (not the exit itself), and the next batch runs on a new engine."""
    worker, job = worker_and_job
    propose = worker.policy.propose

    def exits(*args, **kwargs):
        raise SystemExit("stop")

    monkeypatch.setattr(worker.policy, "propose", exits)
    (error,) = _in_threads(worker, [job.batches[0]])
    assert isinstance(error, RuntimeError) and "the search engine stopped: SystemExit" in str(error)
    engine = worker._engine
    assert engine is None or not engine.is_alive()
    monkeypatch.setattr(worker.policy, "propose", propose)
    ((trees, _),) = _in_threads(worker, [job.batches[0]])
    assert len(trees) == len(job.batches[0]) and worker._engine is not engine
