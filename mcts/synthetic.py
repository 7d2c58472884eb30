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

# A packed table row (see Workload.packed): the child count, then these fields per child.
PACKED_FIELDS = ("prior", "value", "success", "verified", "terminal", "outcome")
_STRIDE = len(PACKED_FIELDS)
_PRIOR, _VALUE, _SUCCESS, _VERIFIED, _TERMINAL, _OUTCOME = (np.uint64(f) for f in range(_STRIDE))


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
    packed: np.ndarray = field(init=False, repr=False)

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
        # The kernels' driver reads one packed row per lookup, [count, then per child: prior,
        # value, success, verified, terminal, outcome] as float64 (all exact): an expansion
        # touches ~6 adjacent cache lines instead of one line in each of 7 arrays. The table is
        # 12 MB, so those were cache misses: ~17 % of the kernel time (perf), all of it the
        # stand-in model's, not the tree's.
        self.packed = np.empty((t, 1 + _STRIDE * k), np.float64)
        self.packed[:, 0] = tb["count"]
        for f, name in enumerate(PACKED_FIELDS):
            self.packed[:, 1 + f :: _STRIDE] = tb[name]
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
def _child_at(existing, j, k):
    """Start of child slot `existing + j` (mod k: both are < k) in a packed row."""
    col = existing + j
    return np.uint64(1 + _STRIDE * (col - k if col >= k else col))


@njit(cache=True, error_model="numpy")
def _row(b, node, rows):
    # rows is a power of two, so the mask equals Python's `% rows` on these non-negative keys;
    # unsigned, so that indexing the table with it skips numba's negative-index fix-up
    return np.uint64((np.int64(node) * 2654435761 + np.int64(b) * 40503) & (rows - 1))


# Table rows are prefetched this many selections ahead of their reading (4, 8 and 16 measured the
# same at 64 trees; prefetching all of a round's rows first was 25 % slower at 1024 trees, whose
# 1024 rows x 7 lines evicted each other before they were read).
_AHEAD = 8


@njit(cache=True, error_model="numpy")
def round_buffers(leaves, k):
    """Scratch arrays for `_apply_round`, sized for sum(leaves) selections of <= k children."""
    m_max = 0
    for b in range(leaves.shape[0]):
        m_max += leaves[b]
    return (
        np.zeros((7, m_max), np.int64),
        np.zeros(m_max * (k + 1), np.int64),
        np.zeros((2, m_max * k), np.float32),
        np.zeros((2, m_max * (k + 1)), np.float64),
        np.zeros((3, m_max * (k + 1)), np.int8),
        np.zeros(m_max, np.int32),
    )


