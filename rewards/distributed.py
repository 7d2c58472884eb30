"""The job's Ray side: search actors, the streaming driver loop with retries, progress and the audit.

One driver, one pool of `SearchWorker` actors. Each actor loads the policy (and critics) once,
warms the numba kernels on a tiny search, then serves whole batches: `run_batch(problems, seed)`
returns the finished trees. The driver keeps every actor busy, and as each batch comes back it
derives the records and writes the batch's shard (atomically, manifest last: `rewards.export`).

Exactly once. A batch is written under its own shard name only after it completed; the manifest
then names its problems, and a resumed job skips exactly those batches. If a worker dies (SIGKILL,
OOM, a lost node) its in-flight batch fails with `RayActorError`: Ray restarts the actor
(`max_restarts=-1`) and the driver resubmits the batch, up to `ray.max_retries` times. A redone
batch gives the same records, because its seed depends only on the base seed and its problem ids
and every actor runs torch with the same thread count.

Ray runs in-process by default (`ray.address=local`); `ray.address=auto` joins a running cluster.
On a cluster every node needs this package installed and the model directories at the same path
(put `ARBORIST_CACHE` on a shared filesystem for the embedded defaults).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from critics.base import CriticsConfig
from mcts.expander import ExpandConfig
from mcts.finished import FinishedTree
from mcts.policy import PolicyConfig
from mcts.search import SearchConfig
from mcts.tasks.base import Problem

log = logging.getLogger("arborist")
WORKER_ENV = {
    # transformers reads these at import time: set them before any worker imports it.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class JobError(RuntimeError):
    """The job cannot go on (workers do not start, a batch keeps failing); one-line message."""


def _only(cls, obj):
    """`obj` (a schema subclass from rewards.pipeline) as its base dataclass `cls`, for the workers."""
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})


@dataclass
class WorkerSpec:
    """What a worker loads: plain, picklable settings with model paths already resolved."""

    task_name: str
    task_settings: dict
    policy: PolicyConfig
    rollout_policy: PolicyConfig | None
    critics: CriticsConfig
    critics_dir: str | None  # the embedded critics' directory, when a *_path is "default"
    search: SearchConfig
    expand: ExpandConfig
    torch_threads: int
    warmup_problem: Problem


class SearchWorker:
    """A Ray actor (see `WorkerPool`): one policy, its critics and an expander, loaded once."""

    def __init__(self, spec: WorkerSpec):
        t0 = time.perf_counter()
        os.environ.update(WORKER_ENV)
        import torch

        from critics.base import CriticSet
        from mcts.expander import PolicyExpander
        from mcts.policy import Policy
        from mcts.tasks.registry import make_task

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.task = make_task(spec.task_name, **spec.task_settings)
        self.policy = Policy.load(spec.policy)
        rollout = Policy.load(spec.rollout_policy) if spec.rollout_policy else None
        critics = CriticSet.load(spec.critics, self.task, spec.critics_dir)
        self.critics = critics
        self.expander = PolicyExpander(self.policy, self.task, spec.expand, rollout, critics)
        # The audit's expander: nodes valued by one verified rollout alone, the critics scoring every
        # node without steering anything (their weights are 0), so their agreement with the verifier
        # is measured on trees they did not shape.
        unsteered = replace(spec.expand, rollouts=max(1, spec.expand.rollouts), w_rollout=1.0)
        unsteered = replace(unsteered, w_value=0.0, w_prm=0.0, w_orm=0.0, verifier_at_terminals=True)
        self.audit_expander = PolicyExpander(self.policy, self.task, unsteered, rollout, critics)
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Compile / load the numba kernels and torch's kernels now, not inside the first batch.
        # Every policy call reseeds its own generator, so this leaves no trace in later results.
        warm = SearchConfig(simulations=2, leaves_per_tree=1, num_options=2, max_nodes=64)
        self._search([spec.warmup_problem], warm, 0)
        self.warm_s = time.perf_counter() - t0

    def _search(self, problems: list[Problem], cfg: SearchConfig, seed: int) -> list[FinishedTree]:
        from mcts.search import run_search

        return run_search(problems, self.task, self.expander, cfg, seed=seed)

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "load_s": self.load_s,
            "warm_s": self.warm_s,
        }

    def run_batch(self, problems: list[Problem], seed: int) -> tuple[list[FinishedTree], dict]:
        t0 = time.perf_counter()
        trees = self._search(problems, self.spec.search, seed)
        return trees, {"seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def audit_search(self, problems: list[Problem], seed: int) -> list[FinishedTree]:
        """Rollout-valued trees of `problems` with every critic's score recorded: value and PRM at
        the nodes they scored during the search, the ORM at every verified terminal afterwards."""
        from mcts.search import run_search

        trees = run_search(problems, self.task, self.audit_expander, self.spec.search, seed=seed)
        if self.critics is None or self.critics.orm is None:
            return trees
        by_id = {p.id: p for p in problems}
        ends = [
            (t, int(i))
            for t in trees
            for i in np.flatnonzero(t.nodes["terminal"] & (t.nodes["outcome"] >= 0) & (t.nodes["depth"] > 0))
        ]
        if ends:
            scores = self.critics.score_outcomes(
                [by_id[t.problem_id] for t, _ in ends], [t.path_steps(i) for t, i in ends]
            )
            for (t, i), score in zip(ends, scores, strict=True):
                t.nodes["orm"][i] = score
        return trees

    def rerollout(self, items: list[tuple[Problem, list[str]]], n: int, seed: int) -> list[float]:
        """Success rate of `n` fresh verified rollouts from each (problem, prefix steps)."""
        sep = self.task.step_separator
        prompts = [self.expander.prompt(p, steps) for p, steps in items for _ in range(n)]
        outs = self.policy.rollout(prompts, seed=seed, sep=sep) if prompts else []
        hits = [
            self.task.check(items[j // n][0], [*items[j // n][1], *r.steps]).success is True
            for j, r in enumerate(outs)
        ]
        return [sum(hits[i * n : (i + 1) * n]) / n for i in range(len(items))]

    def greedy_success(self, problems: list[Problem]) -> list[bool]:
        """Greedy decoding of each problem, verified."""
        outs = self.policy.greedy([self.task.prompt(p) for p in problems], sep=self.task.step_separator)
        return [self.task.check(p, r.steps).success is True for p, r in zip(problems, outs, strict=True)]


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
    try:
        if address == "local":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
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


def _first_error_line(err: BaseException) -> str:
    """The innermost `SomeError: message` line of a Ray error (its text nests the remote traceback)."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    named = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    return (named[-1] if named else next((ln for ln in lines if ln), repr(err)))[:300]


