"""The job's only Ray code: start or join a cluster, a pool of search actors, batches streamed over
them with bounded retries.

Exactly once. A batch is written under its own shard name only after it completed; the manifest
then names its problems, and a resumed job skips exactly those batches. If a worker dies (SIGKILL,
OOM, a lost node) its in-flight batches fail with `RayActorError`: Ray restarts the actor
(`max_restarts=-1`) and the driver resubmits them, up to `ray.max_retries` deaths per batch. A worker
loads its models in a call (`WorkerActor`), not in the constructor Ray reruns on every restart, so a
worker that cannot load fails the start at once with its own error. A redone
batch gives the same records, because its seed depends only on the base seed and its problem ids
and every actor runs torch with the same thread count.

Ray runs in-process by default (`ray.address=local`); `ray.address=auto` joins a running cluster.
On a cluster every node needs this package installed and the model directories at the same path
(put `ARBORIST_CACHE` on a shared filesystem for the embedded defaults).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayTaskError

from mcts.finished import FinishedTree
from mcts.tasks.base import Problem
from rewards.interrupts import deferred_sigint, terminate_as_interrupt
from rewards.worker import WORKER_ENV, SearchWorker, WorkerSpec

log = logging.getLogger("arborist")


class JobError(RuntimeError):
    """The job cannot go on (workers do not start, a batch keeps failing); one-line message."""


class BatchError(JobError):
    """Our own code raised inside a worker on one batch (a `RayTaskError`, not a lost worker): the
    same batch fails the same way on any worker and in any rerun until the cause is fixed."""


def runtime_errors() -> tuple[type[BaseException], ...]:
    """What ends a running job that is not bad input: ours, the filesystem's and Ray's own (an
    object or node lost beyond the retries). `arborist search` reports each in one line, exit 1."""
    from ray.exceptions import RayError

    return (JobError, OSError, RayError)


def error_line(err: BaseException, out_flag: str = "out") -> str:
    """One line for a runtime failure, with what to do about it; `out_flag` is how the command
    names its output directory (`arborist search`: out, `arborist improve`: --out)."""
    if isinstance(err, OSError) and not isinstance(err, (ConnectionError, RayTaskError)):
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return f"cannot write the dataset{where}: {err.strerror or err}: free space, fix permissions or choose another {out_flag}=DIR; rerunning resumes"
    resume = f"rerunning with the same {out_flag} resumes from the last finished shard"
    if isinstance(err, BatchError):
        return f"{err}; {resume} but fails the same way on this batch until its cause is fixed"
    if isinstance(err, RayTaskError):  # a worker's call raised (the audit's greedy decoding)
        return f"a worker's call failed: {_first_error_line(err)}; {resume} but fails the same way until its cause is fixed"
    if isinstance(err, JobError):
        return f"{err}; {resume}"
    return f"Ray failed: {_first_error_line(err)}; {resume}"


@contextmanager
def connect(address: str, num_cpus: int | None, log_to_driver: bool) -> Iterator[None]:
    """Start Ray here (`local`) or join a cluster; shut down only what this call started.

    A session that is already initialised (tests share one) is used as it is.
    """
    if ray.is_initialized():
        yield
        return
    kwargs = dict(
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )
    wrapper = _loopback_only() if address == "local" else _held_stderr()
    try:
        with wrapper:
            if address == "local":
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        terminate_as_interrupt()
    except ConnectionError as e:
        from rewards.job import JobInputError

        raise JobInputError(
            f"ray.address={address}: no Ray cluster reachable ({str(e).splitlines()[0][:120]}): start one "
            "with `ray start --head`, or run locally with ray.address=local"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what is written to file descriptor 2 while Ray joins a cluster, and pass it on only if
    it joined: where the address answers but is no Ray cluster, Ray's C++ client logs a retry a
    second for ~20 s before it fails, and the job's one line says it all."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if joined:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


# Ray names a node by an address other machines can reach and binds its GCS, raylet, workers and
# agents there; a node named by the loopback address binds every one of them to loopback. Ray does
# so only when its "cluster" mode is off (the switch it keeps for laptops): read from this variable
# by the processes it starts, and from a constant fixed when `ray` was imported, by this one.
_CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """A local Ray started inside this block listens on loopback only (held by a test)."""
    from ray._private import ray_constants

    before_env, before_const = os.environ.get(_CLUSTER_MODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_MODE], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:  # a later `ray.address=auto` in this process names its node as usual again
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(_CLUSTER_MODE, None)
        else:
            os.environ[_CLUSTER_MODE] = before_env


def _first_error_line(err: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error (its text nests the remote traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    return (named[-1] if named else next((ln for ln in lines if ln), repr(err)))[:300]


class WorkerLoadError(RuntimeError):
    """A worker's models did not load (raised in the worker); the message is the cause's line."""


class WorkerActor:
    """What each Ray actor runs: a `SearchWorker` built by the first call that needs it, not by the
    constructor. Ray reruns the constructor of every restart (`max_restarts=-1`), so one that cannot
    load (a wrong model path, a process that dies while loading) would fail over and over while the
    driver waits; a `load` call fails once, at once, with the worker's own error. A worker restarted
    mid-job loads again in its next call."""

    def __init__(self, spec: WorkerSpec):
        self._spec = spec
        self._worker: SearchWorker | None = None
        self._loading = threading.Lock()  # batches arriving together wait for one load

    def ready(self) -> bool:
        """Answers as soon as the actor runs: it was given its resources."""
        return True

    def load(self) -> dict:
        """Load the models (once); the worker's `info`."""
        return self._loaded().info()

    def run(self, method: str, *args):
        """`SearchWorker.method(*args)`, loaded first if this process has not loaded yet."""
        return getattr(self._loaded(), method)(*args)

    def stream(self, method: str, *args):
        """`run` as a Ray generator: first None, the moment the call reached this live worker (from
        then on its death loses this run), then the result (`stream_batches`)."""
        yield None
        yield self.run(method, *args)

    def _loaded(self) -> SearchWorker:
        with self._loading:
            if self._worker is None:
                try:
                    self._worker = SearchWorker(self._spec)
                except Exception as e:
                    first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
                    raise WorkerLoadError(f"{type(e).__name__}: {first}"[:300]) from e
            return self._worker


