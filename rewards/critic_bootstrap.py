"""The embedded default critics: trained once here from the default policy's own search trees.

`ensure_default_critics(seed)` returns `<cache>/default-v1-seed{seed}/critics` (beside the default
policy of `mcts.embedded`, `<cache>` = `$ARBORIST_CACHE` or `~/.cache/arborist`) with `value/`,
`prm/`, `orm/` and `report.json`, building it first when it is missing, was trained on other
policy weights or from another trunk (each `critic.json` records both weights hashes), with
another recipe (`bootstrap.json` records it), or before critic.json carried the `logit_offset`:

1. the critics' trunk, `<cache>/default-v1-seed{seed}/critic-trunk` (`BootstrapCriticsConfig.trunk`):
   the embedded policy's model and training data, trained 8x longer, so it knows the arithmetic
   the 650-step policy gets wrong (built once, ~12 min on 2 cores; rebuilt when its recipe changes);
2. search `BootstrapCriticsConfig.problems` Countdown problems with the default policy, every new
   node valued by one verified fast rollout (no critics: the labels must come from the verifier);
   the problems are drawn with seed `CRITICS_SEED_BASE + seed`, and every (numbers, target) of the
   held-out evaluation problems (`mcts.embedded.EVAL_SEED`, first `EVAL_EXCLUDE`) is removed;
3. train the three critics from those trees (`rewards.train_critics`), each starting from the trunk;
   the value function also on ~29k states the Countdown solver labels (`rewards.solver_rows`).

The labels are the default policy's (its trees, its success rates); only the weights the critics
start from are the trunk's. The whole run is seeded; each directory appears atomically.

From an empty cache the two cores work side by side where this machine's kernels give the same
floats on one thread as on two (`mcts.aside.threads_agree`; they do here): the trunk trains in
a second process, on one core while this one trains the policy and runs step 2, on both after;
in step 3 the value function trains in a second process beside the PRM and the ORM. The weights
are those of a build one step after another (sha256), and the first command takes ~20 min
instead of ~25.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from critics.train import TrainCriticsConfig
from mcts.aside import Aside, threads_agree, usable_cores
from mcts.base import SearchConfig
from mcts.embedded import (
    TrainConfig,
    bootstrap_policy,
    built_on,
    default_difficulty,
    default_policy_dir,
    held_out_keys,
    train_minutes,
    trained_on,
    weights_hash,
)
from mcts.expander import ExpandConfig, PolicyExpander
from mcts.finished import FinishedTree
from mcts.policy import Policy, PolicyConfig
from mcts.search import run_search
from mcts.tasks.base import Problem, content_key
from mcts.tasks.countdown import CountdownTask, distinct_problems
from rewards.critic_data import all_labels
from rewards.solver_rows import solver_value_rows
from rewards.train_critics import train_critics_on_trees

CRITICS_SEED_BASE = 2_000_000  # bootstrap search problems: seed CRITICS_SEED_BASE + seed
# The bootstrap search and the heads on 2 cores, from a cached trunk: 625 s measured on a Xeon with
# the value function's three heads (value 310 s, PRM 57 s, ORM 85 s, search 152 s), before the heads
# shared their feature cache (~45 s less: `critics.features`).
BUILD_MINUTES = 10
# Policy, trunk and critics from an empty cache: 18-20 min measured on the EPYC (side by side) and
# the Xeon (one after another) before the value function's two more heads, which add ~4 min.
SIDE_BY_SIDE_MINUTES = 22


@dataclass(frozen=True)
class BootstrapCriticsConfig:
    """How the default critics are built (the defaults are the shipped recipe)."""

    problems: int = 6400
    """Training problems searched (one batch: one policy call per round serves all of them). More
    trees keep lifting the value function: from the policy's trunk (top block, 500 steps)
    validation value / PRM 0.588 / 0.547 with 800 problems, 0.703 / 0.707 with 3,200; from the
    critics' trunk (top block, 1,000 steps) held-out value 0.732 with 3,200, 0.756 with 6,400."""
    search: SearchConfig = field(
        default_factory=lambda: SearchConfig(simulations=16, max_depth=4, max_nodes=2048, root_width=0)
    )
    """Search of the bootstrap trees; nodes are valued by verified rollouts alone. No root widening:
    the critics learn from states at every depth, not a wide first step."""
    rollouts: int = 4
    """Verified rollouts per new node of the bootstrap search: a value target is a success rate
    over distinct samples, and with one rollout a node's rate rests on one or two of them."""
    trunk: TrainConfig | None = field(
        default_factory=lambda: TrainConfig(steps=5200, threads=2, time_cap_s=3600.0)
    )
    """The critics' own trunk: the embedded policy's model and data, trained 8x longer (built once
    beside the policy, `critic-trunk/`). The 650-step policy is kept weak on purpose (search must
    have room to work), but a critic must know the arithmetic that decides whether a state can
    still reach the target: 40 % of the policy's wrong answers have wrong arithmetic. None: start
    from the policy's own trunk (held-out AUROC value / PRM / ORM 0.630 / 0.708 / 0.855)."""
    train: TrainCriticsConfig = field(
        default_factory=lambda: TrainCriticsConfig(value_steps=3000, orm_steps=2000, value_members=3)
    )
    """Fine-tuning: the top block and the head, 1,000 steps (the value function 3,000, the ORM
    2,000: chosen on the bootstrap's validation split and the held-out pool's tune slice). The value
    function is three such heads, averaged: over the tune + audit slices 0.781 for one head (the
    mean of three seeds), 0.790 for two, 0.793 for three; three of 2,000 steps 0.785, one of 6,000
    0.783 (docs/measurements.md)."""
    max_step_tokens: int = 16
    """Policy token caps: Countdown steps are ~8 characters, solutions ~30."""
    labels: str = "trials-v4"
    """What the code derives labels from; a new value rebuilds cached critics. "trials-v2": success
    rates over distinct verified samples (not visits), distinct bootstrap problems by content, and
    a validation split by content (not by id); "trials-v3": options the width leaves out keep their
    verified samples (mcts.search); "trials-v4": a rollout the policy ends (EOS) without an answer
    is a wrong sample, and a hard label counts every verified success below a node, rollouts
    included (Math-Shepherd's estimate), not only a correct terminal of the tree."""
    max_rollout_tokens: int = 48
    solver_states: int = 90_000
    """Problems drawn for the value function's solver-labelled states (`rewards.solver_rows`; 0:
    none): ~29k rows, from problems the trunk trained on less the held-out pool and the bootstrap's
    own. Value AUROC over the tune + audit slices (4,723 positions, three search seeds), training
    seeds 0 / 1 / 2: 0.768 / 0.757 / 0.753 on the search's rows alone, 0.779 / 0.775 / 0.785 with
    these (docs/measurements.md)."""
    threads: int = 2


