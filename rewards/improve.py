"""`arborist improve --out DIR`: rounds of search -> derive -> train -> evaluate, on-policy.

    arborist improve --out improve-out                     # 3 rounds of 10,000 from the embedded policy
    arborist improve --out improve-out --recipe sft        # the rejection-sampling baseline

Round k (1..rounds) searches `problems_per_round` newly drawn Countdown problems with round k-1's policy
(round 0 is the base policy), derives the dataset (`arborist search` itself, in-process), trains
with `arborist train`'s recipe starting from round k-1's policy on the datasets of rounds 1..k
(`replay`; the rows of earlier rounds come from earlier policies, all verified), and evaluates the
new policy on held-out problems. Everything a round makes stays under `out/round-k/`:

    problems.jsonl   the round's training problems (distinct by content within the round, the
                     held-out pool removed)
    data/            the search job's dataset (manifest, shards, audit.json)
    policy/          the trained model (policy.path= takes it)
    eval.json        held-out greedy success, pass@k, distinct verified solutions per problem

A round whose eval.json exists is done; an interrupted round resumes where it stopped (the search
job resumes from its manifest, training reruns from the rounds' datasets); `out/improve.json` keeps
the settings the run started with, and a rerun with others is refused (more `rounds` extend it).
Training problems of round k come from generator seed `IMPROVE_SEED_BASE + 1000 * seed + k`; the
held-out pool (`mcts.embedded.evaluation_problems`) is excluded from every round by content, and
the evaluation uses its `eval_split` slice ("test": no tuning looked at it). Rounds are not
disjoint from each other: at the default difficulty the generator holds ~17,000 distinct problems
outside the held-out pool, so rounds of 10,000 re-search earlier rounds' problems with the newer
policy (new trees, new solutions: round 2 drew 4,206 problems round 1 had not, round 3 2,301;
16,507 distinct in the three), as expert iteration over a fixed training set does.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rewards.train import TrainInputError, TrainPolicyConfig

IMPROVE_SEED_BASE = 3_000_000


@dataclass(frozen=True)
class ImproveConfig:
    """The improvement loop (defaults: the shipped recipe on the embedded policy)."""

    rounds: int = 3
    problems_per_round: int = 10000
    """Volume is what lifts the embedded policy (docs/improve-recipes.md): on the tune slice greedy
    success rose ~0.045 per doubling of verified solutions, and 3 rounds of 6,000 read +0.153 there
    but +0.106 on the test slice; 10,000 a round (~12 min of search here) with `replay`."""
    simulations: int = 32
    rollouts: int = 8
    """Verified rollouts per new node (no learned critics: they were trained for the base policy)."""
    sft_solutions: int = 16
    """Distinct verified solutions per problem in the round's `sft` rows (`rewards.sft_solutions`):
    the search finds ~1.4 per solved problem, and every one is training data."""
    replay: bool = True
    """Round k trains on the rows of rounds 1..k, not k's alone. Tune slice, on the rounds of a 3 x
    6,000 run (docs/improve-recipes.md): round 2 0.315 -> 0.339 greedy, round 3 0.353 -> 0.363
    greedy and pass@16 0.763 -> 0.831. Training stays cheap next to search: at the defaults round 3
    trains on ~37,000 rows in ~6 min here, its search takes ~12."""
    eval_split: str = "test"
    eval_problems: int = 0
    """Held-out problems evaluated (0: the whole slice)."""
    pass_k: int = 16
    seed: int = 0
    """Seeds the rounds' training problems (`round_problems`), each round's search (`seed * 1000 + k`)
    and the evaluation's samples; the training seed is `train.seed`."""
    num_workers: int = 2
    train: TrainPolicyConfig = field(default_factory=TrainPolicyConfig)

    def __post_init__(self) -> None:
        for name in ("rounds", "problems_per_round", "simulations", "pass_k", "num_workers", "sft_solutions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rollouts", "eval_problems", "seed"):  # eval_problems 0: the whole slice
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# Settings a finished round depends on: a rerun of the same --out with other values would mix rounds
# made two ways under one summary. `rounds` may grow (later rounds extend the run), `num_workers`
# does not change a record.
_RESUMABLE = ("rounds", "num_workers")