class WorkerPool:
    """`num_workers` WorkerActor actors, started and their models loaded before the first batch."""

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int,
        cpus: float,
        gpus: float,
        timeout_s: float,
        batches_per_worker: int = 1,
    ):
        self.batches_per_worker = batches_per_worker
        actor = ray.remote(WorkerActor).options(
            num_cpus=cpus,
            num_gpus=gpus,
            # a thread per batch in flight (they only wait: one engine thread searches them side by
            # side, `SearchWorker._serve`), one for a call beside them and one for `ready`
            max_concurrency=batches_per_worker + 2,
            max_restarts=-1,  # a killed worker comes back; the driver resubmits its batch
            max_task_retries=0,  # ... and decides itself, so every retry is counted and bounded
        )
        self.actors = [actor.remote(spec) for _ in range(num_workers)]
        try:
            self.infos = self._load(timeout_s, cpus, gpus)
        except BaseException:
            self.shutdown()
            raise

    def _load(self, timeout_s: float, cpus: float, gpus: float) -> list[dict]:
        """Every worker's `info` once its models are loaded; the first failure ends the start."""
        placed = [a.ready.remote() for a in self.actors]
        loading = {a.load.remote(): i for i, a in enumerate(self.actors)}
        infos: list[dict] = [{} for _ in self.actors]
        deadline = time.monotonic() + timeout_s
        while loading:
            done, _ = ray.wait(list(loading), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise JobError(self._late(placed, timeout_s, cpus, gpus))
            i = loading.pop(done[0])
            try:
                infos[i] = ray.get(done[0])
            except WorkerLoadError as e:  # the worker's own error: it would fail the same way again
                raise JobError(f"a worker failed to start: {e.cause}") from None
            except (RayTaskError, RayActorError) as e:
                if isinstance(e, RayTaskError) or e.actor_init_failed:  # e.g. the package is missing there
                    raise JobError(f"a worker failed to start: {_first_error_line(e)}") from None
                raise JobError(
                    f"worker {i} died while loading its models ({_first_error_line(e)}): it may have run "
                    "out of memory (lower ray.num_workers); its log is under /tmp/ray/session_latest/logs"
                ) from None
        return infos

    def _late(self, placed: list, timeout_s: float, cpus: float, gpus: float) -> str:
        """Why the workers are not loaded within `timeout_s`: no room on the cluster, or a slow load."""
        waiting = len(ray.wait(placed, num_returns=len(placed), timeout=0)[1])
        if not waiting:
            return f"the {len(self.actors)} workers did not load their models within {timeout_s:g} s: raise ray.start_timeout_s"
        free = ray.available_resources()
        asks = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs ({free.get('GPU', 0):g} free)" if gpus else "")
        return (
            f"{waiting} of the {len(self.actors)} workers were not scheduled within {timeout_s:g} s: the "
            f"cluster has {free.get('CPU', 0):g} free CPUs and each worker asks for {asks}; "
            "lower ray.num_workers / ray.cpus_per_worker or raise ray.start_timeout_s"
        )

    def pids(self) -> list[int]:
        return [i["pid"] for i in self.infos]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)

    def call(self, method: str, *args, retries: int, wait_s: float = 2.0):
        """`method(*args)` on the pool's actors in turn until one answers. A worker killed
        mid-call is restarted by Ray; its call fails with `RayActorError` and the next actor is
        asked, up to `retries` failures."""
        return call_any(self, lambda actor: actor.run.remote(method, *args), retries, wait_s)

    def start(self, method: str, *args):
        """`method(*args)` on the last actor, not waited for: `finish` collects it."""
        return (method, args, self.actors[-1].run.remote(method, *args))

    def finish(self, started, retries: int):
        """The result of `start`; if that actor was lost, asked again of the pool."""
        method, args, ref = started
        try:
            return ray.get(ref)
        except RayActorError:
            return self.call(method, *args, retries=retries)


