"""The search loop: select leaves in every tree, expand them all in one call, back up.

The loop knows nothing about models. It talks to them through one callable, the `Expander`:
given the selected leaves of every tree (problem, prefix steps, how many options), it returns
their new children already valued (prior, value, verified success, terminal status). Everything
else is arrays and kernels:

    for each round:
        kernels.select_leaves   -> up to `leaves_per_tree` leaves per live tree (virtual loss)
        expander(leaves)        -> children for every leaf that is expanded or widened, one call
        kernels.expand          -> write them
        kernels.backup          -> values, verified successes, adaptive widths

A tree stops when its simulations, node or token budget is spent, when it is fully explored, or
(optionally) once its most visited first step holds `converged_share` of the root's visits.
Batches run side by side share the expander's calls (`SearchStream`); `run_search` runs one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from contextlib import nullcontext

import numpy as np

from mcts import kernels
from mcts.base import Child, Expander, Expansion, Leaf, SearchConfig, problem_seed, seed_call
from mcts.finished import NODE_FIELDS, FinishedTree
from mcts.tasks.base import Problem, Task
from mcts.tree import NO_NODE, ROOT, Forest


class SearchBatch:
    """A forest over a batch of problems, the texts that live beside its arrays, the kernels'
    scratch arrays and the batch's round (`key`: the caller's name for it in a `SearchStream`)."""

    def __init__(
        self, problems: list[Problem], task: Task, cfg: SearchConfig, seed: int, key: Hashable = None
    ):
        self.problems, self.task, self.cfg, self.seed, self.key = problems, task, cfg, seed, key
        self.round, self.round_seed = 0, problem_seed(seed, "|".join(p.id for p in problems))  # + round
        b, cap = len(problems), cfg.max_nodes
        self.out_nodes, self.out_count = np.zeros((b, cfg.leaves_per_tree), np.int32), np.zeros(b, np.int32)
        self.out_kinds = np.zeros_like(self.out_nodes)
        self.scratch, self.forest = np.zeros(cap, np.int32), Forest(b, cap)
        self.texts: list[dict[int, str]] = [{ROOT: ""} for _ in problems]
        self.num_tokens, self.eos = np.zeros((b, cap), np.int32), np.zeros((b, cap), np.bool_)
        # eos, and the evidence of rollouts whose verdict is not a terminal node: see FinishedTree
        self.rollout_trials = np.zeros((b, cap), np.int16)
        self.rollout_successes = np.zeros_like(self.rollout_trials)
        self.critics = {name: np.full((b, cap), np.nan, np.float32) for name in ("value", "prm", "orm")}
        self.tokens, self.rounds, self.live = np.zeros(b, np.int64), np.zeros(b, np.int64), np.ones(b, bool)
        depth_cap = cfg.max_depth + 2
        self.c_min = np.full(depth_cap, cfg.c_min if cfg.adaptive_branching else 0, np.int64)
        self.c_max = np.full(depth_cap, cfg.c_max, np.int64)
        if cfg.adaptive_branching and cfg.root_width > 0:
            self.c_min[0] = self.c_max[0] = cfg.root_width

    def done(self) -> bool:
        return self.round >= self.cfg.simulations or not self.live.any()

    def width_cap(self, b: int, node: int) -> int:
        """c_max at the node's depth: the ids an expansion of it reserves (adaptive branching)."""
        return int(self.c_max[self.forest.depth[b, node]])

    def prefix(self, b: int, node: int) -> tuple[str, ...]:
        return tuple(self.texts[b][i] for i in self.forest.path(b, node)[1:])


def run_search(problems: list[Problem], task: Task, expander: Expander, cfg: SearchConfig, seed: int = 0):
    """Search every problem of the batch at once; returns one finished tree per problem."""
    stream = SearchStream(task, expander, cfg)
    try:
        stream.add(None, problems, seed)
        while True:
            for _, trees in stream.step():
                return trees
    finally:
        stream.close()


