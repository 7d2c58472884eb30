"""The job's settings: one schema per Hydra config group, registered in Hydra's ConfigStore, so a
key that does not exist or a value of the wrong type fails at composition; each schema's
`__post_init__` checks its numbers. `compose(overrides)` builds the config `arborist search` runs.

Config groups (`conf/`): task, policy, critics, search, rewards, ray, and an optional experiment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from critics.base import CriticsConfig
from mcts.base import PolicyConfig, SearchConfig
from mcts.tasks.countdown import CountdownDifficulty
from mcts.tasks.jsonl import JsonlTask, unescape
from mcts.tasks.registry import GENERATED_PROBLEMS
from rewards.derive import DeriveConfig

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

    name: str = "countdown"
    num_problems: int | None = None
    """Generate N problems (null: `mcts.tasks.registry.GENERATED_PROBLEMS`, 256); with task.path, keep
    the first N of the file (null: all of it)."""
    seed: int = 0
    """Problem generator seed; independent of the search seed, so `seed=N` re-searches the same problems."""
    # The generator's own defaults and checks (mcts.tasks.countdown.CountdownDifficulty).
    min_numbers: int = CountdownDifficulty.min_numbers
    max_numbers: int = CountdownDifficulty.max_numbers
    min_number: int = CountdownDifficulty.min_number
    max_number: int = CountdownDifficulty.max_number
    min_target: int = CountdownDifficulty.min_target
    max_target: int = CountdownDifficulty.max_target

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_problems is None and not self.path:  # the count generated is part of the config hash
            self.num_problems = GENERATED_PROBLEMS


@dataclass
class JsonlTaskConf(TaskConf):
    """GSM8K-style word problems from `path` (see mcts.tasks.jsonl)."""

    name: str = "jsonl"

    max_steps: int = JsonlTask.max_steps
    """Steps before a solution without a `####` answer counts as failed (checked by JsonlTask)."""
    step_separator: str = JsonlTask.step_separator
    """What ends a step, written after each one (the policy stops at it): a line by default;
    '\\n\\n' for paragraph steps. `\\n`, `\\t` and `\\\\` are read as escapes (a command line passes
    them as text), once, here: the config and its hash hold the separator itself."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.step_separator = unescape(self.step_separator)


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
        super().__post_init__()


@dataclass
class SearchConf(SearchConfig):
    """Group `search`: mcts.base.SearchConfig, plus the job's unit of work and the expander's state
    merge."""

    batch_problems: int = 16
    """Problems per batch: one worker task, one forest, one shard. 16 keeps the policy's batches
    full while the default job's 256 problems still make 16 shards for 2 workers to share."""

    merge_similarity: float = 1.0
    """State merge of a node's new options (mcts.merge): 1.0 merges options equal after the task's
    normal form only; lower also merges options whose normal forms are this similar."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_problems < 1:
            raise ValueError(f"search.batch_problems must be >= 1, got {self.batch_problems}")
        if not 0 < self.merge_similarity <= 1:
            raise ValueError(f"search.merge_similarity must be in (0, 1], got {self.merge_similarity}")


@dataclass
class RewardsConf(DeriveConfig):
    """Group `rewards`: rewards.derive.DeriveConfig (how trees become records; field docs there),
    plus the audit."""

    audit_pairs: int = 256
    """Pairs whose exported texts are re-rolled for audit.json's pair precision (>= 200 gives a
    Wilson interval about +-0.04 wide at 0.9); 0 skips the re-rollouts."""
    audit_critic_problems: int = 64
    """Problems the critics never trained on, searched by verified rollouts alone for audit.json's
    critic agreement (the critics score every node but steer nothing); 0 skips it."""
    audit_rollouts: int = 16
    """Fresh rollouts per prefix in those checks: with 8, two weak prefixes often tie at 0/8, which
    says nothing either way."""
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
            super().__post_init__()
        except ValueError as e:
            raise ValueError(f"rewards.{e}") from None


@dataclass
class RayConf:
    """Group `ray`: where the workers run."""

    address: str = "local"
    """"local": start Ray in this process, on this machine; "auto" or HOST:PORT: join that cluster."""
    num_workers: int = 2
    """Search actors; each loads the policy and critics once."""
    batches_per_worker: int = 1
    """Batches in flight on each actor, searched side by side (`mcts.search.SearchStream`): their
    rounds share the policy's and critics' calls, so fewer, fuller forward passes (a GPU's gain; a
    CPU's is small). Each batch draws what it draws alone, but above 1 float columns (priors,
    critic scores, q) move by rounding (<= 2.1e-6 measured) with which batches happened to share a
    call (every sampled step was the same in every run measured; a near-tie could flip): 1 keeps
    the records bit-identical across runs and workers."""
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
    """Times a batch's worker may die while the batch runs there (each time it is resubmitted) before
    the job gives up; a worker lost before the batch began on it costs the batch nothing."""
    start_timeout_s: float = 600.0
    """Seconds to wait for the workers to load their models (and for the cluster to have room)."""
    log_to_driver: bool = False
    """Forward the workers' stdout/stderr to this terminal."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.batches_per_worker < 1:
            raise ValueError(f"ray.batches_per_worker must be >= 1, got {self.batches_per_worker}")
        for name in ("cpus_per_worker", "gpus_per_worker"):  # Ray takes finite amounts in 1/10,000 units
            value = getattr(self, name)
            if not 0 <= value < math.inf or round(value, 4) != value:
                raise ValueError(f"ray.{name} must be >= 0 with at most 4 decimals, got {value}")
        if self.torch_threads < 1:
            raise ValueError(f"ray.torch_threads must be >= 1, got {self.torch_threads}")
        if self.max_retries < 0:
            raise ValueError(f"ray.max_retries must be >= 0, got {self.max_retries}")
        if not self.address:
            raise ValueError("ray.address is empty: use ray.address=local, ray.address=auto or HOST:PORT")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus must be >= 1 (or null: every CPU here), got {self.num_cpus}")
        if not 0 < self.start_timeout_s <= 86400:
            raise ValueError(f"ray.start_timeout_s must be in (0, 86400], got {self.start_timeout_s}")


@dataclass
class Config:
    """The whole job (`conf/config.yaml`)."""

    out: str = "arborist-out"
    """Output directory (created; rerunning with the same `out` resumes)."""
    seed: int = 0
    """The job's seed: each batch's search seed is derived from it and the batch's problem ids
    (`mcts.search.problem_seed`); the audit draws its pair sample, its re-rollouts and its critic
    search from it. Which problems are searched is `task.seed`'s."""
    progress: bool = True
    """Show the live progress bar on stderr."""
    append_run: bool = False
    """Add records to an `out` written under another config (recorded as a new run in the
    manifest's config_history); without it such a resume refuses and names the keys that differ."""
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
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides))
        except ValueError as e:  # `search=null`: Hydra's own check, a ValueError with a stack of its own
            if "Config group override" not in str(e):
                raise
            nulls = (o.split("=", 1)[0] for o in overrides if o.split("=", 1)[-1] in ("", "null"))
            group = next((g for g in nulls if (CONF_DIR / g).is_dir()), "a group")
            raise ConfigCompositionException(
                f"{group} is a config group: name one of its options ({group}=default), not null or nothing"
            ) from None