class WorkerPool:
    """`num_workers` SearchWorker actors, started and warmed before the first batch is sent."""

    def __init__(self, spec: WorkerSpec, num_workers: int, cpus: float, gpus: float, timeout_s: float):
        actor = ray.remote(SearchWorker).options(
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=-1,  # a killed worker comes back; the driver resubmits its batch
            max_task_retries=0,  # ... and decides itself, so every retry is counted and bounded
        )
        self.actors = [actor.remote(spec) for _ in range(num_workers)]
        try:
            self.infos = ray.get([a.info.remote() for a in self.actors], timeout=timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise JobError(
                f"the {num_workers} workers did not start within {timeout_s:.0f} s: the cluster has "
                f"{ray.available_resources().get('CPU', 0):g} free CPUs and each worker asks for {cpus:g}; "
                "lower ray.num_workers / ray.cpus_per_worker or raise ray.start_timeout_s"
            ) from None
        except (RayActorError, RayTaskError) as e:
            self.shutdown()
            raise JobError(f"a worker failed to start: {_first_error_line(e)}") from None

    def pids(self) -> list[int]:
        return [i["pid"] for i in self.infos]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


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
) -> dict:
    """Run every (batch index, problems) of `work` on the pool, one batch per free actor; call
    `on_done(index, trees, stats)` (which writes the shard and returns its name) as each completes.

    Returns {"retries": resubmitted batches, "by_worker": batches per worker pid}.
    """
    queue = deque(work)
    free = deque(range(len(pool.actors)))
    inflight: dict = {}  # ObjectRef -> (worker index, (batch index, problems))
    failures: Counter = Counter()
    by_worker: Counter = Counter()
    submitted = 0
    while queue or inflight:
        while queue and free:
            w, item = free.popleft(), queue.popleft()
            inflight[pool.actors[w].run_batch.remote(item[1], seed)] = (w, item)
            submitted += 1
            if hooks is not None and hooks.on_submit is not None:
                hooks.on_submit(submitted, w, pool)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        tick()
        for ref in ready:
            w, item = inflight.pop(ref)
            free.append(w)  # a dead actor is being restarted by Ray; calls queue until it is back
            try:
                trees, stats = ray.get(ref)
            except RayActorError as e:
                failures[item[0]] += 1
                if failures[item[0]] > max_retries:
                    raise JobError(
                        f"batch {item[0]} lost its worker {failures[item[0]]} times (ray.max_retries="
                        f"{max_retries}): {_first_error_line(e)}"
                    ) from None
                log.warning("worker %d died on batch %d; resubmitting it (%s)", w, item[0], type(e).__name__)
                queue.appendleft(item)
                continue
            except RayTaskError as e:  # our own code failed: deterministic, a retry would fail again
                raise JobError(f"batch {item[0]} failed on a worker: {_first_error_line(e)}") from None
            by_worker[stats["pid"]] += 1
            name = on_done(item[0], trees, stats)
            if hooks is not None and hooks.on_shard is not None:
                hooks.on_shard(name)
    return {"retries": sum(failures.values()), "by_worker": {str(k): v for k, v in by_worker.items()}}