def search_stream(
    batches: Iterable[tuple[Hashable, list[Problem]]],
    task: Task,
    expander: Expander,
    cfg: SearchConfig,
    seed: int = 0,
    side_by_side: int = 2,
) -> Iterator[tuple[Hashable, list[FinishedTree]]]:
    """Search (key, problems) batches, `side_by_side` of them at a time, a new one started as soon
    as one finishes; yields (key, trees) as batches finish. Each batch's trees are those
    `run_search(problems, ..., seed)` grows (see `SearchStream`)."""
    assert side_by_side >= 1, f"side_by_side must be >= 1, got {side_by_side}"
    stream = SearchStream(task, expander, cfg)
    pending = iter(batches)
    try:
        while True:
            while stream.running < side_by_side and (item := next(pending, None)) is not None:
                stream.add(item[0], item[1], seed)
            if not stream.running:
                return
            yield from stream.step()
    finally:
        stream.close()


class SearchStream:
    """Batches side by side: a round expands the leaves of every running batch in one expander call,
    so a batch with a few trees left fills the calls of one just started. Each batch's leaves carry
    its round seed (a run of leaves with one seed draws what a call of its own would): a batch grows
    the trees it grows alone (up to float rounding). `add` a batch (it joins at the next round);
    `step` runs a round of every batch and returns the (key, trees) of those that finished. The
    expander's caches (`fresh_caches`) are emptied when the stream starts and when it runs dry."""

    def __init__(self, task: Task, expander: Expander, cfg: SearchConfig):
        self.task, self.expander, self.cfg = task, expander, cfg
        self.alpha = cfg.alpha if cfg.adaptive_branching else -1.0
        self._batches: list[SearchBatch] = []
        self._scope = None  # the expander's fresh_caches context while batches run

    @property
    def running(self) -> int:
        return len(self._batches)

    def add(self, key: Hashable, problems: list[Problem], seed: int) -> None:
        if self._scope is None:
            self._scope = getattr(self.expander, "fresh_caches", nullcontext)()
            self._scope.__enter__()
        self._batches.append(SearchBatch(problems, self.task, self.cfg, seed, key))

    def close(self) -> None:
        """Drop every running batch and leave the expander's caches empty."""
        self._batches = []
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)

    def step(self) -> list[tuple[Hashable, list[FinishedTree]]]:
        cfg = self.cfg
        active = [batch for batch in self._batches if not batch.done()]
        plans = []
        for batch in active:
            leaves = np.where(batch.live, cfg.leaves_per_tree, 0).astype(np.int32)
            out = batch.out_nodes, batch.out_kinds, batch.out_count
            kernels.select_leaves(batch.forest.arrays, cfg.c_puct, leaves, *out, batch.scratch)
            batch.live &= batch.out_count > 0  # a live tree with nothing to select is fully explored
            batch.rounds += batch.live
            plans.append(_plan(batch, *out))
        for batch, (selections, expansions) in zip(active, self._expand(active, plans), strict=True):
            _apply(batch, selections, expansions, self.alpha)
            _update_budgets(batch)
            batch.round += 1
        done = [batch for batch in self._batches if batch.done()]
        self._batches = [batch for batch in self._batches if not batch.done()]
        if not self._batches:
            self.close()
        return [(batch.key, [_finish(batch, b) for b in range(len(batch.problems))]) for batch in done]

    def _expand(self, active: list[SearchBatch], plans) -> list[tuple[list, list[Expansion]]]:
        """One expander call for every batch's requests, each under its batch's round seed (a call
        per batch in the rare round two batches' seeds are equal: their draws would merge)."""
        seeds = {id(batch): batch.round_seed + batch.round for batch in active}
        calls = [active] if len(set(seeds.values())) == len(seeds) else [[batch] for batch in active]
        by_batch = dict(zip(map(id, active), plans, strict=True))
        out: dict[int, tuple[list, list[Expansion]]] = {}
        for members in calls:
            requests = [leaf for batch in members for leaf in by_batch[id(batch)][1]]
            seed = seed_call([seeds[id(batch)] for batch in members for _ in by_batch[id(batch)][1]])
            expansions = self.expander(requests, seed) if requests else []
            assert len(expansions) == len(requests), f"expander answered {len(expansions)} of {len(requests)}"
            for batch in members:
                selections, mine = by_batch[id(batch)]
                out[id(batch)], expansions = (selections, expansions[: len(mine)]), expansions[len(mine) :]
        return [out[id(batch)] for batch in active]


