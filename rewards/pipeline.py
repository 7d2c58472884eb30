"""The job: a Hydra app around a plain `run(cfg)`.

    arborist search                                # built-in Countdown, embedded default models, local Ray
    arborist search out=data seed=3 ray.num_workers=4
    arborist search ray.address=auto              # join a running `ray start --head` cluster

Config groups (`conf/`): task, policy, critics, search, rewards, ray, and an optional experiment.
The dataclasses below are their schemas (registered in Hydra's ConfigStore), so a key that does not
exist or a value of the wrong type fails at composition; `check_config` then checks the numbers
(`__post_init__` of each schema) and the inputs: the problem file, the model directories and the
output directory. All of that happens before Ray starts or anything is written, so bad input ends
in one line and an untouched output directory (see `rewards.cli`).

Unit of work: a fixed batch of consecutive problems (`search.batch_problems`). Its search seed
comes from the base seed and its problem ids (`mcts.search.problem_seed`), and it becomes shard
`shard-<batch index>`. So the records depend neither on which worker ran a batch, nor on retries,
nor on how often the job was resumed: a batch is either named by the manifest (skipped) or redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from critics.base import CriticsConfig
from mcts.policy import PolicyConfig
from mcts.search import SearchConfig
from mcts.tasks.base import Problem, TaskInputError
from rewards.job import JobInputError, shard_name

log = logging.getLogger("arborist")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# -- schemas (one per config group) -------------------------------------------------------------------
@dataclass
class TaskConf:
    """Group `task`: which problems (the task's own settings come from its option's schema)."""

    name: str = MISSING
    """Task name: countdown | jsonl."""
    path: str = ""
    """Problem file (JSONL or parquet rows with id, question, answer); "" = generate (countdown)."""
    num_problems: int | None = None
    """Keep the first N problems (generate N for countdown); null = all of the file."""

    def __post_init__(self) -> None:
        if self.num_problems is not None and self.num_problems < 1:
            raise ValueError(f"task.num_problems must be >= 1, got {self.num_problems}")


@dataclass
class CountdownTaskConf(TaskConf):
    """Countdown: generated with `seed` at this difficulty (see mcts.tasks.countdown)."""

    seed: int = 0
    """Problem generator seed; independent of the search seed, so `seed=N` re-searches the same problems."""
    min_numbers: int = 3
    max_numbers: int = 4
    min_number: int = 1
    max_number: int = 9
    min_target: int = 1
    max_target: int = 60


@dataclass
class JsonlTaskConf(TaskConf):
    """GSM8K-style word problems from `path` (see mcts.tasks.jsonl)."""

    max_steps: int = 16
    """Lines before a solution without a `####` answer counts as failed."""


@dataclass
class PolicyConf(PolicyConfig):
    """Group `policy`: mcts.policy.PolicyConfig, plus where the model comes from."""

    rollout_path: str = ""
    """A smaller policy for fast rollouts; "" = the policy itself."""
    bootstrap_seed: int = 0
    """Training seed of the embedded default policy (used when `path` is "")."""
    allow_embedded: bool = True
    """An empty `path` means the embedded default; false (policy=hf): an empty path is an error."""

    def __post_init__(self) -> None:
        if not self.path and not self.allow_embedded:
            raise ValueError(
                "policy.path is empty: set policy.path=DIR (a local Hugging Face model directory)"
            )
        if self.temperature <= 0:
            raise ValueError(f"policy.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"policy.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_step_tokens", "max_rollout_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k < 0:
            raise ValueError(f"policy.top_k must be >= 0, got {self.top_k}")


@dataclass
class SearchConf(SearchConfig):
    """Group `search`: mcts.search.SearchConfig, plus the unit of work and state merge."""

    batch_problems: int = 8
    """Problems per batch: one worker task, one forest, one shard."""
    merge_similarity: float = 1.0
    """State merge threshold: 1.0 merges options equal after the task's normal form only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_problems < 1:
            raise ValueError(f"search.batch_problems must be >= 1, got {self.batch_problems}")
        if not 0 < self.merge_similarity <= 1:
            raise ValueError(f"search.merge_similarity must be in (0, 1], got {self.merge_similarity}")


