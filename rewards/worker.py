"""A search worker: one policy, its critics and an expander, loaded once, serving whole batches.

`SearchWorker` is a plain class; `rewards.launcher` makes Ray actors of it. It loads the models,
warms the numba kernels on a tiny search, then serves `run_batch(problems, search_seed)` (the finished
trees), and the audit's model work: re-rollouts, greedy decoding and an unsteered search.

The batches a worker has in flight (Ray calls `run_batch` from `ray.batches_per_worker` threads) are
searched side by side by one engine thread (`mcts.search.SearchStream`): their rounds share the
policy's and the critics' calls, and a batch whose trees are nearly done fills the calls of a new one
instead of running small calls of its own. Each batch still grows the trees it grows alone.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from critics.base import CriticsConfig
from mcts.base import SearchConfig, problem_seed
from mcts.finished import FinishedTree
from mcts.policy import PolicyConfig
from mcts.tasks.base import Problem

WORKER_ENV = {
    # transformers reads these at import time: set them before any worker imports it.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def as_base(cls, obj):
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
    merge_similarity: float
    torch_threads: int
    warmup_problem: Problem


@dataclass(eq=False)
class _Batch:
    """A batch handed from a `run_batch` call to the engine thread, and its answer."""

    problems: list[Problem]
    seed: int
    done: threading.Event = field(default_factory=threading.Event)
    trees: list[FinishedTree] | None = None
    error: BaseException | None = None
    started: float = field(default_factory=time.perf_counter)
    side_by_side: int = 0  # the most batches searched in one of its rounds, itself included
    busy: float = 0.0  # engine seconds spent on it: its own start, and its share of each round it was in


def _own_copy(error: BaseException) -> BaseException:
    """A copy of `error` to raise in one caller's thread (one exception object raised in several
    threads would share, and tangle, its traceback); what is not an `Exception` (the engine stopped
    by SystemExit or KeyboardInterrupt) as a plain error, not as the caller's own exit."""
    if not isinstance(error, Exception):
        return RuntimeError(f"the search engine stopped: {type(error).__name__}: {error}")
    try:
        return copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied: a plain one
        return RuntimeError(f"{type(error).__name__}: {error}")