def build_minutes(missing: list[str], cfg: BootstrapCriticsConfig | None = None) -> float:
    """Roughly how long building the `missing` embedded models takes here ("policy",
    "critic-trunk", "critics"): side by side when the trunk and the critics are both missing (as on
    this machine; one step after another, where `side_by_side_ok` says no, it is the sum)."""
    cfg = cfg or BootstrapCriticsConfig()
    if cfg.trunk is not None and {"critic-trunk", "critics"} <= set(missing):
        return SIDE_BY_SIDE_MINUTES - (0.0 if "policy" in missing else train_minutes(TrainConfig()))
    estimate = {"policy": train_minutes(TrainConfig()), "critics": BUILD_MINUTES}
    estimate["critic-trunk"] = train_minutes(cfg.trunk) if cfg.trunk is not None else 0.0
    return sum(estimate[name] for name in missing)


def default_critics_dir(seed: int = 0) -> Path:
    """`<cache>/default-v1-seed{seed}/critics`, beside the default policy."""
    return default_policy_dir(seed).parent / "critics"


def _trunk_ready(train: TrainConfig, root: Path) -> bool:
    """`root/critic-trunk` is built, with this recipe."""
    report = root / "critic-trunk" / "bootstrap.json"
    recipe = json.loads(json.dumps(asdict(train)))
    return report.is_file() and json.loads(report.read_text()).get("train") == recipe


def ensure_critic_trunk(
    seed: int, train: TrainConfig, root: Path, progress: bool = True, step_hook=None
) -> Path:
    """`root/critic-trunk`: the embedded model trained with `train`, rebuilt when its recipe changed."""
    stale = (root / "critic-trunk").is_dir() and not _trunk_ready(train, root)
    return bootstrap_policy(
        seed, force=stale, progress=progress, train=train, root=root, name="critic-trunk", step_hook=step_hook
    )


def _build_trunk(seed: int, train: TrainConfig, root: Path, step_hook=None) -> None:
    """`ensure_critic_trunk` without its progress bar: what the second process runs (`mcts.aside`)."""
    ensure_critic_trunk(seed, train, root, progress=False, step_hook=step_hook)


