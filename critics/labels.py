"""Critic labels from finished search trees (thin views over `rewards.derive`, one definition each).

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

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mcts.finished import FinishedTree
from mcts.tasks.base import content_key
from rewards.derive import CORRECT, DeriveConfig, node_stats, normalize_text, prm_rows, value_rows


@dataclass
class Labels:
    """Labelled rows for one critic; per row one entry per labelled position (PRM: every step end,
    value / ORM: the last token)."""

    kind: str
    problem_ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # content key of each row's problem
    prompts: list[str] = field(default_factory=list)
    steps: list[list[str]] = field(default_factory=list)
    soft: list[list[float]] = field(default_factory=list)  # S / V (value, prm) or the outcome (orm)
    hard: list[list[bool]] = field(default_factory=list)
    nodes: list[list[tuple[str, int]]] = field(default_factory=list)  # (tree id, node) per position

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, tree: FinishedTree, steps: list[str], soft, hard, nodes) -> None:
        self.problem_ids.append(tree.problem_id)
        self.keys.append(content_key(tree.question, tree.meta))
        self.prompts.append(tree.prompt)
        self.steps.append(list(steps))
        self.soft.append([float(s) for s in soft])
        self.hard.append([bool(h) for h in hard])
        self.nodes.append([(f"{tree.problem_id}/{tree.seed}", int(i)) for i in nodes])

    def subset(self, keep: Iterable[int]) -> Labels:
        keep = list(keep)
        out = Labels(self.kind)
        for name in ("problem_ids", "keys", "prompts", "steps", "soft", "hard", "nodes"):
            setattr(out, name, [getattr(self, name)[i] for i in keep])
        return out

    def positions(self) -> int:
        return sum(len(h) for h in self.hard)

    def positive_rate(self) -> float:
        flat = [h for row in self.hard for h in row]
        return float(np.mean(flat)) if flat else float("nan")


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
            out.add(tree, tree.path_steps(i), [row["value"]], [row["verified_below"]], [i])
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
            key = (tree.problem_id, normalize_text("\n".join(steps)))
            if key in seen:
                continue
            seen.add(key)
            ok = st.outcome[i] == CORRECT
            out.add(tree, steps, [float(ok)], [ok], [int(i)])
    return out


def all_labels(trees: list[FinishedTree], min_verified: int = 2) -> dict[str, Labels]:
    return {"value": value_labels(trees, min_verified), "prm": prm_labels(trees), "orm": orm_labels(trees)}


def split_by_problem(labels: Labels, val_fraction: float, seed: int = 0) -> tuple[Labels, Labels]:
    """(train, validation): a problem's rows all land on one side, decided by a hash of the seed and
    the problem's *content*, so two ids of one problem never straddle the split."""
    cut = int(val_fraction * 1000)
    val = [i for i, k in enumerate(labels.keys) if zlib.crc32(f"{seed}|{k}".encode()) % 1000 < cut]
    held = set(val)
    return labels.subset(i for i in range(len(labels)) if i not in held), labels.subset(val)
