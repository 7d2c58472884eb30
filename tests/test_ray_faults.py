"""The launcher's Ray fault paths on real actors: a worker that cannot load its models or dies while
loading them, a batch whose search raises, and workers that die idle or with batches in flight."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rewards.config import compose
from rewards.driver import build_spec
from rewards.launcher import Hooks, JobError, WorkerPool, error_line, runtime_errors, stream_batches
from rewards.pipeline import check_config, resolve_models


@pytest.fixture(scope="module")
def spec_and_job(ray_session, job_overrides, tmp_path_factory):
    """The tests' tiny job in 2 batches of 5 problems, long enough (~3 s side by side) to be killed
    mid-batch."""
    out = tmp_path_factory.mktemp("faults") / "out"
    longer = ("task.num_problems=10", "search.batch_problems=5", "search.simulations=48")
    longer += ("policy.max_rollout_tokens=96", "policy.max_step_tokens=40")
    job = check_config(compose(job_overrides(out, *longer)))
    return build_spec(job, resolve_models(job)), job


def _pool(spec, workers: int = 2, batches_per_worker: int = 1, timeout_s: float = 120) -> WorkerPool:
    return WorkerPool(spec, workers, 0.5, 0, timeout_s, batches_per_worker)


def _gone(pid: int, within_s: float = 30) -> None:
    """Wait until process `pid` is dead (gone, or a zombie waiting for its parent, the raylet)."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if stat.read_text().split()[2] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.01)
    raise AssertionError(f"worker process {pid} still runs {within_s} s after SIGKILL")


def _stream(pool, job, max_retries: int, hooks=None) -> tuple[dict, list[int]]:
    """Every batch of `job` through `stream_batches`; its result and the batches done."""
    done: list[int] = []

    def on_done(index: int, trees, stats: dict) -> str:
        assert [t.problem_id for t in trees] == [p.id for p in job.batches[index]]
        done.append(index)
        return f"shard-{index}"

    work = list(enumerate(job.batches))
    return stream_batches(pool, work, job.conf.seed, on_done, max_retries, hooks=hooks), done


def test_a_worker_that_cannot_load_its_model_ends_the_start_at_once(spec_and_job, tmp_path):
    """Its own error in one line, not 'did not start within 120 s' after the whole timeout."""
    spec, _ = spec_and_job
    broken = replace(spec, policy=replace(spec.policy, path=str(tmp_path / "no-model")))
    t0 = time.monotonic()
    with pytest.raises(JobError) as failed:
        _pool(broken, timeout_s=120)
    line = str(failed.value)
    assert time.monotonic() - t0 < 60, f"the start took {time.monotonic() - t0:.0f} s: {line}"
    assert line.startswith("a worker failed to start: ") and "no-model" in line and "\n" not in line, line


def test_a_worker_that_dies_while_loading_ends_the_start_at_once(spec_and_job):
    """A worker process that dies while it loads (out of memory, a native crash) is not restarted
    in a loop until the start times out with a message about free CPUs."""
    spec, _ = spec_and_job
    problem = spec.warmup_problem

    class Fatal(type(problem)):  # a local class: Ray pickles it by value, so the worker has it
        def __getattribute__(self, name: str):
            if not name.startswith("_"):  # the warm-up search reads the problem: the process dies
                os._exit(1)
            return super().__getattribute__(name)

    fatal = replace(spec, warmup_problem=Fatal(problem.id, problem.question, problem.answer, problem.meta))
    t0 = time.monotonic()
    with pytest.raises(JobError) as failed:
        _pool(fatal, timeout_s=60)
    line = str(failed.value)
    assert time.monotonic() - t0 < 45, f"the start took {time.monotonic() - t0:.0f} s: {line}"
    assert "died while loading" in line and "free CPUs" not in line and "\n" not in line, line


