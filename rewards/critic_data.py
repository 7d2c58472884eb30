"""Critic training rows from finished search trees (thin views over `rewards.derive`, one definition each).

| critic | rows                                         | training target          | binary label (AUROC)   |
|--------|----------------------------------------------|--------------------------|------------------------|
| value  | non-terminal nodes with V >= min_verified    | success rate S / V       | a verified success     |
|        | trials (derive.value_rows)                   |                          | lies below (subtree)   |
| prm    | root-to-terminal paths (derive.prm_rows),    | hard: a verified success | hard label             |
|        | a label at every step end                    | lies below; soft: S / V  |                        |
| orm    | verified terminals                           | verified outcome         | verified outcome       |

S / V is the node's success rate over its trials (distinct verified samples below it: terminal
verdicts once each, verified rollouts once each); the
hard label is Math-Shepherd's hard estimation exactly as the exported `steps` dataset has it, so a
PRM trained here and one trained by TRL on `out/steps` learn the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from critics.labels import Labels
from mcts.finished import FinishedTree
from rewards.derive import DeriveConfig, prm_rows, value_rows
from rewards.records import solution_key
from rewards.stats import CORRECT, node_stats


def value_labels(trees: Iterable[FinishedTree], min_verified: int = 2) -> Labels:
    """Non-terminal, non-root nodes whose success rate rests on >= `min_verified` trials."""
    out = Labels("value")
    cfg = DeriveConfig(min_visits=max(1, min_verified), value_target="success")
    for tree in trees:
        st = node_stats(tree)
        for row in value_rows(tree, cfg, st):
            i = row["node"]
            if row["terminal"] or row["depth"] == 0 or row["trials"] < min_verified:
                continue
            out.add(tree, tree.path_steps(i), [row["value"]], [row["success_below"]], [i])
    return out


def prm_labels(trees: Iterable[FinishedTree], max_trajectories_per_tree: int = 32) -> Labels:
    """TRL stepwise rows: every root-to-terminal path, hard and soft label per step."""
    out = Labels("prm")
    cfg = DeriveConfig(trajectory_min_visits=1, max_trajectories_per_tree=max_trajectories_per_tree)
    for tree in trees:
        for row in prm_rows(tree, cfg):
            soft = [
                s if not np.isnan(s) else float(h)
                for s, h in zip(row["soft_labels"], row["labels"], strict=True)
            ]
            out.add(tree, row["completions"], soft, row["labels"], row["nodes"])
    return out


def orm_labels(trees: Iterable[FinishedTree]) -> Labels:
    """Verified terminals (depth >= 1), each distinct solution text once per problem."""
    out = Labels("orm")
    seen: set[tuple[str, str]] = set()
    for tree in trees:
        st = node_stats(tree)
        for i in np.flatnonzero(st.terminal & (st.outcome >= 0) & (st.depth > 0)):
            steps = tree.path_steps(int(i))
            key = (tree.problem_id, solution_key(steps, tree.separator))
            if key in seen:
                continue
            seen.add(key)
            ok = st.outcome[i] == CORRECT
            out.add(tree, steps, [float(ok)], [ok], [int(i)])
    return out


def all_labels(trees: list[FinishedTree], min_verified: int = 2) -> dict[str, Labels]:
    return {"value": value_labels(trees, min_verified), "prm": prm_labels(trees), "orm": orm_labels(trees)}