@dataclass
class Hooks:
    """Test hooks. `on_submit(n, worker, pool)` right after the n-th batch submission (1-based) went
    to worker index `worker`, so that batch is in flight; `on_shard(shard_name)` after each shard
    is written (raising there simulates a driver crash between shards)."""

    on_submit: Callable[[int, int, WorkerPool], None] | None = None
    on_shard: Callable[[str], None] | None = None


def stream_batches(
    pool: WorkerPool,
    work: list[tuple[int, list[Problem]]],
    seed: int,
    on_done: Callable[[int, list[FinishedTree], dict], str],
    max_retries: int,
    tick: Callable[[], None] = lambda: None,
    hooks: Hooks | None = None,
    restart_wait_s: float = 300.0,
    method: str = "run_batch",
    extra: tuple = (),
) -> dict:
    """Run every (batch index, problems) of `work` on the pool, `pool.batches_per_worker` batches in
    flight per actor (searched side by side); call `on_done(index, trees, stats)` (which writes the
    shard and returns its name) as each completes. `method` / `extra`: another worker call of the
    same shape, `method(problems, seed, *extra) -> (result, stats)` (the audit's).

    A worker's death: every batch in flight on a worker that died (or that Ray was still restarting)
    goes back to the queue. It counts as one of the batch's `max_retries` deaths only if it had
    begun on that worker, i.e. the worker's first answer to the call (`WorkerActor.stream`) reached
    the driver: a worker that died idle, or before the batch reached it, lost no run of it. One
    death costs each batch that was running on the worker one retry, however many ran side by side.
    The dead worker takes no batch until Ray has restarted it (it answers `ready`); one not back
    within `restart_wait_s` ends the job.

    Returns {"retries": batches resubmitted, "lost_runs": deaths counted against batches,
    "by_worker": batches per worker pid}.
    """
    # A Ctrl-C must not land in a generator's __del__. The loop is a function of its own so that its
    # frame, and every generator it holds, is gone before the SIGINT handler comes back.
    with deferred_sigint() as interrupts:
        return _stream_batches(
            pool, work, seed, on_done, max_retries, tick, hooks, restart_wait_s, method, extra, interrupts
        )


