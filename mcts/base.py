"""The search's boundary: its settings, and the types the loop and an expander exchange.

The loop (`mcts.search`) knows nothing about models: it hands the `Expander` the selected leaves of
every tree (`Leaf`: problem, prefix steps, how many options) and gets back their new children,
already valued (`Child`), one `Expansion` per leaf. `mcts.expander.PolicyExpander` is the
model-backed expander; tests drive the loop with table-driven ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Protocol

from mcts import kernels
from mcts.tasks.base import Problem

MAX_NODES = 1 << 20  # per tree: a forest of 16 such trees already needs ~0.9 GB


@dataclass
class SearchConfig:
    """Budgets and rules of the search (Hydra group `search`)."""

    simulations: int = 64
    """Selection rounds per tree; each round selects up to `leaves_per_tree` leaves."""
    leaves_per_tree: int = 4
    """Leaves selected per tree per round (virtual loss keeps them distinct); all go to the
    policy in one batched call together with every other tree's."""
    num_options: int = 4
    """Options sampled when a leaf is expanded (before state merge)."""
    c_puct: float = 1.5
    """Exploration weight of PUCT."""
    max_nodes: int = 2048
    """Node capacity per tree; a tree that would exceed it stops growing."""
    max_tokens: int = 0
    """Policy tokens per problem (options and rollouts); 0 = no limit."""
    max_depth: int = 12
    """A leaf at this depth is not expanded: it becomes an unverified dead end."""
    adaptive_branching: bool = True
    """AlphaLLM's importance-based widening: n(s) = clip(floor(alpha * I(s)) + 1, c_min, c_max)."""
    alpha: float = 4.0
    c_min: int = 2
    c_max: int = 6
    root_width: int = 0
    """Children the root is widened to (its c_min = c_max; 0: as every depth). AlphaLLM's bounds
    depend on depth; the first step is where a weak policy most needs alternatives, and the
    importance rule alone never widens a root whose children all look equally bad."""
    keep_rollouts: str = "all"
    """Graft rollouts into the tree as paths of unvisited nodes, as rStar-Math keeps its
    rollouts: "all", "solved" (verified-correct ones only) or "none". The tokens were paid for
    anyway; kept, a solution found by a rollout is in the tree, and later expansions branch from
    the rollout's intermediate states instead of regenerating them. Needs adaptive branching,
    which lets a grafted node be widened with sampled options of its own."""
    converged_share: float = 0.0
    """Stop a tree once its most visited first step holds this share of the root's visits
    (after `min_simulations`); 0 disables it."""
    min_simulations: int = 16

    def __post_init__(self) -> None:
        for name in ("simulations", "leaves_per_tree", "num_options", "max_nodes", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.leaves_per_tree > kernels.MAX_LEAVES_PER_TREE:  # pending selections live in an int16 field
            raise ValueError(
                f"search.leaves_per_tree must be <= {kernels.MAX_LEAVES_PER_TREE}, got {self.leaves_per_tree}"
            )
        if self.adaptive_branching and not 1 <= self.c_min <= self.c_max:
            raise ValueError(f"search needs 1 <= c_min <= c_max, got c_min={self.c_min} c_max={self.c_max}")
        if self.keep_rollouts not in ("all", "solved", "none"):
            raise ValueError(f"search.keep_rollouts={self.keep_rollouts!r}: use all, solved or none")
        if not 2 <= self.max_nodes <= MAX_NODES:
            raise ValueError(
                f"search.max_nodes must be in [2, {MAX_NODES}] (a root and a child), got {self.max_nodes}"
            )
        if self.root_width < 0:
            raise ValueError(f"search.root_width must be >= 0 (0: as other depths), got {self.root_width}")


@dataclass(frozen=True)
class Leaf:
    """One node to expand (or widen), as the expander sees it."""

    problem: Problem
    steps: tuple[str, ...]  # the prefix: option texts from the root down to this node
    num_options: int  # options to sample
    existing: tuple[str, ...] = ()  # texts of the children it already has (when widening)


@dataclass
class Child:
    """A valued option. `value` in [0, 1] is what is backed up; `success` is backed up as a
    verified success indicator only where `verified` (a terminal's verdict, verified rollouts)."""

    text: str
    prior: float
    value: float
    success: float = 0.0
    verified: bool = False
    terminal: bool = False
    outcome: int = -1  # -1 unverified, 0 wrong, 1 correct (terminals only)
    num_tokens: int = 0
    critics: dict = field(default_factory=dict)  # value / prm / orm breakdown of `value`
    graft: tuple[str, ...] = ()  # steps of a rollout from this node (up to its verdict), to keep
    graft_outcome: int = -1  # the rollout's verdict: 1 correct, 0 wrong, -1 no terminal reached
    rollout_trials: int = 0  # verified rollouts from this node (each one distinct sample)
    rollout_successes: int = 0  # how many of them were verified correct


@dataclass
class Expansion:
    children: list[Child]
    tokens: int  # all policy tokens spent on this leaf (options and rollouts)


class Expander(Protocol):
    def __call__(self, leaves: list[Leaf], seed: int) -> list[Expansion]: ...


def problem_seed(base_seed: int, problem_id: str) -> int:
    """A seed that depends on the problem only, never on batching or on which worker ran it."""
    return (base_seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (2**31 - 1)