@dataclass
class RewardsConf:
    """Group `rewards`: rewards.derive.DeriveConfig (field docs there) plus the audit."""

    min_visits: int = 2
    min_margin: float = 0.2
    confidence: float = 0.9
    max_pairs_per_node: int = 3
    trajectory_min_visits: int = 1
    max_trajectories_per_tree: int = 32
    value_target: str = "success"
    kto_from_pairs: bool = True
    kto_trajectories: bool = True
    sft_solutions: int = 1
    audit_pairs: int = 256
    """Pairs whose exported first steps are re-rolled for audit.json's pair precision (>= 200 gives
    a Wilson interval about +-0.04 wide at 0.9); 0 skips the re-rollouts."""
    audit_critic_problems: int = 64
    """Problems the critics never trained on, searched by verified rollouts alone for audit.json's
    critic agreement (the critics score every node but steer nothing); 0 skips it."""
    audit_rollouts: int = 16
    """Fresh rollouts per prefix in that check."""
    greedy_baseline: bool = True
    """Decode every problem greedily once, for audit.json's search-minus-greedy gap."""

    def __post_init__(self) -> None:
        if self.audit_critic_problems < 0:
            raise ValueError(f"rewards.audit_critic_problems must be >= 0, got {self.audit_critic_problems}")
        if self.audit_pairs < 0 or self.audit_rollouts < 1:
            raise ValueError(
                f"rewards.audit_pairs must be >= 0 and rewards.audit_rollouts >= 1, "
                f"got {self.audit_pairs} and {self.audit_rollouts}"
            )
        try:
            self.derive_config()
        except ValueError as e:
            raise ValueError(f"rewards.{e}") from None

    def derive_config(self, config_hash: str = ""):
        from rewards.derive import DeriveConfig

        names = {f.name for f in dataclasses.fields(DeriveConfig)} - {"config_hash"}
        return DeriveConfig(**{n: getattr(self, n) for n in names}, config_hash=config_hash)


@dataclass
class RayConf:
    """Group `ray`: where the workers run."""

    address: str = "local"
    """"local": start Ray in this process, on this machine; "auto" or HOST:PORT: join that cluster."""
    num_workers: int = 2
    """Search actors; each loads the policy and critics once."""
    cpus_per_worker: float = 0.5
    """Ray CPUs reserved per actor (fractional is fine: the thread count is `torch_threads`)."""
    gpus_per_worker: float = 0.0
    """Ray GPUs per actor (set policy.device=cuda too)."""
    torch_threads: int = 1
    """torch threads per actor. Fixed, because float reductions differ across thread counts and the
    records must not depend on where a batch ran."""
    num_cpus: int | None = None
    """CPUs of a local Ray (address=local); null = all of this machine's."""
    max_retries: int = 3
    """Times a batch is resubmitted after its worker died, before the job gives up."""
    start_timeout_s: float = 600.0
    """Seconds to wait for the workers to load their models (and for the cluster to have room)."""
    log_to_driver: bool = False
    """Forward the workers' stdout/stderr to this terminal."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("ray.cpus_per_worker and ray.gpus_per_worker must be >= 0")
        if self.torch_threads < 1:
            raise ValueError(f"ray.torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_retries < 0:
            raise ValueError(f"ray.max_retries must be >= 0, got {self.max_retries}")
        if not self.address:
            raise ValueError("ray.address is empty: use ray.address=local, ray.address=auto or HOST:PORT")


@dataclass
class Config:
    """The whole job (`conf/config.yaml`)."""

    out: str = "arborist-out"
    """Output directory (created; rerunning with the same `out` resumes)."""
    seed: int = 0
    """Base search seed; each batch's seed is derived from it and the batch's problem ids."""
    progress: bool = True
    """Show the live progress bar on stderr."""
    task: TaskConf = MISSING
    policy: PolicyConf = field(default_factory=PolicyConf)
    critics: CriticsConfig = field(default_factory=CriticsConfig)
    search: SearchConf = field(default_factory=SearchConf)
    rewards: RewardsConf = field(default_factory=RewardsConf)
    ray: RayConf = field(default_factory=RayConf)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="task", name="countdown_schema", node=CountdownTaskConf)
    cs.store(group="task", name="jsonl_schema", node=JsonlTaskConf)
    cs.store(group="policy", name="schema", node=PolicyConf)
    cs.store(group="critics", name="schema", node=CriticsConfig)
    cs.store(group="search", name="schema", node=SearchConf)
    cs.store(group="rewards", name="schema", node=RewardsConf)
    cs.store(group="ray", name="schema", node=RayConf)


register_configs()


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The job's config with `overrides`, composed as `arborist search` would (tests, the CLI)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# -- checking the inputs --------------------------------------------------------------------------------
@dataclass
class Job:
    """A checked config and what it resolves to; everything the driver needs before Ray starts."""

    conf: Config
    problems: list[Problem]
    batches: list[list[Problem]]
    config: dict  # plain JSON-able config, recorded in the manifest
    config_hash: str  # of everything that shapes the records (not out, progress or ray)
    out: Path


def to_schema(cfg: DictConfig | Config) -> Config:
    """The typed config; every group's `__post_init__` checks its numbers. Raises JobInputError."""
    if isinstance(cfg, Config):
        return cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # to_object would quietly fall back to the schema's default
        raise JobInputError(f"{missing[0]} is required: set {missing[0]}=...")
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        raise JobInputError(str(e).splitlines()[0]) from None