def _plan(batch: SearchBatch, out_nodes, out_kinds, out_count):
    """Turn the selections into expander requests. Returns (selections, requests), where a
    selection is (tree, node, kind, request index or -1)."""
    cfg, forest = batch.cfg, batch.forest
    selections, requests = [], []
    for b in np.flatnonzero(out_count):
        claimed = 0  # ids the tree's earlier expansions of this round will take
        for j in range(out_count[b]):
            node, kind = int(out_nodes[b, j]), int(out_kinds[b, j])
            if kind == kernels.TERMINAL:
                selections.append((b, node, kind, -1))
                continue
            if kind == kernels.EXPAND:
                if forest.depth[b, node] >= cfg.max_depth:
                    forest.terminal[b, node] = 1  # too deep: an unverified dead end from now on,
                    forest.score[b, node] = 0.0  # worth 0 (a revisit backs up its score)
                    selections.append((b, node, kernels.TERMINAL, -1))
                    continue
                # the ids `_apply` takes: c_max at the node's depth (adaptive), else one per option
                need = batch.width_cap(b, node) if cfg.adaptive_branching else cfg.num_options
                if forest.num_nodes[b] + claimed + need > forest.capacity:
                    batch.live[b] = False  # node budget spent
                    selections.append((b, node, kind, -2))
                    continue
                claimed += need
                count, existing = cfg.num_options, ()
            else:  # WIDEN
                if forest.depth[b, node] >= cfg.max_depth:  # a grafted chain's node: no children below
                    forest.child_slots[b, node] = forest.num_children[b, node]
                    selections.append((b, node, kind, -2))
                    continue
                # a full set: duplicates of children are dropped, the best of the rest kept (_apply)
                count = cfg.num_options
                existing = tuple(batch.texts[b][c] for c in forest.children(b, node))
            selections.append((b, node, kind, len(requests)))
            requests.append(Leaf(batch.problems[b], batch.prefix(b, node), count, existing))
    return selections, requests


def _apply(batch: SearchBatch, selections, expansions: list[Expansion], alpha: float) -> None:
    """Write the children, then back up every selection in one kernel call each."""
    cfg, forest, F = batch.cfg, batch.forest, batch.forest.arrays
    m = len(selections)
    tree_ids = np.array([s[0] for s in selections], np.int64)
    node_ids = np.array([s[1] for s in selections], np.int64)
    counts = np.zeros(m, np.int64)
    reserve = np.zeros(m, np.int64)
    children: list[list[Child]] = []
    for i, (b, node, kind, req) in enumerate(selections):
        offered = kids = expansions[req].children if req >= 0 else []
        if kind == kernels.WIDEN:
            target = min(int(forest.width_target[b, node]), int(forest.child_slots[b, node]))
            kids = sorted(kids, key=lambda c: -c.prior)[: target - int(forest.num_children[b, node])]
            if not kids:  # the policy has nothing new to offer here: stop widening this node
                forest.child_slots[b, node] = forest.num_children[b, node]
        elif kind == kernels.EXPAND and req >= 0:
            # adaptive: at most c_max children, c_max ids reserved for widening; else all of them
            width = batch.width_cap(b, node) if cfg.adaptive_branching else len(kids)
            kids = kids[:width]
            reserve[i] = width
            if not kids:  # no option at all: an unverified dead end, worth 0 (revisits back it up)
                forest.terminal[b, node] = 1
                forest.score[b, node] = 0.0
        _keep_evidence_of_dropped(batch, b, node, offered, kids)
        if req >= 0:
            batch.tokens[b] += expansions[req].tokens
        counts[i] = len(kids)
        children.append(kids)
    flat = [c for kids in children for c in kids]
    first = np.full(m, NO_NODE, np.int32)
    failed = kernels.expand(
        F,
        tree_ids,
        node_ids,
        counts,
        reserve,
        np.array([c.prior for c in flat], np.float32),
        np.array([c.score for c in flat], np.float32),
        np.array([c.terminal for c in flat], np.int8),
        np.array([c.outcome for c in flat], np.int8),
        first,
    )
    assert failed < 0, f"selection {failed} did not fit although its room was checked"

    eval_start, eval_count = np.zeros(m, np.int64), np.zeros(m, np.int64)
    eval_node, eval_value, eval_success, eval_verified = [], [], [], []
    for i, (b, node, kind, req) in enumerate(selections):
        eval_start[i] = len(eval_node)
        if kind == kernels.TERMINAL:  # revisit: its known verdict (or evaluation) again
            verified = forest.outcome[b, node] >= 0
            eval_node.append(node)
            eval_value.append(float(forest.score[b, node]))
            eval_success.append(float(max(forest.outcome[b, node], 0)))
            eval_verified.append(int(verified))
        elif kind == kernels.EXPAND and req >= 0 and not children[i]:  # a dead end is worth 0
            eval_node.append(node)
            eval_value.append(0.0)
            eval_success.append(0.0)
            eval_verified.append(0)
        for j, child in enumerate(children[i]):
            c = int(first[i]) + j
            batch.texts[b][c] = child.text
            batch.num_tokens[b, c] = child.num_tokens
            batch.rollout_trials[b, c] = child.rollout_trials
            batch.rollout_successes[b, c] = child.rollout_successes
            batch.eos[b, c] = child.eos
            for name, val in child.critics.items():
                if name in batch.critics and val is not None:
                    batch.critics[name][b, c] = val
            eval_node.append(c)
            eval_value.append(child.score)
            eval_success.append(child.success if child.verified else 0.0)
            eval_verified.append(int(child.verified))
        eval_count[i] = len(eval_node) - eval_start[i]
    kernels.backup(
        F,
        tree_ids,
        node_ids,
        eval_start,
        eval_count,
        np.array(eval_node, np.int64),
        np.array(eval_value, np.float64),
        np.array(eval_success, np.float64),
        np.array(eval_verified, np.int8),
        alpha,
        batch.c_min,
        batch.c_max,
    )
    if cfg.keep_rollouts != "none" and cfg.adaptive_branching:
        grafts = [
            (b, int(first[i]) + j, child.graft, child.graft_outcome, child.graft_eos)
            for i, (b, _node, _kind, _req) in enumerate(selections)
            for j, child in enumerate(children[i])
            if child.graft and (cfg.keep_rollouts == "all" or child.graft_outcome == 1)
        ]
        _graft(batch, grafts)