def side_by_side_ok(cfg: BootstrapCriticsConfig) -> bool:
    """Whether the build may put two cores side by side: two usable cores, and this machine's kernels
    give the same floats on one thread as on each thread count the build switches to (checked on a
    training step and a forward pass of the trunk's shape: `mcts.aside.threads_agree`)."""
    counts = {cfg.threads, cfg.train.threads, *([cfg.trunk.threads] if cfg.trunk is not None else [])}
    shape = cfg.trunk or TrainConfig()
    return usable_cores() >= 2 and all(threads_agree(shape, n) for n in sorted(counts) if n > 1)


def training_problems(n: int, seed: int) -> list[Problem]:
    """`n` bootstrap problems, distinct by content, none of them in the held-out evaluation pool."""
    return distinct_problems(n, CRITICS_SEED_BASE + seed, default_difficulty(), exclude=held_out_keys())


def critics_trained_on(seed: int = 0, cfg: BootstrapCriticsConfig | None = None) -> set[str]:
    """Content keys of every problem the default critics saw in training: the trunk's solver traces
    and the bootstrap search problems (the value function's solver states come from the first)."""
    cfg = cfg or BootstrapCriticsConfig()
    return trained_on(seed, cfg.trunk) | {
        content_key(p.question, p.meta) for p in training_problems(cfg.problems, seed)
    }


def rollout_trees(
    policy_dir: str | Path,
    problems: list[Problem],
    search: SearchConfig,
    seed: int,
    rollouts: int = 1,
    **policy_caps,
) -> list[FinishedTree]:
    """Trees of a search valued by verified rollouts alone (`rollouts` per new node)."""
    task = CountdownTask()
    policy = Policy.load(PolicyConfig(path=str(policy_dir), **policy_caps))
    expander = PolicyExpander(policy, task, ExpandConfig(rollouts=rollouts, w_value=0.0, w_prm=0.0))
    return run_search(problems, task, expander, search, seed=seed)


def recipe(cfg: BootstrapCriticsConfig | None = None) -> dict:
    """The recipe as bootstrap.json records it (plain JSON): what `_fresh` compares, and what a
    job's config hash takes of the embedded critics (`rewards.pipeline.input_hashes`)."""
    return json.loads(json.dumps(asdict(cfg or BootstrapCriticsConfig()), default=float))


def _fresh(final: Path, policy_sha: str, trunk_sha: str, cfg: BootstrapCriticsConfig) -> bool:
    """Built for these policy weights, from this trunk, with this recipe (a change rebuilds)."""
    if not (final / "report.json").is_file() or not (final / "bootstrap.json").is_file():
        return False
    if json.loads((final / "bootstrap.json").read_text()).get("config") != recipe(cfg):
        return False
    for kind in cfg.train.kinds:
        meta_file = final / kind / "critic.json"
        if not meta_file.is_file():
            return False
        meta = json.loads(meta_file.read_text())
        # critics built before the ORM's prior correction was recorded (no logit_offset) are rebuilt
        if meta.get("policy_sha256") != policy_sha or "logit_offset" not in meta:
            return False
        if meta.get("base_sha256") != trunk_sha:
            return False
    return True