def task_settings(task: TaskConf) -> dict:
    """The task group as keyword arguments of `mcts.tasks.make_task` / `load_problems`."""
    settings = dataclasses.asdict(task)
    settings.pop("name")
    settings["path"] = settings["path"] or None
    return settings


def _distinct(problems: list[Problem]) -> list[Problem]:
    """Each problem once by content (`content_key`): a duplicate would be searched twice and its
    records written twice under two ids. Later copies are dropped, with a note."""
    from mcts.tasks.base import content_key

    seen: set[str] = set()
    out = [p for p in problems if not ((k := content_key(p.question, p.meta)) in seen or seen.add(k))]
    if len(out) < len(problems):
        log.warning("dropped %d problems that repeat an earlier one's content", len(problems) - len(out))
    return out


def check_config(cfg: DictConfig | Config) -> Job:
    """Check everything that can be checked without training or loading a model.

    Raises JobInputError, TaskInputError or PolicyLoadError with a one-line message.
    """
    from mcts.tasks.registry import load_problems, make_task

    conf = to_schema(cfg)
    settings = task_settings(conf.task)
    make_task(conf.task.name, **{k: v for k, v in settings.items() if k == "max_steps"})
    problems = _distinct(load_problems(conf.task.name, **settings))
    if not problems:
        raise TaskInputError(f"task {conf.task.name!r} has no problems: check task.path / task.num_problems")
    _check_model_dirs(conf)
    size = conf.search.batch_problems
    batches = [problems[i : i + size] for i in range(0, len(problems), size)]
    out = Path(conf.out).expanduser().resolve()
    _check_out(out, batches)
    plain = OmegaConf.to_container(OmegaConf.structured(conf), resolve=True)
    shaping = {k: v for k, v in plain.items() if k not in ("out", "progress", "ray")}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return Job(conf, problems, batches, plain, digest, out)


def _check_model_dirs(conf: Config) -> None:
    from mcts.policy import check_policy_dir

    if conf.policy.path:
        check_policy_dir(conf.policy.path)
    if conf.policy.rollout_path:
        check_policy_dir(conf.policy.rollout_path)
    for kind, path in conf.critics.paths().items():
        if path and path != "default":
            from critics.models import check_critic_dir

            try:
                check_critic_dir(path, kind)
            except ValueError as e:
                raise JobInputError(str(e).splitlines()[0]) from None