def check_settings(out: Path, cfg: ImproveConfig) -> None:
    """Record the run's settings in `out/improve.json`, or refuse settings that differ from them
    (a run from before improve.json is checked against its summary.json, which had no `replay`)."""
    from rewards.export import atomic_write_text, differing_keys

    now = {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in _RESUMABLE}
    path, summary = out / "improve.json", out / "summary.json"
    if path.is_file():
        was = json.loads(path.read_text())
    elif summary.is_file():
        was = {"replay": False, **json.loads(summary.read_text())["config"]}
    else:
        was = now
    diff = differing_keys(was, now, _RESUMABLE)
    if diff:
        said = ", ".join(f"{k}={was.get(k)!r}" for k in diff)
        raise TrainInputError(
            f"{out} was started with {said}: rerun with those settings, or choose a new --out"
        )
    if not path.is_file():
        atomic_write_text(path, json.dumps(now, indent=2) + "\n")


def round_problems(k: int, n: int, seed: int) -> list:
    """`n` distinct Countdown problems for round k, none in the held-out pool (by content)."""
    from mcts.embedded import default_difficulty, held_out_keys
    from mcts.tasks.countdown import distinct_problems

    return distinct_problems(
        n, IMPROVE_SEED_BASE + 1000 * seed + k, default_difficulty(), exclude=held_out_keys()
    )


def evaluate(policy_dir: str | Path, problems: list, pass_k: int, sample_seed: int) -> dict:
    """Held-out greedy success, pass@k (temperature 1) and distinct verified solutions per problem,
    each with its standard error over problems; `greedy_hits` (1/0 per problem, in order) lets two
    policies be compared problem by problem (a paired difference)."""
    import torch

    from mcts.policy import Policy, PolicyConfig
    from mcts.tasks.countdown import CountdownTask
    from rewards.records import solution_key

    torch.set_num_threads(2)
    task = CountdownTask()
    policy = Policy.load(PolicyConfig(path=str(policy_dir), device="cpu", max_rollout_tokens=48))
    prompts = [task.prompt(p) for p in problems]
    greedy = [
        task.check(p, r.steps).success is True for p, r in zip(problems, policy.greedy(prompts), strict=True)
    ]
    flat = [pr for pr in prompts for _ in range(pass_k)]
    samples = []
    for lo in range(0, len(flat), 1024):
        samples += policy.rollout(flat[lo : lo + 1024], seed=sample_seed + lo)
    solved, distinct = [], []
    for i, p in enumerate(problems):
        right = {
            solution_key(r.steps, task.step_separator)
            for r in samples[i * pass_k : (i + 1) * pass_k]
            if task.check(p, r.steps).success is True
        }
        solved.append(bool(right))
        distinct.append(len(right))

    def mean_se(x) -> tuple[float, float]:
        a = np.asarray(x, dtype=float)
        return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")

    (g, g_se), (pk, pk_se), (d, d_se) = mean_se(greedy), mean_se(solved), mean_se(distinct)
    return {
        "problems": len(problems),
        "greedy": g,
        "greedy_se": g_se,
        f"pass{pass_k}": pk,
        f"pass{pass_k}_se": pk_se,
        "distinct": d,
        "distinct_se": d_se,
        "greedy_hits": [int(h) for h in greedy],
    }


def _write_json(path: Path, obj: dict) -> None:
    from rewards.export import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def round_overrides(rd: Path, policy: str, cfg: ImproveConfig, k: int) -> list[str]:
    """The `arborist search` overrides of round k's job; writes the round's problem file first."""
    from rewards.export import atomic_write_text

    problems_file = rd / "problems.jsonl"
    rd.mkdir(parents=True, exist_ok=True)
    if not problems_file.is_file():
        rows = [
            json.dumps({"id": p.id, "numbers": p.meta["numbers"], "target": p.meta["target"]})
            for p in round_problems(k, cfg.problems_per_round, cfg.seed)
        ]
        atomic_write_text(problems_file, "\n".join(rows) + "\n")
    return [
        f"out={rd / 'data'}",
        f"task.path={problems_file}",
        "task.num_problems=null",  # the whole file (the default for a file; kept so old runs resume)
        f"policy.path={policy}",
        "critics=rollouts",
        f"critics.rollouts={cfg.rollouts}",
        f"search.simulations={cfg.simulations}",
        f"seed={cfg.seed * 1000 + k}",
        f"ray.num_workers={cfg.num_workers}",
        "rewards.audit_critic_problems=0",
        f"rewards.sft_solutions={cfg.sft_solutions}",
    ]


