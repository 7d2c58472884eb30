"""The model-backed expander: the policy proposes options, state merge removes duplicates, the
task checks terminals, and the new nodes are valued by fast rollouts and/or critics.

Per call (one search round over every tree of a batch):
    1. one batched `policy.propose` for every leaf (k options each),
    2. state merge per leaf (the task's normal form; near-duplicates optionally),
    3. the task's exact check of every new node (terminal? verified correct?),
    4. one batched `rollout` for the new non-terminal nodes (optionally a smaller policy),
       verified by the task: a real Monte Carlo estimate of success; the rollout's path and verdict
       are handed back (`Child.graft`) so the search can keep what it paid for in the tree,
    5. one batched call of the critics (value, PRM; ORM on the rollouts) when they are given,
    6. AlphaLLM's combination: value = w_value * V + w_prm * PRM + w_orm * mean ORM(rollouts)
       (+ w_rollout * verified rollout success), normalised by the weights that apply.
At terminals the verifier decides (when `verifier_at_terminals`), else the ORM does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import numpy as np

from mcts.base import Child, ExpandConfig, Expansion, Leaf, Seeds, seed_call, seed_each
from mcts.merge import Option, merge_options
from mcts.policy import Rollout
from mcts.tasks.base import Problem, Task


class Proposer(Protocol):
    """What the expander needs from a policy: `mcts.policy.Policy` (any local causal LM) is one; a
    vLLM or SGLang engine (their own prefix caching) slots in by implementing these two calls."""

    def propose(
        self, prompts: list[str], num_options: list[int], seed: Seeds, stop: str = "\n"
    ) -> list[list[Option]]:
        """`num_options[i]` sampled next steps for `prompts[i]`, each ended at `stop` (not included),
        EOS or a token cap; `Option.logprob` at temperature 1 (the prior). Seeded: the same call
        with the same seed returns the same options. `seed` is one int, or one per prompt when the
        search runs batches side by side (`SearchStream`): each run of prompts sharing a seed then
        returns what a call of its own would."""

    def rollout(
        self, prompts: list[str], seed: Seeds, max_new_tokens: int | None = None, sep: str = "\n"
    ) -> list[Rollout]:
        """One sampled continuation of every prompt to EOS or the token cap, split into steps at `sep`."""

    # Optional: `reset_prefix_cache()`, called when a search batch starts and ends, for a proposer
    # that keeps prompt states across calls (`PolicyExpander.fresh_caches`).


class NodeCritics(Protocol):
    """What the expander needs from the critics (implemented in `critics/`)."""

    def score_nodes(self, problems: list[Problem], steps: list[list[str]]) -> dict[str, np.ndarray]:
        """{"value": [n], "prm": [n]} for partial solutions (NaN where a critic is absent)."""

    def score_outcomes(self, problems: list[Problem], steps: list[list[str]]) -> np.ndarray:
        """ORM probability that each finished solution is correct, [n]."""


class PolicyExpander:
    """Expander over a `Proposer` (a `Policy`, optionally a smaller rollout policy) and critics."""

    def __init__(
        self,
        policy: Proposer,
        task: Task,
        cfg: ExpandConfig | None = None,
        rollout_policy: Proposer | None = None,
        critics: NodeCritics | None = None,
        merge_similarity: float = 1.0,
    ):
        self.policy, self.task, self.cfg = policy, task, cfg or ExpandConfig()
        self.merge_similarity = merge_similarity  # search.merge_similarity
        self.rollout_policy = rollout_policy or policy
        self.critics = critics
        if self.cfg.rollouts == 0 and critics is None:
            raise ValueError("nodes need a value: set critics.rollouts >= 1 or load critics")

    @contextmanager
    def fresh_caches(self):
        """A scope (a search batch, a re-rollout) that starts with the policies' prompt caches empty
        and leaves them empty: what it computes never depends on the work before it, and no memory
        is held after it (a proposer without a prompt cache need not have `reset_prefix_cache`)."""
        resets = [getattr(p, "reset_prefix_cache", None) for p in (self.policy, self.rollout_policy)]
        resets = [r for r in resets if r is not None]
        for reset in resets:
            reset()
        try:
            yield
        finally:
            for reset in resets:
                reset()

    def prompt(self, problem: Problem, steps) -> str:
        sep = self.task.step_separator
        return self.task.prompt(problem) + "".join(s + sep for s in steps)

    def __call__(self, leaves: list[Leaf], seed: Seeds) -> list[Expansion]:
        """Expand the leaves; `seed`: one for the call, or one per leaf (the leaves of the search's
        concurrent batches: each run of leaves with one seed draws what a call of its own would)."""
        task, cfg, sep = self.task, self.cfg, self.task.step_separator
        seeds = seed_each(seed, len(leaves))
        prompts = [self.prompt(leaf.problem, leaf.steps) for leaf in leaves]
        proposals = self.policy.propose(prompts, [leaf.num_options for leaf in leaves], seed=seed, stop=sep)
        expansions: list[Expansion] = []
        pending: list[tuple[Child, Problem, list[str]]] = []  # new non-terminal nodes to value
        pending_seeds: list[int] = []  # the seed of each pending node's leaf
        for leaf, options, leaf_seed in zip(leaves, proposals, seeds, strict=True):
            tokens = sum(o.num_tokens for o in options)
            seen = {task.normalize_step(t) for t in leaf.existing}
            children = []
            for opt in merge_options(options, task.normalize_step, self.merge_similarity):
                if task.normalize_step(opt.text) in seen:
                    continue
                steps = [*leaf.steps, opt.text]
                check = task.check(leaf.problem, steps)
                # The model ending (EOS) or running out of tokens without an answer is a
                # finished, wrong solution.
                terminal = check.terminal or opt.ended or opt.truncated
                child = Child(
                    text=opt.text,
                    prior=opt.prior,
                    score=0.0,
                    terminal=terminal,
                    num_tokens=opt.num_tokens,
                    eos=opt.ended,
                )
                if terminal:
                    child.outcome = int(bool(check.success))
                    child.success, child.verified = float(child.outcome), True
                    child.score = float(child.outcome)
                else:
                    pending.append((child, leaf.problem, steps))
                    pending_seeds.append(leaf_seed)
                children.append(child)
            expansions.append(Expansion(children=children, tokens=tokens))
        leaf_of_child = {id(c): i for i, e in enumerate(expansions) for c in e.children}
        self._score(pending, expansions, leaf_of_child, pending_seeds)
        if self.critics is not None and not cfg.verifier_at_terminals:
            self._terminal_orm(leaves, expansions)
        return expansions

    def _score(self, pending, expansions, leaf_of_child, seeds: list[int]) -> None:
        """Score the new non-terminal nodes: verified rollouts and critics, all batched (`seeds`:
        the seed of each node's leaf)."""
        if not pending:
            return
        cfg, task = self.cfg, self.task
        n = len(pending)
        parts: dict[str, np.ndarray] = {}
        rollout_steps: list[list[list[str]]] = [[] for _ in range(n)]
        if cfg.rollouts > 0:
            prompts = [self.prompt(p, steps) for _, p, steps in pending for _ in range(cfg.rollouts)]
            row_seeds = seed_call([s + 7919 for s in seeds for _ in range(cfg.rollouts)])
            rollouts = self.rollout_policy.rollout(
                prompts, seed=row_seeds, max_new_tokens=cfg.rollout_tokens or None, sep=task.step_separator
            )
            success = np.zeros(n)
            for j, r in enumerate(rollouts):
                i = j // cfg.rollouts
                child, problem, steps = pending[i]
                full = steps + r.steps
                verdict = task.check(problem, full)
                if cfg.w_orm > 0 or not child.graft:  # the steps a tree would hold
                    cut, at_end = _to_verdict(task, problem, steps, r)
                if cfg.w_orm > 0:  # the ORM reads the solution as a tree holds it (orm_labels' rows)
                    rollout_steps[i].append(_as_tree_path(task, problem, steps, r, (cut, at_end)))
                success[i] += float(verdict.success is True) / cfg.rollouts
                # A verified sample, one trial of the node's evidence: a verdict, or the model
                # ending (EOS) without an answer, a wrong solution as an option ending so is.
                if verdict.terminal or r.ended:
                    child.rollout_trials += 1
                    child.rollout_successes += int(verdict.success is True)
                if not child.graft:  # the first rollout's path, cut at its verdict
                    child.graft = tuple(cut)
                    child.graft_outcome = int(bool(verdict.success)) if verdict.terminal else -1
                    # the whole rollout, ended by EOS right after its last step's text
                    child.graft_eos = at_end and not r.text.endswith(task.step_separator)
                expansions[leaf_of_child[id(child)]].tokens += r.num_tokens
            parts["rollout"] = success
        if self.critics is not None:
            problems = [p for _, p, _ in pending]
            scores = self.critics.score_nodes(problems, [steps for _, _, steps in pending])
            parts.update({k: np.asarray(v, float) for k, v in scores.items()})
            if cfg.rollouts > 0 and cfg.w_orm > 0:
                flat = [(problems[i], full) for i in range(n) for full in rollout_steps[i]]
                orm = self.critics.score_outcomes([p for p, _ in flat], [s for _, s in flat])
                parts["orm"] = np.asarray(orm, float).reshape(n, cfg.rollouts).mean(axis=1)
        weights = {"rollout": cfg.w_rollout, "value": cfg.w_value, "prm": cfg.w_prm, "orm": cfg.w_orm}
        score = combine(parts, weights)
        for i, (child, _, _) in enumerate(pending):
            child.score = float(score[i])
            child.critics = {k: float(parts[k][i]) for k in ("value", "prm", "orm") if k in parts}
            if "rollout" in parts:
                child.success, child.verified = float(parts["rollout"][i]), True

    def _terminal_orm(self, leaves: list[Leaf], expansions: list[Expansion]) -> None:
        """Value terminals by the ORM instead of the verifier (their verdict stays recorded)."""
        owned = [
            (c, leaf) for e, leaf in zip(expansions, leaves, strict=True) for c in e.children if c.terminal
        ]
        if not owned:
            return
        terminals = [c for c, _ in owned]
        problems = [leaf.problem for _, leaf in owned]
        steps = [[*leaf.steps, c.text] for c, leaf in owned]
        orm = np.asarray(self.critics.score_outcomes(problems, steps), float)
        for c, s in zip(terminals, orm, strict=True):
            c.score = float(s)
            c.critics = {"orm": float(s)}


def _to_verdict(task: Task, problem: Problem, prefix: list[str], rollout: Rollout) -> tuple[list[str], bool]:
    """(a rollout's steps up to its verdict's step, whether they are the whole rollout and the
    policy ended it with EOS): what a tree holds of it."""
    n = _solution_length(task, problem, prefix, rollout.steps)
    return rollout.steps[:n], n == len(rollout.steps) and rollout.ended


def _as_tree_path(
    task: Task,
    problem: Problem,
    prefix: list[str],
    rollout: Rollout,
    cut: tuple[list[str], bool] | None = None,
) -> list[str]:
    """A rollout's steps as a tree would hold them: cut at its verdict's step (`cut`: `_to_verdict`'s
    answer, when known), and, where the policy ended it with EOS right after a separator (or at
    once), that EOS as a last, empty step."""
    steps, at_end = cut if cut is not None else _to_verdict(task, problem, prefix, rollout)
    after_sep = at_end and (not rollout.text or rollout.text.endswith(task.step_separator))
    return prefix + steps + [""] * after_sep


def _solution_length(task: Task, problem: Problem, prefix: list[str], continuation: list[str]) -> int:
    """How many continuation steps it takes to reach the first terminal (the verdict's step)."""
    for j in range(1, len(continuation) + 1):
        if task.check(problem, prefix + continuation[:j]).terminal:
            return j
    return len(continuation)


def combine(parts: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of the available parts (NaN entries and zero weights are skipped)."""
    n = len(next(iter(parts.values())))
    total, mass = np.zeros(n), np.zeros(n)
    for name, values in parts.items():
        w = weights.get(name, 0.0)
        if w <= 0:
            continue
        ok = ~np.isnan(values)
        total[ok] += w * values[ok]
        mass[ok] += w
    assert (mass > 0).all(), f"no weighted part values some nodes: parts {sorted(parts)}, weights {weights}"
    return total / mass
