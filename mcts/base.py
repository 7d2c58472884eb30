"""The search's boundary: its settings, and the types the loop and an expander exchange.

The loop (`mcts.search`) knows nothing about models: it hands the `Expander` the selected leaves of
every tree (`Leaf`: problem, prefix steps, how many options) and gets back their new children,
already valued (`Child`), one `Expansion` per leaf. `mcts.expander.PolicyExpander` is the
model-backed expander; tests drive the loop with table-driven ones.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
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
    max_nodes: int = 1024
    """Node capacity per tree; a tree that would exceed it stops growing."""
    max_tokens: int = 0
    """Policy tokens per problem (options and rollouts); 0 = no limit."""
    max_depth: int = 6
    """A leaf at this depth is not expanded: it becomes an unverified dead end. Countdown's
    solutions take at most 5 steps; a task with longer solutions needs more."""
    adaptive_branching: bool = True
    """AlphaLLM's importance-based widening: n(s) = clip(floor(alpha * I(s)) + 1, c_min, c_max)."""
    alpha: float = 4.0
    c_min: int = 2
    c_max: int = 6
    root_width: int = 12
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
        for name in ("c_puct", "alpha"):  # NaN and inf fail too: no comparison holds for NaN
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"search.{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.converged_share <= 1:
            raise ValueError(f"search.converged_share must be in [0, 1] (0: off), got {self.converged_share}")
        for name in ("min_simulations", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"search.{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_rollouts not in ("all", "solved", "none"):
            raise ValueError(f"search.keep_rollouts={self.keep_rollouts!r}: use all, solved or none")
        if not 2 <= self.max_nodes <= MAX_NODES:
            raise ValueError(
                f"search.max_nodes must be in [2, {MAX_NODES}] (a root and a child), got {self.max_nodes}"
            )
        if self.root_width < 0:
            raise ValueError(f"search.root_width must be >= 0 (0: as other depths), got {self.root_width}")
        root = (self.root_width or self.c_max) if self.adaptive_branching else self.num_options
        if root >= self.max_nodes:  # the root's expansion reserves this many ids beside the root
            raise ValueError(
                f"search.max_nodes={self.max_nodes} leaves no room for the root's {root} children: raise "
                "search.max_nodes, or lower search.root_width (adaptive branching) / search.num_options"
            )


@dataclass
class PolicyConfig:
    """How to load and sample the policy (Hydra group `policy`). The defaults are the embedded
    default policy's; `conf/policy/hf.yaml` holds what a full-size model needs instead."""

    path: str = ""
    """Local directory written by `save_pretrained` (config.json, *.safetensors, tokenizer)."""
    device: str = "cpu"
    """"cpu", "auto" (cuda if available, else cpu), or any torch device string ("cuda:1"). cpu: the
    embedded policy is under 1M parameters, where a GPU launch per token costs more than the compute."""
    dtype: str = "float32"
    """"float32", "auto" (bfloat16 on a GPU that supports it, else float32), "bfloat16", "float16"."""
    trust_remote_code: bool = False
    """Run modelling code shipped in the directory; off unless the user turns it on."""
    temperature: float = 1.0
    """Sampling temperature for `propose` and `rollout` (priors are always at temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass for `propose` and `rollout`; 1.0 disables it."""
    top_k: int = 0
    """Top-k sampling; 0 disables it (and overrides a top_k from the model's generation_config)."""
    max_step_tokens: int = 16
    """Token cap per option; an option that hits it without a separator is `truncated`. A Countdown
    step ("4+5=9") is under 10 characters of the embedded policy's character vocabulary."""
    max_rollout_tokens: int = 48
    """Token cap per rollout / greedy completion (a whole Countdown solution fits in 48)."""
    max_batch: int = 256
    """Most sequences per `generate` call; bigger batches are split into several calls."""
    prefix_cache_mb: int = 512
    """Memory for the KV states of prompts already prefilled (`mcts.prefix_cache`), on the model's
    device, so a prompt that extends one of them (a child's prompt its parent's) runs only its new
    tokens; least recently used first out, emptied at every search batch. 0 turns it off. The
    embedded policy's states are 4 KB a token; a 7B model's in half precision ~0.5 MB."""

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"policy.temperature must be > 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"policy.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_step_tokens", "max_rollout_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_mb < 0:
            raise ValueError(
                f"policy.prefix_cache_mb must be >= 0 (0 turns the cache off), got {self.prefix_cache_mb}"
            )
        if self.top_k < 0:
            raise ValueError(f"policy.top_k must be >= 0, got {self.top_k}")
        check_device_dtype("policy", self.device, self.dtype)


DTYPE_NAMES = ("float32", "bfloat16", "float16")  # mcts.policy.resolve_dtype maps them to torch
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_dtype(group: str, device: str, dtype: str) -> None:
    """Refuse a device or dtype setting of `group` that `resolve_device` / `resolve_dtype` would only
    refuse inside a worker, after Ray started."""
    if not _DEVICE.match(device):
        raise ValueError(f"{group}.device={device!r}: use auto, cpu, cuda, cuda:N or mps")
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"{group}.dtype={dtype!r}: use one of auto, {', '.join(DTYPE_NAMES)}")