class Progress:
    """Live bar on stderr (problems, nodes/s, success rate, pairs) and the counters behind it."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        self.nodes = self.tokens = self.solved = self.trees = self.pairs = 0
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="search",
            unit="problem",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
        )

    def add(self, trees: list[FinishedTree], pairs: int) -> None:
        self.trees += len(trees)
        self.nodes += sum(t.num_nodes for t in trees)
        self.tokens += sum(t.policy_tokens for t in trees)
        self.solved += sum(bool((t.nodes["outcome"] == 1).any()) for t in trees)
        self.pairs += pairs
        self.bar.update(len(trees))
        self.tick()

    def tick(self) -> None:
        self.bar.set_postfix(
            nodes_s=f"{self.nodes_per_s():.0f}", success=f"{self.success_rate():.2f}", pairs=self.pairs
        )

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def nodes_per_s(self) -> float:
        return self.nodes / max(self.seconds(), 1e-9)

    def success_rate(self) -> float:
        """Share of this run's trees that hold a verified correct solution."""
        return self.solved / self.trees if self.trees else 0.0

    def close(self) -> None:
        self.bar.close()


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


def audit_on(pool: WorkerPool, out: Path, manifest: dict, problems, task, conf, models: dict) -> dict:
    """`rewards.audit.audit_dataset` over the written dataset, with its model work done by the
    workers: re-rollouts from the exported pair prefixes, greedy decoding, and a search on problems
    the critics never trained on whose nodes the critics score but do not steer."""
    from rewards.audit import audit_dataset

    by_id = {p.id: p for p in problems}
    sep = task.step_separator

    def steps_of(problem_id: str, prefix: str) -> tuple[Problem, list[str]] | None:
        problem = by_id.get(problem_id)
        head = task.prompt(problem) if problem is not None else None
        if head is None or not prefix.startswith(head):
            return None
        return problem, [s for s in prefix[len(head) :].split(sep)[:-1]]

    def verify(problem_id: str, prompt: str, completion: str) -> bool | None:
        got = steps_of(problem_id, prompt + completion)
        return None if got is None else task.check(got[0], got[1]).success is True

    def rerollout(items: list[tuple[str, str]], n: int) -> list[float]:
        asks = [steps_of(pid, prefix) for pid, prefix in items]
        assert all(a is not None for a in asks), "a pair prefix does not start with its problem's prompt"
        return call_any(pool, lambda actor: actor.rerollout.remote(asks, n, conf.seed), conf.ray.max_retries)

    greedy_ref = pool.actors[-1].greedy_success.remote(problems) if conf.rewards.greedy_baseline else None
    critic_problems, seen = audit_sets(problems, conf, models)
    critic_trees = None
    if critic_problems:
        critic_trees = call_any(
            pool, lambda actor: actor.audit_search.remote(critic_problems, conf.seed), conf.ray.max_retries
        )
    greedy = None
    if greedy_ref is not None:
        try:
            flags = ray.get(greedy_ref)
        except RayActorError:  # that actor was lost (or is restarting): ask the pool again
            flags = call_any(pool, lambda actor: actor.greedy_success.remote(problems), conf.ray.max_retries)
        greedy = {p.id: bool(g) for p, g in zip(problems, flags, strict=True)}
    trees = [FinishedTree.from_row(r) for r in read_kind(out, manifest, "trees")]
    report = audit_dataset(
        trees,
        read_kind(out, manifest, "pairs"),
        kto=read_kind(out, manifest, "kto"),
        sft=read_kind(out, manifest, "sft"),
        rerollout=rerollout,
        verify=verify,
        sample_pairs=conf.rewards.audit_pairs,
        rollouts_per_prefix=conf.rewards.audit_rollouts,
        greedy=greedy,
        seed=conf.seed,
        critic_trees=critic_trees,
        seen=seen,
    )
    report["critic_problems"] = [p.id for p in critic_problems]
    return report