def _keep_evidence_of_dropped(
    batch: SearchBatch, b: int, node: int, offered: list[Child], kept: list[Child]
) -> None:
    """Options the width leaves out are not written, but their verified samples were drawn from
    `node`'s state and paid for: a dropped terminal's verdict and a dropped option's rollouts count
    as rollouts of `node` (evidence below it, not in the tree as terminals)."""
    kept_ids = {id(c) for c in kept}
    for c in offered:
        if id(c) in kept_ids:
            continue
        batch.rollout_trials[b, node] += c.rollout_trials
        batch.rollout_successes[b, node] += c.rollout_successes
        if c.terminal and c.outcome >= 0:
            batch.rollout_trials[b, node] += 1
            batch.rollout_successes[b, node] += c.outcome == 1


def _graft(batch: SearchBatch, grafts: list[tuple[int, int, tuple[str, ...], int, bool]]) -> None:
    """Append each rollout below its node as a chain of unvisited nodes, level by level (one
    `expand` call per level for all chains). Unvisited nodes add nothing to any N, W or S: PUCT
    sees them through their score (the rollout's verdict) and prior (one sample of
    `num_options`); a chain's parent gets width c_min, so selection still widens it with options
    of its own. The chain ends in a terminal when the rollout reached a verdict; it is cut at
    max_depth (with no verdict then: its end is not in the tree)."""
    cfg, forest, F = batch.cfg, batch.forest, batch.forest.arrays
    tips = []  # (tree, node, steps, verdict, eos, origin)
    for b, node, steps, verdict, eos in grafts:
        if len(steps) > (room := max(0, cfg.max_depth - int(forest.depth[b, node]))):
            steps, verdict, eos = steps[:room], -1, False
        if steps:
            tips.append((b, node, steps, verdict, eos, node))
    prior = 1.0 / cfg.num_options
    level = 0
    while tips:
        claimed: dict[int, int] = {}  # ids this level's earlier chains of the same tree will take
        fits = []
        for t in tips:
            if forest.num_nodes[t[0]] + claimed.get(t[0], 0) + cfg.c_max <= forest.capacity:
                claimed[t[0]] = claimed.get(t[0], 0) + cfg.c_max
                fits.append(t)
        tips = fits
        if not tips:
            return
        m = len(tips)
        tree_ids = np.array([t[0] for t in tips], np.int64)
        node_ids = np.array([t[1] for t in tips], np.int64)
        last = np.array([len(t[2]) == level + 1 and t[3] >= 0 for t in tips], np.int8)
        verdict = np.array([t[3] for t in tips], np.int8)
        first = np.full(m, NO_NODE, np.int32)
        failed = kernels.expand(
            F,
            tree_ids,
            node_ids,
            np.ones(m, np.int64),
            np.full(m, cfg.c_max, np.int64),
            np.full(m, prior, np.float32),
            np.maximum(verdict, 0).astype(np.float32),
            last,
            np.where(last == 1, verdict, -1).astype(np.int8),
            first,
        )
        assert failed < 0, f"graft {failed} did not fit although its room was checked"
        forest.width_target[tree_ids, node_ids] = np.maximum(
            forest.width_target[tree_ids, node_ids], cfg.c_min
        )
        for (b, _node, steps, verdict, eos, origin), c, ends in zip(tips, first.tolist(), last, strict=True):
            batch.texts[b][c], batch.eos[b, c] = steps[level], ends and eos
            if ends and batch.rollout_trials[b, origin] > 0:
                batch.rollout_trials[b, origin] -= 1
                batch.rollout_successes[b, origin] -= verdict == 1
        tips = [(t[0], c, *t[2:]) for t, c in zip(tips, first.tolist(), strict=True) if len(t[2]) > level + 1]
        level += 1