def search_round(rd: Path, policy: str, cfg: ImproveConfig, k: int) -> Path:
    """The round's search job (resumable), on its own problem file."""
    from rewards.config import compose
    from rewards.pipeline import run

    run(compose(round_overrides(rd, policy, cfg, k)))
    return rd / "data"


def _job_finished(data: Path) -> bool:
    """The round's job wrote its last file: `metrics.json` with status "finished" (after the audit and
    the dataset card). A job killed before it is rerun on the same directory, and resumes."""
    try:
        return json.loads((data / "metrics.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def run_improve(
    out: str | Path, cfg: ImproveConfig, base_policy: str | Path, progress: bool = True, trainer=None
) -> dict:
    """All rounds (resuming finished ones); returns {"rounds": [eval of round 0..R], ...}.
    `trainer(dataset_dirs, out_dir, policy, train_cfg) -> report` (default `train_policy`) lets a
    benchmark train another way on the same on-policy searches."""
    from mcts.embedded import evaluation_problems
    from mcts.hf import check_policy_dir
    from rewards.export import load_manifest
    from rewards.train import train_policy

    trainer = trainer or train_policy
    out = Path(out)
    if out.is_file():
        raise TrainInputError(f"--out {out} is a file: choose a directory")
    if (out / "manifest.json").is_file():  # rounds live in round-k/ below --out, never beside a job's shards
        raise TrainInputError(f"--out {out} holds an `arborist search` output: choose another directory")
    check_policy_dir(base_policy)  # bad input is refused before anything is written under out
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, cfg)
    held_out = evaluation_problems(cfg.eval_split, cfg.eval_problems or None)

    def say(msg: str) -> None:
        if progress:
            print(f"arborist improve: {msg}", file=sys.stderr, flush=True)

    r0 = out / "round-0"
    if not (r0 / "eval.json").is_file():
        say(f"evaluating the base policy on {len(held_out)} held-out problems")
        _write_json(
            r0 / "eval.json",
            {"policy": str(base_policy), **evaluate(base_policy, held_out, cfg.pass_k, cfg.seed)},
        )
    policy = str(base_policy)
    for k in range(1, cfg.rounds + 1):
        rd = out / f"round-{k}"
        if (rd / "eval.json").is_file():
            policy = str(rd / "policy")
            continue
        t0 = time.perf_counter()
        data = rd / "data"
        if not _job_finished(data):
            say(f"round {k}: searching {cfg.problems_per_round} problems with {policy}")
            search_round(rd, policy, cfg, k)
        say(f"round {k}: training ({cfg.train.recipe})")
        datasets = [out / f"round-{j}" / "data" for j in range(1 if cfg.replay else k, k + 1)]
        for d in datasets[:-1]:
            if not (d / "manifest.json").is_file():
                raise TrainInputError(
                    f"{d} is gone, and round {k} trains on every earlier round's data (replay): "
                    "restore it, or rerun with --no-replay"
                )
        report = trainer(datasets, rd / "policy", policy, cfg.train)
        policy = str(rd / "policy")
        say(f"round {k}: evaluating")
        result = evaluate(policy, held_out, cfg.pass_k, cfg.seed)
        audit = json.loads((data / "audit.json").read_text())
        rows = load_manifest(data)["rows"]
        result |= {
            "policy": policy,
            "search_success": audit.get("search_success"),
            "pairs": rows.get("pairs"),
            "sft_rows": rows.get("sft"),
            # rows of every dataset the policy trained on (rounds 1..k with replay)
            "trained_rows": report.get("sft_rows", 0) + report.get("dpo_rows", 0),
            "train_seconds": report["seconds"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        _write_json(rd / "eval.json", result)
    rounds = [json.loads((out / f"round-{k}" / "eval.json").read_text()) for k in range(cfg.rounds + 1)]
    summary = {"config": asdict(cfg), "rounds": rounds}
    _write_json(out / "summary.json", summary)
    return summary


def table(summary: dict) -> str:
    k = summary["config"]["pass_k"]
    lines = [
        f"| round | greedy | pass@{k} | distinct solutions | search success | pairs | sft rows |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(summary["rounds"]):
        lines.append(
            f"| {i} | {r['greedy']:.3f} ± {r['greedy_se']:.3f} | {r[f'pass{k}']:.3f} | {r['distinct']:.2f} | "
            f"{r.get('search_success') or float('nan'):.3f} | {r.get('pairs', '–')} | {r.get('sft_rows', '–')} |"
        )
    return "\n".join(lines)
