"""Shared fixtures for the job's tests (pipeline, distributed, CLI, configs).

Ray: ONE in-process session for the whole test run (`ray_session`), started with address="local"
so that it never attaches to a `ray start --head` cluster that CI runs beside it. Tests that do
not ask for it never import Ray.

The job workload of these tests (`JOB`): word problems (task=jsonl) searched by a random tiny
Llama. Its character vocabulary cannot write the `####` answer mark, so every tree grows to its
simulation budget (a random model on Countdown writes an invalid step at once and every tree
stops after one round): batches take long enough to be killed mid-flight, and trees are deep
enough that any nondeterminism between runs would show.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NUM_PROBLEMS = 8
JOB = (
    "experiment=tiny",
    "task=jsonl",
    "task.max_steps=4",
    f"task.num_problems={NUM_PROBLEMS}",
    "search.simulations=6",
    "search.batch_problems=2",
)


@pytest.fixture(scope="session")
def ray_session():
    """The test run's one Ray session (2 CPUs; pool actors ask for 0.5 CPU each)."""
    import ray

    from rewards.worker import WORKER_ENV

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": dict(WORKER_ENV)},
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    from _tiny_models import save_tiny_llama  # tests/ is on sys.path under pytest

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "policy")


@pytest.fixture(scope="session")
def tiny_critics(tiny_policy, tmp_path_factory) -> list[str]:
    """Untrained value / PRM / ORM critics on the tiny policy's trunk, as `critics.*_path` overrides."""
    from critics.models import init_from_policy, save_critic

    root = tmp_path_factory.mktemp("critics")
    for kind in ("value", "prm", "orm"):
        model, tok = init_from_policy(tiny_policy, kind, seed=1)
        save_critic(model, tok, kind, root / kind, {"note": "test"})
    return [f"critics.{kind}_path={root / kind}" for kind in ("value", "prm", "orm")]


@pytest.fixture(scope="session")
def word_problems(tmp_path_factory) -> Path:
    """A JSONL problem file of NUM_PROBLEMS + 2 small word problems."""
    path = tmp_path_factory.mktemp("problems") / "word.jsonl"
    rows = [
        {"id": f"w{i}", "question": f"{i} + {i + 1} = ?", "answer": 2 * i + 1}
        for i in range(NUM_PROBLEMS + 2)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def job_overrides(tiny_policy, word_problems):
    """`job_overrides(out, *extra)`: the overrides of the tests' workload writing to `out`."""

    def make(out: Path, *extra: str) -> list[str]:
        return [*JOB, f"task.path={word_problems}", f"policy.path={tiny_policy}", f"out={out}", *extra]

    return make


@pytest.fixture(scope="session")
def reference_run(ray_session, job_overrides, tmp_path_factory) -> Path:
    """An uninterrupted run of the workload with 2 workers: what every other run must reproduce."""
    from rewards.config import compose
    from rewards.pipeline import run

    out = tmp_path_factory.mktemp("reference") / "out"
    run(compose(job_overrides(out, "ray.num_workers=2")))
    return out


def _canonical(value):
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def dataset_records(out: Path) -> dict[str, list[str]]:
    """Every record of an output directory, per kind, as sorted canonical JSON strings (files in
    the manifest only); equal for two runs iff they wrote the same set of records."""
    import pyarrow.parquet as pq

    from rewards.export import load_manifest

    manifest = load_manifest(out)
    return {
        kind: canonical_rows([r for f in files for r in pq.read_table(Path(out) / f).to_pylist()])
        for kind, files in manifest["files"].items()
    }


def canonical_rows(rows: list[dict]) -> list[str]:
    """Rows as sorted JSON strings (NaN made comparable): a multiset of records."""
    return sorted(json.dumps({k: _canonical(v) for k, v in r.items()}, sort_keys=True) for r in rows)


@pytest.fixture(scope="session")
def records():
    """`records(out)`: see `dataset_records`."""
    return dataset_records


EASY = dict(min_numbers=4, max_numbers=4, max_number=6, max_target=24)  # deep enough trees, partly learned


@pytest.fixture(scope="session")
def solving_policy(tmp_path_factory) -> Path:
    """A tiny model trained by the embedded recipe on easy Countdown (~25 s; greedy ~0.1 on the job's
    problems): it solves some and fails others, so a job on it writes pairs and SFT rows to compare."""
    from mcts.embedded import TrainConfig, train_policy
    from mcts.tasks.countdown import CountdownDifficulty

    out = tmp_path_factory.mktemp("models") / "solver"
    cfg = TrainConfig(steps=900, batch_size=32, d_model=64, n_layers=2, n_heads=2, warmup=10, eval_problems=0)
    train_policy(out, 0, cfg, CountdownDifficulty(**EASY), progress=False)
    return out


@pytest.fixture(scope="session")
def countdown_job(solving_policy, tmp_path_factory):
    """`countdown_job(out, *extra)`: overrides of a small Countdown job on the solving policy."""
    from mcts.tasks.countdown import CountdownDifficulty, generate_problems

    path = tmp_path_factory.mktemp("problems") / "countdown.jsonl"
    problems = generate_problems(12, seed=5, difficulty=CountdownDifficulty(**EASY))
    path.write_text(
        "".join(
            json.dumps({"id": p.id, "numbers": p.meta["numbers"], "target": p.meta["target"]}) + "\n"
            for p in problems
        )
    )

    def make(out: Path, *extra: str) -> list[str]:
        return [
            f"task.path={path}",
            "task.num_problems=null",
            f"policy.path={solving_policy}",
            "policy.max_rollout_tokens=32",
            "critics=rollouts",
            "critics.rollouts=4",
            "search.simulations=16",
            "search.leaves_per_tree=2",
            "search.max_nodes=256",
            "search.max_depth=4",
            "search.root_width=6",
            "search.batch_problems=4",
            "rewards.confidence=0.5",
            "rewards.audit_pairs=8",
            "rewards.audit_rollouts=2",
            "rewards.audit_critic_problems=0",
            "progress=false",
            f"out={out}",
            *extra,
        ]

    return make