def test_a_batch_whose_search_raises_says_a_rerun_meets_the_same_error(spec_and_job):
    """Our own code raising inside a worker (an empty batch: ValueError) is not a lost worker: the
    one line names the batch and the worker's error, and says that a rerun resumes but fails the
    same way. Through `pool.call` (the audit's greedy call) the raw Ray error reads the same way."""
    spec, job = spec_and_job
    pool = _pool(spec, workers=1)
    try:
        work = [(0, job.batches[0]), (1, [])]
        with pytest.raises(JobError) as failed:
            stream_batches(pool, work, 0, lambda i, trees, stats: f"shard-{i}", max_retries=3)
        assert isinstance(failed.value, runtime_errors()), "`arborist search` exits 1 on it"
        line = error_line(failed.value)
        assert line.startswith("batch 1 failed: an error in the search on that batch: ValueError: "), line
        assert "num_trees" in line and "\n" not in line, line
        assert line.endswith("fails the same way on this batch until its cause is fixed"), line
        with pytest.raises(runtime_errors()) as raw:
            pool.call("run_batch", [], 0, retries=0)
        line = error_line(raw.value, out_flag="--out")
        assert "ValueError: " in line and "num_trees" in line and "\n" not in line, line
        assert line.endswith("until its cause is fixed") and "cannot write" not in line, line
    finally:
        pool.shutdown()


def test_an_os_error_raised_in_a_worker_is_not_reported_as_a_full_disk():
    """Ray raises a worker's FileNotFoundError as a class deriving from both RayTaskError and it:
    the line names the worker's error, not the dataset's directory."""
    from ray.exceptions import RayTaskError

    cause = FileNotFoundError(2, "No such file or directory", "/models/tokenizer.json")
    err = RayTaskError("greedy_success", "Traceback ...\nFileNotFoundError: no tokenizer", cause)
    line = error_line(err.as_instanceof_cause())
    assert line.startswith("a worker's call failed: FileNotFoundError: "), line
    assert "cannot write the dataset" not in line, line


def test_a_worker_that_dies_idle_costs_no_batch_a_retry(spec_and_job):
    """Worker 1 dies before any batch was sent to it; the batch sent to it next never ran there,
    so even with ray.max_retries=0 the job goes on: resubmitted, not counted as a death."""
    spec, job = spec_and_job
    pool = _pool(spec, workers=2)

    def kill_idle(n: int, worker: int, pool: WorkerPool) -> None:
        if n == 1:  # batch 0 went to worker 0; worker 1 has nothing in flight: it dies idle
            pid = pool.pids()[1]
            os.kill(pid, signal.SIGKILL)
            _gone(pid)  # dead before batch 1 is sent to it

    try:
        stream, done = _stream(pool, job, max_retries=0, hooks=Hooks(on_submit=kill_idle))
    finally:
        pool.shutdown()
    assert sorted(done) == [0, 1]
    assert stream["lost_runs"] == 0 and stream["retries"] >= 1, stream


def test_every_batch_in_flight_on_a_dead_worker_is_resubmitted_and_counted(spec_and_job):
    """A worker searching two batches side by side dies: both lost their run, both are resubmitted
    and each counts one death (ray.max_retries=1 lets each die once)."""
    spec, job = spec_and_job
    pool = _pool(spec, workers=1, batches_per_worker=2)

    def kill_mid_batch(n: int, worker: int, pool: WorkerPool) -> None:
        if n == 2:  # batches 0 and 1 are in flight on worker 0
            time.sleep(1.0)  # ... and have begun there (each answers at once; a batch takes ~3 s)
            os.kill(pool.pids()[0], signal.SIGKILL)

    try:
        stream, done = _stream(pool, job, max_retries=1, hooks=Hooks(on_submit=kill_mid_batch))
    finally:
        pool.shutdown()
    assert sorted(done) == [0, 1]
    assert stream["retries"] == 2, stream
    assert stream["lost_runs"] == 2, stream


def test_a_worker_that_cannot_load_again_after_a_restart_ends_the_job_saying_so(spec_and_job, tmp_path):
    """Workers load lazily: one restarted mid-job loads in its next call. If its models are gone by
    then, the job ends naming the load, not 'an error in the search on that batch'."""
    import shutil

    spec, job = spec_and_job
    policy = shutil.copytree(spec.policy.path, tmp_path / "policy")
    pool = _pool(replace(spec, policy=replace(spec.policy, path=str(policy))), workers=1)

    def kill_after_removing_the_model(n: int, worker: int, pool: WorkerPool) -> None:
        if n == 1:
            shutil.rmtree(policy)
            os.kill(pool.pids()[0], signal.SIGKILL)

    try:
        with pytest.raises(JobError) as failed:
            _stream(pool, job, max_retries=3, hooks=Hooks(on_submit=kill_after_removing_the_model))
    finally:
        pool.shutdown()
    line = str(failed.value)
    assert line.startswith("worker 0 could not load its models again after a restart: PolicyLoadError: "), (
        line
    )
    assert str(policy) in line and "\n" not in line, line