def ensure_default_critics(
    seed: int = 0,
    policy_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    cfg: BootstrapCriticsConfig | None = None,
    root: str | Path | None = None,
) -> Path:
    """Directory of the default critics for the default policy of `seed` (or `policy_dir`),
    built first when missing or stale (the policy too, when `policy_dir` is None and it is not
    cached). `cfg` and `root` are for tests and experiments.

    Where two cores are usable and this machine's kernels give the same floats on one thread as on
    two (`side_by_side_ok`), they work side by side (`mcts.aside`): when the trunk is built too, it
    trains in a second process while this one trains the policy and runs the bootstrap search
    (and is trained here after, should that process fail); the critic with the most steps trains in
    a second process beside the others. The weights are those of a build one step after another
    (tests; the whole build's sha256: docs/measurements.md)."""
    import torch

    cfg = cfg or BootstrapCriticsConfig()
    final = Path(root) if root is not None else default_critics_dir(seed)
    side_by_side = None  # decided when a build is due (the check takes a few seconds)
    trunk_aside = None
    build_all = cfg.trunk is not None and not _trunk_ready(cfg.trunk, final.parent)
    if build_all and (force or not (final / "report.json").is_file()):
        side_by_side = side_by_side_ok(cfg)
        if side_by_side:
            trunk_aside = Aside(
                _build_trunk, (seed, cfg.trunk, final.parent), "arborist-critic-trunk", cfg.trunk.threads
            )
            if progress:
                print(
                    f"arborist: training the critics' trunk into {final.parent / 'critic-trunk'} in a second "
                    "process (one core while the policy trains and the bootstrap search runs, both after)",
                    file=sys.stderr,
                )
    try:
        policy_dir = Path(policy_dir) if policy_dir is not None else bootstrap_policy(seed, progress=progress)
        sha = weights_hash(policy_dir)
        if trunk_aside is None:
            base = (
                policy_dir
                if cfg.trunk is None
                else ensure_critic_trunk(seed, cfg.trunk, final.parent, progress)
            )
            base_sha = sha if cfg.trunk is None else weights_hash(base)
            if not force and _fresh(final, sha, base_sha, cfg):
                return final
        if side_by_side is None:
            side_by_side = side_by_side_ok(cfg)
        if progress:
            print(
                f"arborist: training the default critics into {final} (once, ~{BUILD_MINUTES:.0f} min)",
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if trunk_aside is not None else cfg.threads)  # the trunk has the other core
        try:
            problems = training_problems(cfg.problems, seed)
            trees = rollout_trees(
                policy_dir,
                problems,
                cfg.search,
                seed,
                rollouts=cfg.rollouts,
                max_step_tokens=cfg.max_step_tokens,
                max_rollout_tokens=cfg.max_rollout_tokens,
            )
        finally:
            torch.set_num_threads(threads)
        search_s = time.perf_counter() - t0
        if trunk_aside is not None:
            trunk_aside.more_threads()
            if not trunk_aside.wait(cfg.trunk.steps, "training the embedded critic-trunk", progress):
                print(
                    f"arborist: the critics' trunk failed in its second process (exit code "
                    f"{trunk_aside.process.exitcode}; its error is above): training it here",
                    file=sys.stderr,
                )
            base = ensure_critic_trunk(seed, cfg.trunk, final.parent, progress)
            base_sha = weights_hash(base)
            if progress:
                report = json.loads((base / "bootstrap.json").read_text())
                figures = {k: report[k] for k in ("greedy_success", "pass@8") if k in report}
                print(
                    f"arborist: critics' trunk ready ({report['train_seconds']} s of training, {figures})",
                    file=sys.stderr,
                )
    finally:
        if trunk_aside is not None:
            trunk_aside.stop()
    wait_s = time.perf_counter() - t0 - search_s  # for the trunk, where it trained beside the search
    solved = sum(bool((t.nodes["terminal"] & (t.nodes["outcome"] == 1)).any()) for t in trees)
    meta = {
        "policy_sha256": sha,
        "policy_dir": str(policy_dir),
        "base_sha256": base_sha,
        "bootstrap": {
            "seed": seed,
            "problem_seed": CRITICS_SEED_BASE + seed,
            "problems": len(problems),
            "search_success": solved / max(1, len(trees)),
            "nodes": sum(t.num_nodes for t in trees),
            "search_seconds": round(search_s, 1),
            "config": asdict(cfg),
        },
    }
    labels = all_labels(trees, cfg.train.min_verified)
    extra = None
    if cfg.solver_states and "value" in cfg.train.kinds:
        rows, rate = solver_value_rows(
            labels["value"], problems, cfg.solver_states, seed, default_difficulty(), held_out_keys(),
            cfg.train.val_fraction, cfg.train.seed, within=trained_on(seed, cfg.trunk),
        )  # fmt: skip
        extra, meta["bootstrap"]["solver_value_rows"] = {"value": rows}, {"rows": len(rows), "rate": rate}
    reports = train_critics_on_trees(
        trees, final, base, cfg.train, meta=meta, side_by_side=side_by_side, labels=labels, extra_train=extra
    )
    total = time.perf_counter() - t0
    summary = {
        **meta["bootstrap"],
        "side_by_side": bool(side_by_side),  # the trunk (when built here) and the critics, two cores
        "built_on": built_on(),  # these weights come back from this seed on this kind of CPU only
        "trunk_wait_seconds": round(wait_s, 1),
        "train_seconds": round(total - search_s - wait_s, 1),
        "seconds": round(total, 1),
    }
    (final / "bootstrap.json").write_text(
        json.dumps({**summary, "critics": reports}, indent=2, default=float)
    )
    if progress:
        aurocs = {k: round(r["val_auroc"], 3) for k, r in reports.items()}
        print(
            f"arborist: default critics ready in {total:.0f} s (validation AUROC {aurocs})", file=sys.stderr
        )
    return final
