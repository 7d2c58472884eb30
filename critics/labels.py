"""The rows a critic trains on (`Labels`) and their train / validation split by problem content.

The critics train on rows they are given; `rewards.critic_data` builds them from finished trees
(the table of what each critic learns is there).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from mcts.finished import FinishedTree
from mcts.tasks.base import content_key


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

    def add_solved(self, problem_id: str, key: str, prompt: str, steps, soft, hard) -> None:
        """A row no tree holds (a task's solver labelled it): no node ids."""
        self.problem_ids.append(problem_id)
        self.keys.append(key)
        self.prompts.append(prompt)
        self.steps.append(list(steps))
        self.soft.append([float(s) for s in soft])
        self.hard.append([bool(h) for h in hard])
        self.nodes.append([])

    def plus(self, other: Labels) -> Labels:
        """A new Labels with `other`'s rows after this one's (same kind)."""
        if other.kind != self.kind:
            raise ValueError(f"cannot add {other.kind} rows to {self.kind} rows")
        out = self.subset(range(len(self)))
        for name in ("problem_ids", "keys", "prompts", "steps", "soft", "hard", "nodes"):
            getattr(out, name).extend(getattr(other, name))
        return out

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


def split_by_problem(labels: Labels, val_fraction: float, seed: int = 0) -> tuple[Labels, Labels]:
    """(train, validation): a problem's rows all land on one side, decided by a hash of the seed and
    the problem's *content*, so two ids of one problem never straddle the split."""
    cut = int(val_fraction * 1000)
    val = [i for i, k in enumerate(labels.keys) if zlib.crc32(f"{seed}|{k}".encode()) % 1000 < cut]
    held = set(val)
    return labels.subset(i for i in range(len(labels)) if i not in held), labels.subset(val)