@dataclass
class ExpandConfig:
    """How new nodes are valued (Hydra group `critics`, whose `critics.base.CriticsConfig` adds the
    critics' directories and devices). The defaults are the default job's: AlphaLLM's combination of
    a value function, a PRM and verified fast rollouts."""

    rollouts: int = 8
    """Verified fast rollouts per new non-terminal node; 0 = critics only (fewest policy tokens, but
    then nodes add no verified samples, so success rates come from terminals alone). Pairs are gated
    on distinct verified samples: with 1 rollout a node rarely holds enough of them to pass the
    Wilson test, 8 gives most first steps a verdict."""
    w_rollout: float = 1.0
    """Weight of the verified rollout success in the node value."""
    w_value: float = 1.0
    """Weight of the value function."""
    w_prm: float = 1.0
    """Weight of the process reward model's score of the new step."""
    w_orm: float = 0.0
    """Weight of the mean ORM score over the node's rollouts (0: where the task has a verifier,
    every rollout is already checked exactly)."""
    verifier_at_terminals: bool = True
    """A terminal's value is the verifier's verdict; off: the ORM's score (verdict still recorded)."""
    rollout_tokens: int = 0
    """Token cap per rollout; 0 = the rollout policy's `max_rollout_tokens`."""

    def __post_init__(self) -> None:
        if self.rollouts < 0:
            raise ValueError(f"critics.rollouts must be >= 0, got {self.rollouts}")
        if self.rollout_tokens < 0:
            raise ValueError(
                f"critics.rollout_tokens must be >= 0 (0: the policy's cap), got {self.rollout_tokens}"
            )
        for name in ("w_rollout", "w_value", "w_prm", "w_orm"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"critics.{name} must be >= 0 and finite, got {getattr(self, name)}")


@dataclass(frozen=True)
class Leaf:
    """One node to expand (or widen), as the expander sees it."""

    problem: Problem
    steps: tuple[str, ...]  # the prefix: option texts from the root down to this node
    num_options: int  # options to sample
    existing: tuple[str, ...] = ()  # texts of the children it already has (when widening)


@dataclass
class Child:
    """A valued option. `score` in [0, 1] is the node's evaluation, what is backed up (the same name
    as the forest's and the finished tree's `score`); `success` is backed up as a verified success
    indicator only where `verified` (a terminal's verdict, verified rollouts)."""

    text: str
    prior: float
    score: float
    success: float = 0.0
    verified: bool = False
    terminal: bool = False
    outcome: int = -1  # -1 unverified, 0 wrong, 1 correct (terminals only)
    num_tokens: int = 0
    eos: bool = False  # the policy ended the option with EOS: it wrote no separator after `text`
    critics: dict = field(default_factory=dict)  # value / prm / orm breakdown of `score`
    graft: tuple[str, ...] = ()  # steps of a rollout from this node (up to its verdict), to keep
    graft_outcome: int = -1  # the rollout's verdict: 1 correct, 0 wrong, -1 no terminal reached
    graft_eos: bool = False  # the rollout's last step ended with EOS (no separator written)
    rollout_trials: int = 0  # verified rollouts from this node (each one distinct sample)
    rollout_successes: int = 0  # how many of them were verified correct


@dataclass
class Expansion:
    children: list[Child]
    tokens: int  # all policy tokens spent on this leaf (options and rollouts)


Seeds = int | Sequence[int]  # one seed for a whole call, or one per prompt / leaf of it


def seed_each(seed: Seeds, n: int) -> list[int]:
    """`seed` as one seed per item of a call of `n` items."""
    return [int(seed)] * n if isinstance(seed, Integral) else [int(s) for s in seed]


def seed_call(seeds: list[int]) -> Seeds:
    """Per-item seeds as the call takes them: one int when they are all the same (a proposer or
    expander need not take a list unless batches run side by side)."""
    return seeds[0] if seeds and len(set(seeds)) == 1 else seeds


class Expander(Protocol):
    """Values the selected leaves' new children (`mcts.expander.PolicyExpander`). An expander that
    keeps caches across calls also has `fresh_caches()`, a context `run_search` runs a batch in."""

    def __call__(self, leaves: list[Leaf], seed: Seeds) -> list[Expansion]: ...


def problem_seed(base_seed: int, problem_id: str) -> int:
    """A seed that depends on the problem only, never on batching or on which worker ran it."""
    return (base_seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (2**31 - 1)