def _check_out(out: Path, batches: list[list[Problem]]) -> None:
    """Refuse an output directory whose finished shards do not match this job's batches (resuming
    with another task, problem count or batch size would mix two layouts and duplicate problems)."""
    from rewards.export import load_manifest

    if out.exists() and not out.is_dir():
        raise JobInputError(f"out={out} is a file: choose a directory")
    try:
        manifest = load_manifest(out) if out.is_dir() else None
    except (OSError, ValueError) as e:
        raise JobInputError(f"{out}/manifest.json is unreadable ({e}): choose a new out=DIR") from None
    if not manifest:
        return
    shards = manifest.get("shards", {})
    for i, batch in enumerate(batches):
        entry = shards.get(shard_name(i))
        ids = sorted(p.id for p in batch)
        if entry is not None and entry["problem_ids"] != ids:
            raise JobInputError(
                f"out={out} holds {shard_name(i)} with other problems than this job's batch {i}: resume "
                "with the same task and search.batch_problems, or choose a new out=DIR"
            )
    done = set(manifest.get("finished_problem_ids", []))
    layout = {p.id for i, b in enumerate(batches) if shard_name(i) in shards for p in b}
    clash = sorted(done.intersection(p.id for b in batches for p in b) - layout)
    if clash:
        raise JobInputError(
            f"out={out} already finished problems {clash[:3]} in another batch layout: resume with the "
            "same task and search.batch_problems, or choose a new out=DIR"
        )


# -- the job ---------------------------------------------------------------------------------------------
def resolve_models(job: Job) -> dict[str, Any]:
    """Model directories for the workers; trains the embedded defaults first when they are needed."""
    from mcts.embedded import bootstrap_policy

    conf = job.conf
    t0 = time.perf_counter()
    embedded = not conf.policy.path
    policy = conf.policy.path or str(bootstrap_policy(conf.policy.bootstrap_seed, progress=conf.progress))
    critics_dir = None
    wants_default = "default" in conf.critics.paths().values()
    if wants_default and embedded and conf.task.name == "countdown":
        from rewards.critic_bootstrap import ensure_default_critics

        critics_dir = str(
            ensure_default_critics(conf.policy.bootstrap_seed, policy_dir=policy, progress=conf.progress)
        )
    return {"policy": policy, "critics_dir": critics_dir, "bootstrap_s": time.perf_counter() - t0}


def run(cfg: DictConfig | Config, hooks: Any = None) -> dict:
    """Run the job described by `cfg`; returns the metrics (also written to `out/metrics.json`).

    `hooks` (a `rewards.distributed.Hooks`) lets tests act at points of the job (kill a worker).
    Raises JobInputError / TaskInputError / PolicyLoadError on bad input, before writing anything.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rewards import distributed

    started = time.perf_counter()
    job = check_config(cfg)
    ray_conf = job.conf.ray
    with distributed.connect(ray_conf.address, ray_conf.num_cpus, ray_conf.log_to_driver):
        models = resolve_models(job)  # after Ray is up: a bad ray.address fails before a bootstrap
        metrics = distributed.run_job(job, models, hooks=hooks, started=started)
    report_done(metrics)
    return metrics


def report_done(metrics: dict) -> None:
    """Tell the user where the dataset went (stdout, so scripts can capture it)."""
    from rewards.records import KINDS

    rows = {k: metrics["rows"][k] for k in KINDS}
    audit = metrics.get("audit", {})
    print(f"arborist: dataset written to {metrics['out']}")
    print(
        f"  problems {metrics['problems_done']}/{metrics['problems_total']} "
        f"({metrics['problems_resumed']} resumed); " + ", ".join(f"{k} {v}" for k, v in rows.items())
    )
    print(
        f"  search success {audit.get('search_success')}, greedy {audit.get('greedy_success')}, "
        f"pair precision {audit.get('pair_precision')}; {metrics['nodes_per_s']} nodes/s; "
        f"details in metrics.json, audit.json, README.md"
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """`arborist search`: Hydra composes the config, `run` does the work; bad input is one line."""
    from mcts.policy import PolicyLoadError

    try:
        run(cfg)
    except (JobInputError, TaskInputError, PolicyLoadError) as e:
        print(f"arborist: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