class SearchWorker:
    """One policy, its critics and an expander, loaded once (a Ray actor: `rewards.launcher.WorkerPool`)."""

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
        merge = spec.merge_similarity
        self.expander = PolicyExpander(self.policy, self.task, spec.critics, rollout, critics, merge)
        # The audit's expander: nodes valued by one verified rollout alone, the critics scoring every
        # node without steering anything (their weights are 0), so their agreement with the verifier
        # is measured on trees they did not shape.
        unsteered = replace(spec.critics, rollouts=max(1, spec.critics.rollouts), w_rollout=1.0)
        unsteered = replace(unsteered, w_value=0.0, w_prm=0.0, w_orm=0.0, verifier_at_terminals=True)
        self.audit_expander = PolicyExpander(self.policy, self.task, unsteered, rollout, critics, merge)
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        # Compile / load the numba kernels and torch's kernels now, not inside the first batch.
        # Every policy call reseeds its own generator, so this leaves no trace in later results.
        warm = SearchConfig(simulations=2, leaves_per_tree=1, num_options=2, max_nodes=64)
        self._search([spec.warmup_problem], warm, 0)
        self.warm_s = time.perf_counter() - t0
        self._models = threading.Lock()  # one user of the models at a time: a search round or an audit call
        self._inbox: queue.Queue[_Batch] = queue.Queue()
        self._engine: threading.Thread | None = None
        self._engine_start = threading.Lock()

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

    def run_batch(self, problems: list[Problem], search_seed: int) -> tuple[list[FinishedTree], dict]:
        """The batch's finished trees, searched beside the other batches in flight on this worker.
        In the stats, `seconds` runs from hand-in to finish (side by side, batches overlap) and
        `busy_seconds` is the engine time that was this batch's (a round of n batches counts 1/n
        to each), so a worker's busy seconds sum to its engine's working time."""
        batch = _Batch(problems, search_seed)
        # The check and the hand-in under one lock: an engine that dies empties the inbox under it.
        with self._engine_start:
            if self._engine is None or not self._engine.is_alive():
                self._engine = threading.Thread(target=self._serve, name="search-engine", daemon=True)
                self._engine.start()
            self._inbox.put(batch)
        batch.done.wait()
        if batch.error is not None:
            raise _own_copy(batch.error) from batch.error  # batches fail together: each caller its own
        stats = {
            "seconds": time.perf_counter() - batch.started,
            "busy_seconds": batch.busy,
            "pid": os.getpid(),
            "side_by_side": batch.side_by_side,
        }
        return batch.trees, stats

    def _serve(self) -> None:
        """The engine thread: one round of every batch in flight at a time, new batches joining at
        the next round; a batch's caller is woken when its trees are finished or its search failed
        (a failed round fails the batches in it; the engine goes on with the next ones). If the
        engine itself breaks, every batch it holds or that waits fails, and the next call starts a
        new engine."""
        import torch

        from mcts.search import SearchStream

        torch.set_num_threads(self.spec.torch_threads)  # this thread's own setting: the records need it
        stream = SearchStream(self.task, self.expander, self.spec.search)
        held: list[_Batch] = []  # taken from the inbox, not answered yet
        running: list[_Batch] = []  # of those, the ones in the stream

        def answer(batch: _Batch, trees=None, error: BaseException | None = None) -> None:
            held.remove(batch)
            batch.trees, batch.error = trees, error
            batch.done.set()

        try:
            while True:
                waiting = [self._inbox.get()] if not running else []  # idle: sleep until a batch comes
                while True:
                    try:
                        waiting.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                held += waiting
                for batch in waiting:
                    t0 = time.perf_counter()
                    try:
                        stream.add(batch, batch.problems, batch.seed)
                    except Exception as e:  # noqa: BLE001 - this batch's own input: it alone fails
                        answer(batch, error=e)
                        continue
                    batch.busy += time.perf_counter() - t0
                    running.append(batch)
                for batch in running:
                    batch.side_by_side = max(batch.side_by_side, len(running))
                try:
                    with self._models:
                        t0 = time.perf_counter()  # inside the lock: waiting for an audit call is not work
                        finished = stream.step()
                except Exception as e:  # noqa: BLE001 - handed to every caller in the round
                    failed, running = running, []
                    for batch in failed:
                        answer(batch, error=e)
                    stream.close()
                    continue
                spent = time.perf_counter() - t0
                for batch in running:  # a round with every batch in it: each its share
                    batch.busy += spent / len(running)
                for batch, trees in finished:
                    running.remove(batch)
                    answer(batch, trees)
        except BaseException as e:  # the engine itself broke
            with contextlib.suppress(BaseException):
                stream.close()  # its caches emptied here, not by a collector in another thread later
            with self._engine_start:
                self._engine = None
                for batch in list(held):
                    answer(batch, error=e)
                while not self._inbox.empty():
                    held.append(batch := self._inbox.get_nowait())
                    answer(batch, error=e)
            raise

    def audit_batch(self, problems: list[Problem], search_seed: int) -> tuple[list[FinishedTree], dict]:
        """Rollout-valued trees of `problems` with every critic's score recorded: value and PRM at
        the nodes they scored during the search, the ORM at every verified terminal afterwards; a
        batch of the driver's stream (`launcher.stream_batches`)."""
        with self._models:
            return self._audit_search(problems, search_seed), {"pid": os.getpid()}

    def _audit_search(self, problems: list[Problem], search_seed: int) -> list[FinishedTree]:
        from mcts.search import run_search

        trees = run_search(problems, self.task, self.audit_expander, self.spec.search, seed=search_seed)
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

    def rerollout_batch(
        self, items: list[tuple[Problem, list[str]]], seed: int, n: int
    ) -> tuple[list[float], dict]:
        """Success rate of `n` fresh verified rollouts from each (problem, prefix steps); a batch of
        the driver's stream, seeded by `seed` and the items' content (problem ids and prefixes), so
        its draws depend on neither where nor beside what it ran."""
        sep = self.task.step_separator
        rollout_seed = problem_seed(seed, "|".join(f"{p.id}:{sep.join(steps)}" for p, steps in items))
        prompts = [self.expander.prompt(p, steps) for p, steps in items for _ in range(n)]
        # as a search batch: nothing carried over from other work
        with self._models, self.expander.fresh_caches():
            outs = self.policy.rollout(prompts, seed=rollout_seed, sep=sep) if prompts else []
        hits = [
            self.task.check(items[j // n][0], [*items[j // n][1], *r.steps]).success is True
            for j, r in enumerate(outs)
        ]
        return [sum(hits[i * n : (i + 1) * n]) / n for i in range(len(items))], {"pid": os.getpid()}

    def greedy_success(self, problems: list[Problem]) -> list[bool]:
        """Greedy decoding of each problem, verified."""
        with self._models, self.expander.fresh_caches():
            outs = self.policy.greedy([self.task.prompt(p) for p in problems], sep=self.task.step_separator)
        return [self.task.check(p, r.steps).success is True for p, r in zip(problems, outs, strict=True)]