def _stream_batches(
    pool, work, seed, on_done, max_retries, tick, hooks, restart_wait_s, method, extra, interrupts
) -> dict:
    queue = deque(work)
    free = deque(w for _ in range(pool.batches_per_worker) for w in range(len(pool.actors)))  # slots
    inflight: dict = {}  # ObjectRefGenerator -> [worker index, (batch index, problems), begun there]
    down: dict[int, list] = {}  # worker found dead -> [monotonic time then, its slots held]
    probes: dict = {}  # `ready` sent to a dead worker, retried by Ray until it is back -> worker
    lost: Counter = Counter()  # batch index -> deaths of its worker while it ran there
    by_worker: Counter = Counter()
    submitted = retries = 0
    what = "batch" if method == "run_batch" else f"{method} chunk"  # for the messages

    def worker_lost(w: int, item: tuple, begun: bool, e: BaseException) -> None:
        nonlocal retries
        queue.appendleft(item)
        retries += 1
        if w not in down:
            down[w] = [time.monotonic(), 0]
            probes[pool.actors[w].ready.options(max_task_retries=-1).remote()] = w
        down[w][1] += 1
        if not begun:
            log.warning("worker %d was lost before %s %d began on it; resubmitting it", w, what, item[0])
            return
        lost[item[0]] += 1
        if lost[item[0]] > max_retries:
            raise JobError(
                f"{what} {item[0]} lost its worker {lost[item[0]]} times (ray.max_retries={max_retries}): "
                f"{_first_error_line(e)}"
            ) from None
        log.warning("worker %d died on %s %d; resubmitting it (%s)", w, what, item[0], type(e).__name__)

    while queue or inflight:
        interrupts.check()
        while queue and free:
            w, item = free.popleft(), queue.popleft()
            inflight[pool.actors[w].stream.remote(method, item[1], seed, *extra)] = [w, item, False]
            submitted += 1
            if hooks is not None and hooks.on_submit is not None:
                hooks.on_submit(submitted, w, pool)
        assert inflight or probes, f"{len(queue)} batches wait and no worker is busy, free or restarting"
        ready, _ = ray.wait([*inflight, *probes], num_returns=1, timeout=1.0)
        tick()
        for w, (since, _) in down.items():
            if time.monotonic() - since > restart_wait_s:
                raise JobError(f"worker {w} died and Ray did not restart it within {restart_wait_s:.0f} s")
        for ref in ready:
            if ref in probes:  # a dead worker is back: its slots take batches again
                w = probes.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as e:
                    raise JobError(
                        f"worker {w} died and Ray could not restart it: {_first_error_line(e)}"
                    ) from None
                free.extend([w] * down.pop(w)[1])
                continue
            w, item, begun = inflight[ref]
            try:
                answer = ray.get(next(ref))
            except RayActorError as e:
                del inflight[ref]
                worker_lost(w, item, begun, e)
                continue
            except WorkerLoadError as e:  # restarted after a death, it cannot load what it loaded before
                raise JobError(
                    f"worker {w} could not load its models again after a restart: {e.cause}"
                ) from None
            except RayTaskError as e:  # our own code failed: deterministic, a retry would fail again
                where = "the search" if method == "run_batch" else f"the worker's {method}"
                raise BatchError(
                    f"{what} {item[0]} failed: an error in {where} on that {what.split()[-1]}: "
                    f"{_first_error_line(e)}"
                ) from None
            if not begun:  # the batch reached the worker; its result comes next
                inflight[ref][2] = True
                continue
            del inflight[ref]
            trees, stats = answer
            free.append(w)
            by_worker[stats["pid"]] += 1
            name = on_done(item[0], trees, stats)
            if hooks is not None and hooks.on_shard is not None:
                hooks.on_shard(name)
    return {
        "retries": retries,
        "lost_runs": sum(lost.values()),
        "by_worker": {str(k): v for k, v in by_worker.items()},
    }


def call_any(pool: WorkerPool, submit: Callable, retries: int, wait_s: float = 2.0):
    """`ray.get(submit(actor))` on the pool's actors in turn until one answers. A worker killed
    late in the job may still be restarting (`ActorUnavailableError`) when the audit starts."""
    for attempt in range(retries * len(pool.actors) + 1):
        worker = attempt % len(pool.actors)
        try:
            return ray.get(submit(pool.actors[worker]))
        except RayActorError as e:
            log.warning("worker %d unavailable (%s); asking the next one", worker, type(e).__name__)
            time.sleep(wait_s)
    raise RuntimeError(f"no worker answered after {retries} rounds over {len(pool.actors)} workers")