def _update_budgets(batch: SearchBatch) -> None:
    """Stop fully explored trees (no leaf to expand, no node to widen) and spent or converged ones."""
    cfg, forest = batch.cfg, batch.forest
    for b in np.flatnonzero(batch.live):
        n = int(forest.num_nodes[b])
        written = forest.parent[b, :n] != NO_NODE
        written[ROOT] = True
        leaf = written & (forest.num_children[b, :n] == 0) & (forest.terminal[b, :n] == 0)
        room = np.minimum(forest.width_target[b, :n], forest.child_slots[b, :n])
        widen = written & (forest.terminal[b, :n] == 0) & (forest.num_children[b, :n] > 0)
        widen &= forest.num_children[b, :n] < room
        if not (leaf.any() or widen.any()):
            batch.live[b] = False
    if cfg.max_tokens > 0:
        batch.live &= batch.tokens < cfg.max_tokens
    if cfg.converged_share > 0:
        for b in np.flatnonzero(batch.live & (batch.rounds >= cfg.min_simulations)):
            kids = forest.children(b, ROOT)
            if kids.size and forest.visits[b, kids].max() >= cfg.converged_share * forest.visits[b, ROOT]:
                batch.live[b] = False


def _finish(batch: SearchBatch, b: int) -> FinishedTree:
    """Tree b as a FinishedTree: written nodes only (reserved, unused ids dropped), renumbered."""
    forest = batch.forest
    n = int(forest.num_nodes[b])
    written = np.zeros(n, bool)
    written[ROOT] = True
    written[1:] = forest.parent[b, 1:n] != NO_NODE
    new_id = np.cumsum(written) - 1
    keep = np.flatnonzero(written)
    arrays = forest.tree_arrays(b)
    parent = arrays["parent"][keep]
    nodes = {
        "parent": np.where(parent >= 0, new_id[np.maximum(parent, 0)], NO_NODE),
        "num_tokens": batch.num_tokens[b, keep],
        "rollout_trials": batch.rollout_trials[b, keep],
        "rollout_successes": batch.rollout_successes[b, keep],
        "eos": batch.eos[b, keep],
        **{name: batch.critics[name][b, keep] for name in ("value", "prm", "orm")},
    }
    for name in NODE_FIELDS:
        if name not in nodes:
            nodes[name] = arrays[name][keep]
    problem = batch.problems[b]
    return FinishedTree(
        problem_id=problem.id,
        task=batch.task.name,
        prompt=batch.task.prompt(problem),
        question=problem.question,
        answer=problem.answer,
        nodes=nodes,
        steps=[batch.texts[b][int(i)] for i in keep],
        seed=batch.seed,
        simulations=int(batch.rounds[b]),
        policy_tokens=int(batch.tokens[b]),
        meta=dict(problem.meta),
        separator=batch.task.step_separator,
    )