def audit_sets(problems: list[Problem], conf, models: dict) -> tuple[list[Problem], dict]:
    """(problems the critics are audited on, {model: content keys of its training problems or None}).

    The embedded models' training sets are known (rebuilt from their seeds); a user's are not. The
    embedded critics saw nearly every Countdown problem through their trunk, so they are audited on
    the "audit" slice of the held-out pool; other critics on the job's own problems (the report says
    their training set is unknown)."""
    from mcts.embedded import evaluation_problems, trained_on

    seed = conf.policy.bootstrap_seed
    embedded_policy = not conf.policy.path
    seen: dict = {"policy": trained_on(seed) if embedded_policy else None}
    n = conf.rewards.audit_critic_problems
    paths = list(conf.critics.paths().values())
    embedded = models.get("critics_dir") is not None and "default" in paths
    own = any(p not in ("", "default") for p in paths)
    if not (embedded or own):
        return [], seen  # no critics to audit
    if embedded and not own:
        from rewards.critic_bootstrap import critics_trained_on

        seen["critics"] = critics_trained_on(seed)
        return (evaluation_problems("audit", n) if n else []), seen
    seen["critics"] = None
    return problems[:n], seen


def read_kind(out: Path, manifest: dict, kind: str) -> list[dict]:
    """Rows of one kind, in shard-name order (not completion order), so that what is computed from
    them (the audit's pair sample) does not depend on which batch finished first."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for rel in sorted(manifest["files"][kind]):
        rows += pq.read_table(out / rel).to_pylist()
    return rows


# -- the job, after its inputs were checked ----------------------------------------------------------------
def build_spec(job, models: dict) -> WorkerSpec:
    """The workers' settings for a checked `rewards.pipeline.Job` and its resolved model paths."""
    conf = job.conf
    policy = _only(PolicyConfig, conf.policy)
    policy.path = models["policy"]
    rollout = None
    if conf.policy.rollout_path:
        rollout = _only(PolicyConfig, conf.policy)
        rollout.path = conf.policy.rollout_path
    return WorkerSpec(
        task_name=conf.task.name,
        task_settings=task_kwargs(conf),
        policy=policy,
        rollout_policy=rollout,
        critics=_only(CriticsConfig, conf.critics),
        critics_dir=models["critics_dir"],
        search=_only(SearchConfig, conf.search),
        expand=conf.critics.expand_config(conf.search.merge_similarity),
        torch_threads=conf.ray.torch_threads,
        warmup_problem=job.problems[0],
    )


