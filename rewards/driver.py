"""The job's driver: the workers' settings, batches streamed to them, a shard written as each comes
back (derive -> export, manifest last), progress, then the audit, the dataset card and metrics.
Ray stays behind `rewards.launcher`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from critics.base import CriticsConfig
from mcts.base import SearchConfig
from mcts.finished import FinishedTree
from mcts.policy import PolicyConfig
from mcts.tasks.base import Problem
from rewards.launcher import Hooks, WorkerPool, stream_batches
from rewards.worker import WorkerSpec, as_base

log = logging.getLogger("arborist")


class Progress:
    """Live bar on stderr (problems, nodes/s, success rate, pairs) and the counters behind it."""

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.t0 = time.perf_counter()
        self.t1: float | None = None  # the search phase's end (`close`): the audit is not search time
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
            nodes_s=f"{self.nodes_per_s():.0f}", success=f"{self.success_rate() or 0.0:.2f}", pairs=self.pairs
        )

    def seconds(self) -> float:
        return (self.t1 if self.t1 is not None else time.perf_counter()) - self.t0

    def nodes_per_s(self) -> float:
        return self.nodes / max(self.seconds(), 1e-9)

    def success_rate(self) -> float | None:
        """Share of this run's trees that hold a verified correct solution (None: it searched none,
        as a rerun of a finished job; the audit's `search_success` is the whole dataset's)."""
        return self.solved / self.trees if self.trees else None

    def close(self) -> None:
        if self.t1 is None:
            self.t1 = time.perf_counter()
        self.bar.close()


# Re-rolled prefixes per worker call: the audit's ~400 sampled prefixes x 16 rollouts spread over
# every worker in fixed chunks (each seeded by its content), so the figures do not depend on how
# many workers there are.
REROLLOUT_CHUNK = 32


def _over_workers(pool: WorkerPool, conf, method: str, chunks: list, extra: tuple = ()) -> list:
    """`method(chunk, conf.seed, *extra)` for every chunk, spread over the workers as the job's
    batches are (a lost worker's chunk is asked again); the results in chunk order."""
    results: list = [None] * len(chunks)

    def done(i: int, result, stats: dict) -> str:
        results[i] = result
        return f"{method} {i}"

    stream_batches(
        pool, list(enumerate(chunks)), conf.seed, done, conf.ray.max_retries, method=method, extra=extra
    )
    return results


def audit_on(pool: WorkerPool, out: Path, manifest: dict, problems, task, conf, models: dict) -> dict:
    """`rewards.audit.audit_shards` over the written dataset, read one shard at a time, with its
    model work done by the workers: re-rollouts from the sampled pairs' nodes, greedy decoding, and
    a search on problems the critics never trained on whose nodes the critics score but do not steer."""
    from rewards.audit import Shard, audit_shards
    from rewards.export import iter_shards

    by_id = {p.id: p for p in problems}

    def verify(problem_id: str, steps: list[str]) -> bool | None:
        problem = by_id.get(problem_id)
        return None if problem is None else task.check(problem, steps).success is True

    def rerollout(items: list[tuple[str, list[str]]], n: int) -> list[float]:
        asks = [(by_id[pid], steps) for pid, steps in items]
        t = time.perf_counter()
        chunks = [asks[i : i + REROLLOUT_CHUNK] for i in range(0, len(asks), REROLLOUT_CHUNK)]
        rates = [r for part in _over_workers(pool, conf, "rerollout_batch", chunks, (n,)) for r in part]
        log.info("audit: %d x %d re-rollouts in %.1f s", len(asks), n, time.perf_counter() - t)
        return rates

    t0 = time.perf_counter()
    greedy_call = pool.start("greedy_success", problems) if conf.rewards.greedy_baseline else None
    critic_problems, seen = audit_sets(problems, conf, models)
    critic_trees = None
    if critic_problems:
        size = conf.search.batch_problems  # batched as the job is: the same trees on any number of workers
        batches = [critic_problems[i : i + size] for i in range(0, len(critic_problems), size)]
        critic_trees = [t for trees in _over_workers(pool, conf, "audit_batch", batches) for t in trees]
        log.info(
            "audit: the critics' unsteered search of %d problems in %.1f s",
            len(critic_problems),
            time.perf_counter() - t0,
        )
    greedy = None
    if greedy_call is not None:
        flags = pool.finish(greedy_call, retries=conf.ray.max_retries)
        greedy = {p.id: bool(g) for p, g in zip(problems, flags, strict=True)}
        log.info(
            "audit: greedy decoding of %d problems done at %.1f s", len(problems), time.perf_counter() - t0
        )
    shards = (Shard.from_rows(rows) for rows in iter_shards(out, manifest, Shard.KINDS))
    report = audit_shards(
        shards,
        manifest["rows"]["pairs"],
        rerollout=rerollout,
        verify=verify,
        sample_pairs=conf.rewards.audit_pairs,
        rollouts_per_prefix=conf.rewards.audit_rollouts,
        greedy=greedy,
        sample_seed=conf.seed,
        critic_trees=critic_trees,
        seen=seen,
    )
    report["critic_problems"] = [p.id for p in critic_problems]
    log.info("audit: done in %.1f s", time.perf_counter() - t0)
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


# -- the job, after its inputs were checked ----------------------------------------------------------------
def build_spec(job, models: dict) -> WorkerSpec:
    """The workers' settings for a checked `rewards.pipeline.Job` and its resolved model paths."""
    conf = job.conf
    policy = as_base(PolicyConfig, conf.policy)
    policy.path = models["policy"]
    rollout = None
    if conf.policy.rollout_path:
        rollout = as_base(PolicyConfig, conf.policy)
        rollout.path = conf.policy.rollout_path
    return WorkerSpec(
        task_name=conf.task.name,
        task_settings=task_kwargs(conf),
        policy=policy,
        rollout_policy=rollout,
        critics=as_base(CriticsConfig, conf.critics),
        critics_dir=models["critics_dir"],
        search=as_base(SearchConfig, conf.search),
        merge_similarity=conf.search.merge_similarity,
        torch_threads=conf.ray.torch_threads,
        warmup_problem=job.problems[0],
    )


def run_job(
    job, models: dict, hooks: Hooks | None = None, started: float | None = None, lock: int | None = None
) -> dict:
    """Search every batch not yet in `job.out`'s manifest, write shards as they complete, then the
    audit, the dataset card and `metrics.json`. Returns the metrics. `started`: the job's
    `time.perf_counter()` at its start (wall_seconds counts from there: Ray start and bootstrap too);
    `lock`: the out dir's lock, taken by the caller (`rewards.export.lock_out_dir`)."""
    from mcts.tasks.registry import make_task
    from rewards.card import write_card
    from rewards.derive import derive_all
    from rewards.export import DatasetWriter, atomic_write_text, write_audit
    from rewards.job import problems_sha, shard_name, versions

    conf, out = job.conf, job.out
    t_start = time.perf_counter() if started is None else started
    writer = DatasetWriter(
        out,
        job.config,
        {**versions(), "policy_dir": models["policy"]},
        job.config_hash,
        conf.append_run,
        lock,
    )
    try:
        if writer.swept:
            log.info("removed %d files of an interrupted shard: %s", len(writer.swept), writer.swept[:3])
        finished = writer.manifest["shards"]
        todo = [(i, b) for i, b in enumerate(job.batches) if shard_name(i) not in finished]
        resumed = sum(len(b) for i, b in enumerate(job.batches) if shard_name(i) in finished)
        log.info(
            "%d problems in %d batches -> %s (%d problems already there, %d batches to run)",
            len(job.problems), len(job.batches), out, resumed, len(todo),
        )  # fmt: skip
        derive = conf.rewards.for_job(job.config_hash)
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
                    success_rate=None if (rate := progress.success_rate()) is None else round(rate, 4),
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
            conf.ray.batches_per_worker,
        )
        log.info(
            "%d workers ready in %.1f s (pids %s)", len(pool.actors), time.perf_counter() - t0, pool.pids()
        )
        metrics["workers"] = pool.infos
        progress = Progress(len(job.problems), resumed, conf.progress)

        def on_done(index: int, trees: list[FinishedTree], stats: dict) -> str:
            batch = job.batches[index]
            assert [t.problem_id for t in trees] == [p.id for p in batch], (
                f"batch {index}: trees out of order"
            )
            rows = derive_all(trees, derive)
            name = shard_name(index)
            writer.write_shard(rows, [p.id for p in batch], name, problems_sha(batch))
            progress.add(trees, len(rows["pairs"]))
            metrics["batches_run"] += 1
            metrics["worker_batch_seconds"] = round(
                metrics.get("worker_batch_seconds", 0.0) + stats["busy_seconds"], 1
            )
            # the most batches a worker searched side by side in any round (ray.batches_per_worker)
            metrics["batches_side_by_side"] = max(
                metrics.get("batches_side_by_side", 0), stats["side_by_side"]
            )
            write_metrics(progress)
            return name

        try:
            if todo:  # the audit and the card of the shards there so far would outlive a run cut short
                for stale in ("audit.json", "README.md"):
                    (out / stale).unlink(missing_ok=True)
            write_metrics(progress)
            stream = stream_batches(
                pool, todo, conf.seed, on_done, conf.ray.max_retries, tick=progress.tick, hooks=hooks
            )
            progress.close()
            writer.compact()  # manifest.json names every shard again; the shard log is gone
            manifest = writer.manifest
            log.info("auditing the dataset (%d problems)", len(job.problems))
            task = make_task(conf.task.name, **task_kwargs(conf))
            audit = audit_on(pool, out, manifest, job.problems, task, conf, models)
            write_audit(out, audit)
            write_card(out)
        except BaseException as e:  # what was written is kept; metrics.json must not say "running"
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            with contextlib.suppress(OSError):  # a full disk must not hide the error itself
                write_metrics(progress, status=status, error=f"{type(e).__name__}: {str(e)[:300]}")
            raise
        finally:
            progress.close()
            pool.shutdown()
        write_metrics(
            progress,
            status="finished",
            retries=stream["retries"],
            lost_runs=stream["lost_runs"],
            batches_by_worker=stream["by_worker"],
            wall_seconds=round(time.perf_counter() - t_start, 1),
            audit={k: audit.get(k) for k in ("pair_precision", "search_success", "greedy_success")},
        )
        return metrics
    finally:
        writer.close()  # the out dir's lock


def task_kwargs(conf) -> dict:
    """The task group's settings that `make_task` takes (the rest only shape the problem list):
    those of the task's own dataclass that the group has (jsonl: `max_steps`, `step_separator`)."""
    from mcts.tasks.registry import TASKS

    fields = (f.name for f in dataclasses.fields(TASKS[conf.task.name]) if f.name != "name")
    return {k: getattr(conf.task, k) for k in fields if hasattr(conf.task, k)}
