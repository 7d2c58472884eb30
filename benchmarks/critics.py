"""Critic quality on held-out Countdown problems, and search guided by the critics vs by rollouts.

    python -m benchmarks.critics --json out/benchmarks/critics.json [--plot out/benchmarks/critics.png]
    python -m benchmarks.critics --quick --json /tmp/critics.json      # 40 problems, for a smoke run

1. Held-out problems: the first `--problems` of a slice of the held-out pool
   (`mcts.embedded.evaluation_problems`: excluded by content from the policy's, the trunk's and the
   critics' training problems). `--split test` (default) is the headline slice; the critics'
   recipe was chosen on `tune`, but its training steps were raised after a test reading under the
   targets (338ff24), so the test figures are not untouched.
2. Rollouts search: every new node valued by one verified fast rollout (no critics). Its trees
   are the held-out trees the critics are measured on, against the verifier:
   - value: non-terminal nodes with >= `--min-verified` trials (distinct verified samples); AUROC
     vs "a verified success lies below", ECE vs the success rate S / V;
   - PRM: every step of every root-to-terminal path (each node once); AUROC vs the hard label,
     ECE vs the hard label (the PRM is trained on hard labels);
   - ORM: verified terminals; AUROC and ECE vs the verdict.
3. Critics search: the same problems, simulations and seeds, nodes valued by the value function +
   PRM (weights 1 / 1) with no rollouts; terminals decided by the verifier in both.
   `search_success_*` = share of problems whose tree holds a verified correct solution;
   `tokens_*` = policy tokens per problem (options + rollouts). Both are means over the search
   seeds `--seeds` (one seed's 200 problems move success by 0.005 a problem, so single seeds
   cannot tell the two searches apart); per-seed figures are in `search.per_seed`. The critics'
   agreement (2.) is measured on the first seed's trees.

Writes JSON with `auroc_value`, `auroc_prm`, `auroc_orm` (each with its standard error,
`auroc_value_se`, ...: Hanley & McNeil), `ece_value`, `ece_prm`, `ece_orm`,
`search_success_critics`, `search_success_rollouts`, `tokens_critics`, `tokens_rollouts` (+ details),
prints a table, and draws a plot when `--plot` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from critics.base import CriticsConfig, CriticSet
from critics.labels import Labels
from critics.metrics import auroc, auroc_se, auroc_se_by_group, ece
from critics.models import ModelCritic
from mcts.base import SearchConfig
from mcts.embedded import bootstrap_policy, evaluation_problems
from mcts.expander import ExpandConfig, PolicyExpander
from mcts.finished import FinishedTree
from mcts.policy import Policy, PolicyConfig
from mcts.search import run_search
from mcts.tasks.countdown import CountdownTask
from rewards.critic_bootstrap import ensure_default_critics
from rewards.critic_data import orm_labels, prm_labels, value_labels
from rewards.stats import node_stats

TASK = CountdownTask()


def agreement(critic: ModelCritic, labels: Labels, calibrate_on: str) -> dict:
    """AUROC vs the binary labels and ECE vs `calibrate_on` ("soft" or "hard") over every labelled
    position, each (tree, node) counted once."""
    probs = critic.score_texts(labels.prompts, labels.steps, every_step=True)
    seen, p, hard, soft, trees = set(), [], [], [], []
    for row_p, row_n, row_h, row_s in zip(probs, labels.nodes, labels.hard, labels.soft, strict=True):
        for x, node, h, s in zip(row_p, row_n, row_h, row_s, strict=True):
            if node in seen:
                continue
            seen.add(node)
            p.append(x)
            hard.append(h)
            soft.append(s)
            trees.append(node[0])
    p, hard = np.array(p), np.array(hard, bool)
    target = np.array(soft) if calibrate_on == "soft" else hard.astype(float)
    auc = auroc(p, hard)
    return {
        "auroc": auc,
        "auroc_se": auroc_se(auc, int(hard.sum()), int((~hard).sum())),
        "auroc_se_trees": auroc_se_by_group(p, hard, trees),  # positions of one tree move together
        "ece": ece(p, target),
        "n": len(p),
        "positive_rate": float(hard.mean()),
    }


def summary(trees: list[FinishedTree]) -> dict:
    solved = [bool(node_stats(t).verified_below[0]) for t in trees]
    any_hit = [t.evidence()[0][0] > 0 for t in trees]  # rollout successes included
    return {
        "success": float(np.mean(solved)),
        "success_incl_rollout_hits": float(np.mean(any_hit)),
        "tokens": float(np.mean([t.policy_tokens for t in trees])),
        "nodes": float(np.mean([t.num_nodes for t in trees])),
    }


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    policy_dir = Path(args.policy) if args.policy else bootstrap_policy(args.seed)
    critics_dir = Path(args.critics) if args.critics else ensure_default_critics(args.seed, policy_dir)
    problems = evaluation_problems(args.split, args.problems)
    assert len(problems) == args.problems, (
        f"--problems {args.problems}: the {args.split} slice has {len(problems)}"
    )
    policy = Policy.load(PolicyConfig(path=str(policy_dir)))
    # the bootstrap's search shape (critics.bootstrap), so the held-out trees look like the training ones
    search = SearchConfig(simulations=args.simulations, max_depth=4, max_nodes=2048, root_width=0)
    seeds = [args.seed + i for i in range(args.seeds)]
    cfg = CriticsConfig(rollouts=0, w_rollout=0.0)
    critics = CriticSet.load(cfg, TASK, default_dir=critics_dir)
    expanders = {
        "rollouts": PolicyExpander(policy, TASK, ExpandConfig(rollouts=1, w_value=0.0, w_prm=0.0)),
        "critics": PolicyExpander(policy, TASK, cfg, critics=critics),
    }
    per_seed: dict[str, list[dict]] = {name: [] for name in expanders}
    seconds = dict.fromkeys(expanders, 0.0)
    for seed in seeds:
        for name, expander in expanders.items():
            t0 = time.perf_counter()
            trees = run_search(problems, TASK, expander, search, seed)
            seconds[name] += time.perf_counter() - t0
            per_seed[name].append({"seed": seed, **summary(trees)})
            if name == "rollouts" and seed == seeds[0]:
                plain = trees  # the held-out trees the critics' agreement is measured on

    orm = CriticSet.load(CriticsConfig(value_path="", prm_path=""), TASK, critics_dir).orm
    quality = {
        "value": agreement(critics.value, value_labels(plain, args.min_verified), "soft"),
        "prm": agreement(critics.prm, prm_labels(plain), "hard"),
        "orm": agreement(orm, orm_labels(plain), "hard"),
    }
    mean = {
        name: {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k != "seed"}
        for name, runs in per_seed.items()
    }
    s_plain, s_guided = mean["rollouts"], mean["critics"]
    result = {f"auroc_{k}": q["auroc"] for k, q in quality.items()}
    result |= {f"auroc_{k}_se": q["auroc_se"] for k, q in quality.items()}
    result |= {f"auroc_{k}_se_trees": q["auroc_se_trees"] for k, q in quality.items()}
    result |= {f"ece_{k}": q["ece"] for k, q in quality.items()}
    result |= {
        "search_success_critics": s_guided["success"],
        "search_success_rollouts": s_plain["success"],
        "tokens_critics": s_guided["tokens"],
        "tokens_rollouts": s_plain["tokens"],
        "search_success_rollouts_incl_rollout_hits": s_plain["success_incl_rollout_hits"],
        "seconds_critics": round(seconds["critics"], 1),
        "seconds_rollouts": round(seconds["rollouts"], 1),
        "critics": quality,
        "search": {"critics": s_guided, "rollouts": s_plain, "per_seed": per_seed},
        "config": {
            "problems": args.problems,
            "split": args.split,
            "simulations": args.simulations,
            "seeds": seeds,
            "min_verified": args.min_verified,
            "policy": str(policy_dir),
            "critics": str(critics_dir),
            "critic_weights": {"w_value": cfg.w_value, "w_prm": cfg.w_prm, "rollouts": cfg.rollouts},
        },
    }
    return result


def print_table(r: dict) -> None:
    print(
        f"{'critic':8} {'AUROC':>7} {'+-se':>6} {'trees':>6} {'ECE':>7} {'n':>6} {'pos':>6}   "
        f"({r['config']['split']} split; se: positions independent / by a bootstrap over trees)"
    )
    for k, q in r["critics"].items():
        print(
            f"{k:8} {q['auroc']:7.3f} {q['auroc_se']:6.3f} {q['auroc_se_trees']:6.3f} {q['ece']:7.3f} "
            f"{q['n']:6d} {q['positive_rate']:6.2f}"
        )
    seeds = r["config"]["seeds"]
    print(
        f"\n{'search valued by':18} {'success':>8} {'tokens/problem':>15} {'seconds':>8}   (mean of seeds {seeds})"
    )
    for name in ("rollouts", "critics"):
        per_seed = " ".join(f"{x['success']:.3f}@{x['tokens']:.1f}" for x in r["search"]["per_seed"][name])
        print(
            f"{name:18} {r[f'search_success_{name}']:8.3f} {r[f'tokens_{name}']:15.1f} "
            f"{r[f'seconds_{name}']:8.1f}   {per_seed}"
        )


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    kinds = list(r["critics"])
    a.bar(kinds, [r[f"auroc_{k}"] for k in kinds], color="tab:blue")
    a.axhline(0.5, color="grey", lw=0.8, ls="--")
    a.set_ylim(0, 1)
    a.set_title("critic AUROC vs the verifier (held out)")
    names = ["rollouts", "critics"]
    b.bar(names, [r[f"tokens_{n}"] for n in names], color="tab:orange")
    for i, n in enumerate(names):
        b.text(i, r[f"tokens_{n}"], f"success {r[f'search_success_{n}']:.2f}", ha="center", va="bottom")
    b.set_title("policy tokens per problem")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where the JSON result goes")
    ap.add_argument("--plot", default=None, help="optional PNG")
    ap.add_argument("--problems", type=int, default=200, help="held-out problems")
    ap.add_argument("--split", default="test", help="slice of the held-out pool: tune, audit or test")
    ap.add_argument("--simulations", type=int, default=12)
    ap.add_argument("--min-verified", type=int, default=2, help="trials a value-target node needs")
    ap.add_argument("--seed", type=int, default=0, help="first search seed (and the bootstrap seed)")
    ap.add_argument("--seeds", type=int, default=3, help="search seeds the success and tokens average over")
    ap.add_argument("--policy", default=None, help="policy directory (default: the embedded policy)")
    ap.add_argument("--critics", default=None, help="critics directory (default: the embedded critics)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="40 problems")
    args = ap.parse_args(argv)
    if args.quick:
        args.problems = 40
    r = run(args)
    print_table(r)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2, default=float) + "\n")
    if args.plot:
        plot(r, Path(args.plot))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