def run_job(job, models: dict, hooks: Hooks | None = None, started: float | None = None) -> dict:
    """Search every batch not yet in `job.out`'s manifest, write shards as they complete, then the
    audit, the dataset card and `metrics.json`. Returns the metrics. `started`: the job's
    `time.perf_counter()` at its start (wall_seconds counts from there: Ray start and bootstrap too)."""
    from mcts.tasks.registry import make_task
    from rewards.derive import derive_all
    from rewards.export import DatasetWriter, atomic_write_text, load_manifest, write_audit, write_card
    from rewards.job import shard_name, versions

    conf, out = job.conf, job.out
    t_start = time.perf_counter() if started is None else started
    writer = DatasetWriter(out, job.config, {**versions(), "policy_dir": models["policy"]})
    if writer.swept:
        log.info("removed %d files of an interrupted shard: %s", len(writer.swept), writer.swept[:3])
    finished = writer.manifest["shards"]
    todo = [(i, b) for i, b in enumerate(job.batches) if shard_name(i) not in finished]
    resumed = sum(len(b) for i, b in enumerate(job.batches) if shard_name(i) in finished)
    log.info(
        "%d problems in %d batches -> %s (%d problems already there, %d batches to run)",
        len(job.problems), len(job.batches), out, resumed, len(todo),
    )  # fmt: skip
    derive = conf.rewards.derive_config(job.config_hash)
    metrics: dict = {
        "status": "running",
        "out": str(out),
        "problems_total": len(job.problems),
        "problems_resumed": resumed,
        "batches_total": len(job.batches),
        "batches_run": 0,
        "bootstrap_seconds": round(models["bootstrap_s"], 1),
        "config_hash": job.config_hash,
    }

    def write_metrics(progress: Progress | None, **extra) -> None:
        if progress is not None:
            metrics.update(
                problems_done=resumed + progress.trees,
                nodes=progress.nodes,
                policy_tokens=progress.tokens,
                nodes_per_s=round(progress.nodes_per_s(), 1),
                tokens_per_s=round(progress.tokens / max(progress.seconds(), 1e-9), 1),
                success_rate=round(progress.success_rate(), 4),
                pairs_this_run=progress.pairs,
                search_seconds=round(progress.seconds(), 1),
            )
        metrics.update(extra, rows=dict(writer.manifest["rows"]))
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    t0 = time.perf_counter()
    pool = WorkerPool(
        build_spec(job, models),
        conf.ray.num_workers,
        conf.ray.cpus_per_worker,
        conf.ray.gpus_per_worker,
        conf.ray.start_timeout_s,
    )
    log.info("%d workers ready in %.1f s (pids %s)", len(pool.actors), time.perf_counter() - t0, pool.pids())
    metrics["workers"] = pool.infos
    progress = Progress(len(job.problems), resumed, conf.progress)

    def on_done(index: int, trees: list[FinishedTree], stats: dict) -> str:
        batch = job.batches[index]
        assert [t.problem_id for t in trees] == [p.id for p in batch], f"batch {index}: trees out of order"
        rows = derive_all(trees, derive)
        name = shard_name(index)
        writer.write_shard(rows, [p.id for p in batch], name)
        progress.add(trees, len(rows["pairs"]))
        metrics["batches_run"] += 1
        write_metrics(progress)
        return name

    try:
        write_metrics(progress)
        stream = stream_batches(
            pool, todo, conf.seed, on_done, conf.ray.max_retries, tick=progress.tick, hooks=hooks
        )
        progress.close()
        manifest = load_manifest(out)
        log.info("auditing the dataset (%d problems)", len(job.problems))
        task = make_task(conf.task.name, **task_kwargs(conf))
        audit = audit_on(pool, out, manifest, job.problems, task, conf, models)
    finally:
        progress.close()
        pool.shutdown()
    write_audit(out, audit)
    write_card(out)
    write_metrics(
        progress,
        status="finished",
        retries=stream["retries"],
        batches_by_worker=stream["by_worker"],
        wall_seconds=round(time.perf_counter() - t_start, 1),
        audit={k: audit.get(k) for k in ("pair_precision", "search_success", "greedy_success")},
    )
    return metrics


def task_kwargs(conf) -> dict:
    """The task group's settings that `make_task` takes (the rest only shape the problem list)."""
    return {"max_steps": conf.task.max_steps} if conf.task.name == "jsonl" else {}