@njit(cache=True, error_model="numpy")
def _apply_round(
    F,
    table,
    k,
    sel_nodes,
    sel_kinds,
    sel_count,
    reserve_all,
    alpha,
    c_min,
    c_max,
    buffers,
):
    """Look every selection up in the table, write the expansions, back them all up.
    `buffers` (from `round_buffers`) are reused every round: allocating a dozen small arrays per
    round cost ~5 % of the synthetic search."""
    buf_i, buf_e, buf_f32, buf_f64, buf_i8, buf_first = buffers
    num_children, depth, width_target, child_slots, outcome = F[2], F[5], F[4], F[3], F[13]
    cap = kernels.capacity_of(F)
    rows = table.shape[0]
    m_total = 0
    for b in range(sel_count.shape[0]):
        m_total += sel_count[b]
    tree_ids, node_ids, counts, reserve, table_rows = (
        buf_i[0, :m_total],
        buf_i[1, :m_total],
        buf_i[2, :m_total],
        buf_i[3, :m_total],
        buf_i[6, :m_total],
    )
    counts[:] = 0
    reserve[:] = 0
    # The rows are random reads of a 25 MB table: each one's lines are prefetched a few selections
    # before it is read, so that their misses overlap (~5 % of the 64x256x8 search).
    m = 0
    for b in range(sel_count.shape[0]):
        for j in range(sel_count[b]):
            table_rows[m] = _row(b, sel_nodes[b, j], rows)  # the stand-in model's answer for this node
            m += 1
    m = 0
    for b in range(sel_count.shape[0]):
        for j in range(sel_count[b]):
            if m + _AHEAD < m_total:
                r = np.uint64(table_rows[m + _AHEAD])
                for col in range(0, table.shape[1], 8):
                    kernels._prefetch(table, (r, np.uint64(col)))
            s = sel_nodes[b, j]
            x = b * cap + s  # flat index (see Forest.arrays)
            tree_ids[m], node_ids[m] = b, s
            if sel_kinds[b, j] == 0:  # EXPAND
                counts[m] = np.int64(table[np.uint64(table_rows[m]), 0])
                reserve[m] = c_max[min(depth[x], c_max.shape[0] - 1)] if reserve_all else counts[m]
            elif sel_kinds[b, j] == 2:  # WIDEN
                counts[m] = min(width_target[x], child_slots[x]) - num_children[x]
            m += 1
    total = 0
    for i in range(m_total):
        total += counts[i]
    priors, scores = buf_f32[0, :total], buf_f32[1, :total]
    terms, outs, verified = buf_i8[0, :total], buf_i8[1, :total], buf_i8[2, : total + m_total]
    values, succ = buf_f64[0, : total + m_total], buf_f64[1, : total + m_total]
    eval_node = buf_e[: total + m_total]
    eval_start, eval_count = buf_i[4, :m_total], buf_i[5, :m_total]
    row = 0
    for i in range(m_total):
        r = np.uint64(table_rows[i])
        existing = num_children[tree_ids[i] * cap + node_ids[i]]
        for j in range(counts[i]):
            at = _child_at(existing, j, k)
            priors[row + j] = table[r, at + _PRIOR]
            scores[row + j] = table[r, at + _VALUE]
            terms[row + j] = np.int8(table[r, at + _TERMINAL])
            outs[row + j] = np.int8(table[r, at + _OUTCOME])
        row += counts[i]
    first = buf_first[:m_total]
    failed = kernels.expand(F, tree_ids, node_ids, counts, reserve, priors, scores, terms, outs, first)
    if failed >= 0:
        return failed
    e = 0
    for i in range(m_total):
        b, s = tree_ids[i], node_ids[i]
        eval_start[i] = e
        if counts[i] == 0:  # a terminal revisit: its known outcome again
            eval_node[e] = s
            values[e] = max(np.float64(outcome[b * cap + s]), 0.0)
            succ[e] = values[e]
            verified[e] = 1 if outcome[b * cap + s] >= 0 else 0
            e += 1
        else:
            r = np.uint64(table_rows[i])
            existing = num_children[b * cap + s] - counts[i]
            for j in range(counts[i]):
                at = _child_at(existing, j, k)
                eval_node[e] = first[i] + j
                values[e] = table[r, at + _VALUE]
                succ[e] = table[r, at + _SUCCESS]
                verified[e] = np.int8(table[r, at + _VERIFIED])
                e += 1
        eval_count[i] = e - eval_start[i]
    kernels.backup(
        F, tree_ids, node_ids, eval_start, eval_count, eval_node, values, succ, verified, alpha, c_min, c_max
    )
    return -1


@njit(cache=True, error_model="numpy")
def _run_rounds(F, table, k, simulations, c_puct, leaves, reserve_all, alpha, c_min, c_max):
    """The whole synthetic search in one compiled loop: per round, one `select_leaves` over the
    forest, then the table lookup, `expand` and `backup`. The search proper calls the same
    kernels from Python around a model call; here the "model" is a table, so the loop is
    compiled too and the benchmark times tree operations, not interpreter dispatch."""
    num_trees = leaves.shape[0]
    width = 1
    for b in range(num_trees):
        width = max(width, leaves[b])
    out_nodes = np.zeros((num_trees, width), np.int32)
    out_kinds = np.zeros((num_trees, width), np.int32)
    out_count = np.zeros(num_trees, np.int32)
    scratch = np.zeros(kernels.capacity_of(F), np.int32)
    buffers = round_buffers(leaves, k)
    for _ in range(simulations):
        kernels.select_leaves(F, c_puct, leaves, out_nodes, out_kinds, out_count, scratch)
        failed = _apply_round(
            F,
            table,
            k,
            out_nodes,
            out_kinds,
            out_count,
            reserve_all,
            alpha,
            c_min,
            c_max,
            buffers,
        )
        if failed >= 0:
            return failed
    return -1


def run_kernels(w: Workload) -> Forest:
    forest = Forest(w.num_trees, w.capacity)
    leaves = np.full(w.num_trees, w.leaves_per_tree, np.int32)
    failed = _run_rounds(
        forest.arrays,
        w.packed,
        w.k,
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
