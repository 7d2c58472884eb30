"""Does a policy trained on arborist's data get better? Arms at equal search compute, round by round.

    python -m benchmarks.improve --json results/improve.json        # ~21 min on 2 cores
    python -m benchmarks.improve --quick --json /tmp/improve.json   # 1 round, small sets: a smoke run

From the same base policy (the embedded one), every arm runs `arborist improve`'s loop on-policy:
each round searches the same number of newly drawn training problems with the same search (the same
search compute) using that arm's previous policy, then trains that arm's way on the data of every
round so far (`ImproveConfig.replay`, as `arborist improve` does):

- `sft`: best-trajectory SFT (the most visited verified solution per problem), the baseline;
- `outcome_dpo`: DPO + NLL on whole paths of one tree: its most visited verified-correct solution
  against its most visited verified-wrong one;
- `step_dpo`: DPO + NLL on arborist's step-level pairs;
- `sft_step_dpo` (not run by default): SFT on every distinct verified solution, then DPO + NLL on
  the step pairs;
- `shipped`: the recipe `arborist improve` ships (`TrainPolicyConfig`'s default: SFT on every
  distinct verified solution the round's search found, `rewards.sft_solutions`).

Every round's search exports every distinct solution (`ImproveConfig.sft_solutions`); an arm that
trains on the best trajectory takes the first, most visited one per problem. Round 1 searches the
same problems with the same base policy in every arm, so it runs once and is copied.

Each round's policy is evaluated on the held-out pool's `test` slice (excluded from every training
set by content; it judged four `arborist improve` recipes in turn, so its figure is tuned: `--split
audit` is the slice no improvement setting looked at): greedy success, pass@16, distinct verified solutions per
problem (each with its standard error), and the search success of the round's own search. Writes
`base_greedy`, `greedy_by_round`, `pass16_by_round`, `distinct_by_round`, `search_by_round`,
`gap_by_round` (search success minus greedy) for the shipped recipe, the same keys per arm under
`arms`, and per arm `greedy_vs_sft_by_round` with `greedy_vs_sft_se_by_round`: its greedy success
minus best-trajectory SFT's on the same problems, a paired difference; and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks._report import environment, write_json
from rewards.improve import ImproveConfig, evaluate, run_improve
from rewards.train import TrainPolicyConfig, datasets_name, train_on_rows, train_policy

ARMS = {
    "shipped": TrainPolicyConfig.recipe,
    "sft": "sft",
    "outcome_dpo": "dpo",
    "step_dpo": "dpo",
    "sft_step_dpo": "sft+dpo",
}


def best_trajectory_trainer(datasets, out, policy, cfg):
    """SFT on the first (most visited) verified solution of each problem of each round (a problem two
    rounds searched keeps one row from each: ids carry the round's generator seed)."""
    from rewards.train import read_kind

    first: dict[str, dict] = {}
    for dataset in datasets:
        for row in read_kind(Path(dataset), "sft"):
            first.setdefault(row["problem_id"], row)
    named = datasets_name(datasets)
    return train_on_rows(list(first.values()), [], out, policy, cfg, source=f"{named} (best per problem)")


def outcome_pairs(dataset: Path) -> list[dict]:
    """Per tree: its most visited verified-correct solution (chosen) against its most visited
    verified-wrong one (rejected), both from the bare prompt."""
    from mcts.finished import FinishedTree
    from rewards.records import completion_text
    from rewards.stats import node_stats
    from rewards.train import read_kind

    rows = []
    for r in read_kind(dataset, "trees"):
        tree = FinishedTree.from_row(r)
        st = node_stats(tree)
        good, bad = int(st.best_verified[0]), int(st.best_wrong[0])
        if good > 0 and bad > 0:
            rows.append(
                {
                    "prompt": tree.prompt,
                    "chosen": completion_text(tree, tree.path(good)),
                    "rejected": completion_text(tree, tree.path(bad)),
                }
            )
    return rows


def outcome_trainer(datasets, out, policy, cfg):
    pairs = [row for dataset in datasets for row in outcome_pairs(Path(dataset))]
    return train_on_rows([], pairs, out, policy, cfg, source=f"{datasets_name(datasets)} (outcome pairs)")


def paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean of a - b over the same problems and its standard error (a paired difference: the
    problems' own difficulty cancels, so it is far tighter than two unpaired rates)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"a paired difference needs the same problems on both sides: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def arm_keys(summary: dict, k: int) -> dict:
    rounds = summary["rounds"]
    later = rounds[1:]
    return {
        "greedy_by_round": [r["greedy"] for r in later],
        "greedy_se_by_round": [r["greedy_se"] for r in later],
        f"pass{k}_by_round": [r[f"pass{k}"] for r in later],
        "distinct_by_round": [r["distinct"] for r in later],
        "search_by_round": [r.get("search_success") for r in later],
        "gap_by_round": [r["search_success"] - r["greedy"] for r in later],
        "pairs_by_round": [r.get("pairs") for r in later],
        "sft_rows_by_round": [r.get("sft_rows") for r in later],
        "trained_rows_by_round": [r.get("trained_rows") for r in later],
    }


def plot(result: dict, path) -> Path:
    """Held-out greedy success of each arm, base then round by round (the base is every arm's)."""
    from benchmarks._report import bar_plot

    arms = result["arms"]
    rounds = len(next(iter(arms.values()))["greedy_by_round"])
    labels = ["base"] + [f"round {r}" for r in range(1, rounds + 1)]
    series = {name: [result["base_greedy"], *a["greedy_by_round"]] for name, a in arms.items()}
    title = "held-out greedy success by round"
    return bar_plot(path, labels, series, "greedy success", title, log=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--out", default="/tmp/arborist-improve-bench", help="work directory (resumed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--problems",
        type=int,
        default=1500,
        help="training problems per round (four arms x three rounds: 21 min here at 1,500)",
    )
    ap.add_argument("--simulations", type=int, default=32)
    ap.add_argument("--eval-problems", type=int, default=0, help="0: the whole slice (444 test problems)")
    ap.add_argument("--arms", default="shipped,sft,outcome_dpo,step_dpo", help=f"of {', '.join(ARMS)}")
    ap.add_argument("--split", default="test", help="held-out slice evaluated on: test (headline) or tune")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default="", help="PNG: each arm's greedy success by round")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.problems, args.eval_problems = 1, 48, 48
    import torch

    torch.set_num_threads(2)
    from mcts.embedded import bootstrap_policy, evaluation_problems

    base = str(bootstrap_policy(0))
    work = Path(args.out)
    cfg = ImproveConfig(
        rounds=args.rounds,
        problems_per_round=args.problems,
        simulations=args.simulations,
        eval_problems=args.eval_problems,
        eval_split=args.split,
    )
    held_out = evaluation_problems(cfg.eval_split, args.eval_problems or None)
    base_eval_file = work / "base-eval.json"
    kept = json.loads(base_eval_file.read_text()) if base_eval_file.is_file() else None
    # another slice or size, or from before per-problem hits: the arms would not compare
    stale = kept is not None and (
        kept.get("problems") != len(held_out)
        or "greedy_hits" not in kept
        or kept.get("split", cfg.eval_split) != cfg.eval_split
    )
    if stale:
        sys.exit(f"benchmarks.improve: {work} holds a run with other settings: choose a new --out")
    if not base_eval_file.is_file():
        work.mkdir(parents=True, exist_ok=True)
        base_eval_file.write_text(
            json.dumps(
                {"policy": base, "split": cfg.eval_split, **evaluate(base, held_out, cfg.pass_k, cfg.seed)}
            )
        )
    base_eval = json.loads(base_eval_file.read_text())
    t0 = time.perf_counter()
    arms: dict = {}
    first_search: Path | None = None
    for name in args.arms.split(","):
        arm_dir = work / name
        (arm_dir / "round-0").mkdir(parents=True, exist_ok=True)
        shutil.copy(base_eval_file, arm_dir / "round-0" / "eval.json")  # the same base for every arm
        if first_search is not None and not (arm_dir / "round-1" / "data" / "audit.json").is_file():
            # Round 1 searches the same problems with the same base policy and seed in every arm:
            # one search, copied (the job's records do not depend on the run that made them).
            shutil.rmtree(arm_dir / "round-1", ignore_errors=True)
            (arm_dir / "round-1").mkdir(parents=True)
            shutil.copy(first_search / "problems.jsonl", arm_dir / "round-1" / "problems.jsonl")
            shutil.copytree(first_search / "data", arm_dir / "round-1" / "data")
        arm_cfg = replace(cfg, train=replace(cfg.train, recipe=ARMS[name]))
        trainer = {"outcome_dpo": outcome_trainer, "sft": best_trajectory_trainer}.get(name, train_policy)
        summary = run_improve(arm_dir, arm_cfg, base, trainer=trainer)
        first_search = first_search or arm_dir / "round-1"
        arms[name] = arm_keys(summary, cfg.pass_k)
        arms[name]["hits_by_round"] = [r.get("greedy_hits") for r in summary["rounds"][1:]]
        print(f"{name}: greedy {arms[name]['greedy_by_round']}", file=sys.stderr, flush=True)
    baseline = arms.get("sft", {}).get("hits_by_round")
    for name, a in arms.items():
        hits = a.pop("hits_by_round")
        if baseline and name != "sft" and all(hits) and all(baseline):
            diffs = [paired(h, s) for h, s in zip(hits, baseline, strict=True)]
            a["greedy_vs_sft_by_round"] = [d for d, _ in diffs]
            a["greedy_vs_sft_se_by_round"] = [se for _, se in diffs]
    k = cfg.pass_k
    result = {
        "base_greedy": base_eval["greedy"],
        "base_greedy_se": base_eval["greedy_se"],
        f"base_pass{k}": base_eval[f"pass{k}"],
        "base_distinct": base_eval["distinct"],
        **(arms.get("shipped") or {}),
        "arms": arms,
        "config": {**vars(args), "improve": json.loads(json.dumps(cfg, default=lambda o: o.__dict__))},
        "seconds": round(time.perf_counter() - t0, 1),
        "environment": environment(),
    }
    print(f"| arm | greedy by round (base {result['base_greedy']:.3f}) | pass@{k} | distinct | search "
          "| greedy minus best-trajectory SFT, paired (se) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, a in arms.items():
        fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        vs = " / ".join(
            f"{d:+.3f} ({se:.3f})"
            for d, se in zip(
                a.get("greedy_vs_sft_by_round", []), a.get("greedy_vs_sft_se_by_round", []), strict=True
            )
        )
        print(f"| {name} | {fmt(a['greedy_by_round'])} | {fmt(a[f'pass{k}_by_round'])} | "
              f"{fmt(a['distinct_by_round'])} | {fmt(a['search_by_round'])} | {vs} |")  # fmt: skip
    write_json(args.json, result)
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
    return result


if __name__ == "__main__":
    main()
