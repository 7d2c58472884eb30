"""A deterministic stand-in for the model, and the two drivers that search with it.

The "model" is a table of precomputed children (prior, value, success, terminal flag, outcome)
looked up by (tree, node id): no model cost in either driver, so `benchmarks/core.py` times tree
operations alone, and the tests can demand bit-identical visit counts from the numba kernels
(`run_kernels`) and the plain-Python reference (`run_reference`) on the same workload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from mcts import kernels
from mcts.reference import EXPAND, TERMINAL, WIDEN, ReferenceTree
from mcts.tree import Forest


@dataclass
class Workload:
    """B trees x S selection rounds x k children per expansion (k may vary per leaf)."""

    num_trees: int = 64
    simulations: int = 256
    k: int = 8
    leaves_per_tree: int = 1
    c_puct: float = 1.25
    vary_k: bool = False  # draw each leaf's child count from 1..k
    terminal_rate: float = 0.15
    adaptive: bool = False  # importance-based widening, up to k children
    alpha: float = 8.0
    c_min: int = 2
    seed: int = 0
    table_rows: int = 1 << 16
    tables: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        t, k = self.table_rows, self.k
        self.tables = {
            "prior": (0.05 + rng.random((t, k))).astype(np.float32),
            "value": rng.random((t, k)),
            "terminal": (rng.random((t, k)) < self.terminal_rate).astype(np.int8),
            "count": rng.integers(1, k + 1, t).astype(np.int64) if self.vary_k else np.full(t, k, np.int64),
        }
        tb = self.tables
        tb["outcome"] = np.where(tb["terminal"] == 1, (tb["value"] > 0.5).astype(np.int8), np.int8(-1))
        tb["outcome"] = tb["outcome"].astype(np.int8)
        # a rollout verified half of the time; its indicator counts only then
        tb["verified"] = (rng.random((t, k)) < 0.5).astype(np.int8)
        tb["success"] = ((tb["value"] > 0.7) & (tb["verified"] == 1)).astype(np.float64)
        # a terminal is valued by its verdict, as the search does with a verifier
        term = tb["terminal"] == 1
        tb["value"] = np.where(term, tb["outcome"].clip(0, 1), tb["value"]).astype(np.float64)
        tb["success"] = np.where(term, tb["outcome"].clip(0, 1), tb["success"]).astype(np.float64)
        tb["verified"] = np.where(term, 1, tb["verified"]).astype(np.int8)
        depth_cap = 64
        self.c_min_by_depth = np.full(depth_cap, self.c_min if self.adaptive else 0, np.int64)
        self.c_max_by_depth = np.full(depth_cap, k, np.int64)

    @property
    def capacity(self) -> int:
        return 1 + self.simulations * self.leaves_per_tree * self.k

    @property
    def alpha_or_off(self) -> float:
        return self.alpha if self.adaptive else -1.0


@njit(cache=True, error_model="numpy")
def _row(b, node, rows):
    return (np.int64(node) * 2654435761 + np.int64(b) * 40503) % rows


@njit(cache=True, error_model="numpy")
def _apply_round(
    F,
    t_prior,
    t_value,
    t_success,
    t_verified,
    t_terminal,
    t_outcome,
    t_count,
    sel_nodes,
    sel_kinds,
    sel_count,
    reserve_all,
    alpha,
    c_min,
    c_max,
):
    """Look every selection up in the table, write the expansions, back them all up."""
    num_children, depth, width_target, child_slots, outcome = F[2], F[5], F[4], F[3], F[13]
    rows, k = t_prior.shape
    m_total = 0
    for b in range(sel_count.shape[0]):
        m_total += sel_count[b]
    tree_ids = np.empty(m_total, np.int64)
    node_ids = np.empty(m_total, np.int64)
    counts = np.zeros(m_total, np.int64)
    reserve = np.zeros(m_total, np.int64)
    m = 0
    for b in range(sel_count.shape[0]):
        for j in range(sel_count[b]):
            s = sel_nodes[b, j]
            tree_ids[m], node_ids[m] = b, s
            if sel_kinds[b, j] == 0:  # EXPAND
                counts[m] = t_count[_row(b, s, rows)]
                reserve[m] = c_max[min(depth[b, s], c_max.shape[0] - 1)] if reserve_all else counts[m]
            elif sel_kinds[b, j] == 2:  # WIDEN
                counts[m] = min(width_target[b, s], child_slots[b, s]) - num_children[b, s]
            m += 1
    total = 0
    for i in range(m_total):
        total += counts[i]
    priors = np.empty(total, np.float32)
    scores = np.empty(total, np.float32)
    terms = np.empty(total, np.int8)
    outs = np.empty(total, np.int8)
    values = np.empty(total + m_total, np.float64)
    succ = np.empty(total + m_total, np.float64)
    verified = np.empty(total + m_total, np.int8)
    eval_node = np.empty(total + m_total, np.int64)
    eval_start = np.zeros(m_total, np.int64)
    eval_count = np.zeros(m_total, np.int64)
    row = 0
    for i in range(m_total):
        r = _row(tree_ids[i], node_ids[i], rows)
        existing = num_children[tree_ids[i], node_ids[i]]
        for j in range(counts[i]):
            col = existing + j  # existing < k and j < k: a subtraction instead of a modulo
            col = col - k if col >= k else col
            priors[row + j] = t_prior[r, col]
            scores[row + j] = t_value[r, col]
            terms[row + j] = t_terminal[r, col]
            outs[row + j] = t_outcome[r, col]
        row += counts[i]
    first = np.empty(m_total, np.int32)
    failed = kernels.expand(F, tree_ids, node_ids, counts, reserve, priors, scores, terms, outs, first)
    if failed >= 0:
        return failed
    e = 0
    for i in range(m_total):
        b, s = tree_ids[i], node_ids[i]
        eval_start[i] = e
        if counts[i] == 0:  # a terminal revisit: its known outcome again
            eval_node[e] = s
            values[e] = max(np.float64(outcome[b, s]), 0.0)
            succ[e] = values[e]
            verified[e] = 1 if outcome[b, s] >= 0 else 0
            e += 1
        else:
            r = _row(b, s, rows)
            existing = num_children[b, s] - counts[i]
            for j in range(counts[i]):
                col = existing + j
                col = col - k if col >= k else col
                eval_node[e] = first[i] + j
                values[e] = t_value[r, col]
                succ[e] = t_success[r, col]
                verified[e] = t_verified[r, col]
                e += 1
        eval_count[i] = e - eval_start[i]
    kernels.backup(
        F, tree_ids, node_ids, eval_start, eval_count, eval_node, values, succ, verified, alpha, c_min, c_max
    )
    return -1


@njit(cache=True, error_model="numpy")
def _run_rounds(F, tables, simulations, c_puct, leaves, reserve_all, alpha, c_min, c_max):
    """The whole synthetic search in one compiled loop: per round, one `select_leaves` over the
    forest, then the table lookup, `expand` and `backup`. The search proper calls the same
    kernels from Python around a model call; here the "model" is a table, so the loop is
    compiled too and the benchmark times tree operations, not interpreter dispatch."""
    t_prior, t_value, t_success, t_verified, t_terminal, t_outcome, t_count = tables
    num_trees = leaves.shape[0]
    width = 1
    for b in range(num_trees):
        width = max(width, leaves[b])
    out_nodes = np.zeros((num_trees, width), np.int32)
    out_kinds = np.zeros((num_trees, width), np.int32)
    out_count = np.zeros(num_trees, np.int32)
    scratch = np.zeros(F[0].shape[1], np.int32)
    for _ in range(simulations):
        kernels.select_leaves(F, c_puct, leaves, out_nodes, out_kinds, out_count, scratch)
        failed = _apply_round(
            F,
            t_prior,
            t_value,
            t_success,
            t_verified,
            t_terminal,
            t_outcome,
            t_count,
            out_nodes,
            out_kinds,
            out_count,
            reserve_all,
            alpha,
            c_min,
            c_max,
        )
        if failed >= 0:
            return failed
    return -1


def run_kernels(w: Workload) -> Forest:
    forest = Forest(w.num_trees, w.capacity)
    tb = w.tables
    tables = (
        tb["prior"],
        tb["value"],
        tb["success"],
        tb["verified"],
        tb["terminal"],
        tb["outcome"],
        tb["count"],
    )
    leaves = np.full(w.num_trees, w.leaves_per_tree, np.int32)
    failed = _run_rounds(
        forest.arrays,
        tables,
        w.simulations,
        w.c_puct,
        leaves,
        w.adaptive,
        w.alpha_or_off,
        w.c_min_by_depth,
        w.c_max_by_depth,
    )
    assert failed < 0, f"synthetic workload overflowed its capacity {w.capacity} (selection {failed})"
    return forest


def reference_tables(w: Workload) -> dict:
    """The table as nested Python lists (priors and scores rounded to float32 like the kernels'
    arrays). Built once, outside any timing."""
    tb = {name: arr.tolist() for name, arr in w.tables.items()}
    tb["prior32"] = tb["prior"]  # already float32 values, as Python floats
    tb["value32"] = w.tables["value"].astype(np.float32).tolist()
    return tb


def run_reference(w: Workload, tb: dict | None = None) -> list[ReferenceTree]:
    tb = tb if tb is not None else reference_tables(w)
    rows, k = w.tables["prior"].shape
    c_min, c_max = w.c_min_by_depth.tolist(), w.c_max_by_depth.tolist()
    prior32, value32 = tb["prior32"], tb["value32"]
    trees = []
    for b in range(w.num_trees):
        tree = ReferenceTree(w.capacity)
        for _ in range(w.simulations):
            plan = []
            for s, kind in tree.select(w.c_puct, w.leaves_per_tree):
                r = (s.id * 2654435761 + b * 40503) % rows
                if kind == EXPAND:
                    count = tb["count"][r]
                    reserve = c_max[min(s.depth, len(c_max) - 1)] if w.adaptive else count
                elif kind == WIDEN:
                    count, reserve = min(s.width_target, s.child_slots) - len(s.children), 0
                else:
                    count, reserve = 0, 0
                plan.append((s, kind, r, count, reserve))
            evaluations = []
            for s, kind, r, count, reserve in plan:
                existing = len(s.children)
                cols = [(existing + j) % k for j in range(count)]
                new = tree.expand(
                    s,
                    [prior32[r][c] for c in cols],
                    [value32[r][c] for c in cols],
                    [tb["terminal"][r][c] for c in cols],
                    [tb["outcome"][r][c] for c in cols],
                    reserve,
                )
                if kind == TERMINAL:
                    v = float(max(s.outcome, 0))
                    evaluations.append([(s, v, v, int(s.outcome >= 0))])
                else:
                    evaluations.append(
                        [
                            (c, tb["value"][r][col], tb["success"][r][col], tb["verified"][r][col])
                            for c, col in zip(new, cols, strict=True)
                        ]
                    )
            for (s, *_), evaluated in zip(plan, evaluations, strict=True):
                tree.backup(s, evaluated, w.alpha_or_off, c_min, c_max)
        trees.append(tree)
    return trees


def visits_identical(forest: Forest, trees: list[ReferenceTree]) -> bool:
    for b, tree in enumerate(trees):
        n = int(forest.num_nodes[b])
        if n != tree.num_nodes or forest.visits[b, :n].tolist() != tree.visit_counts():
            return False
    return True
