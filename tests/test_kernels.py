"""The numba tree kernels against the plain-Python reference, and against small trees worked out
by hand: selection with virtual loss, terminal revisits, expansion, adaptive widening, capacity,
summaries, and bandits whose best arm is known."""

from __future__ import annotations

import numpy as np
import pytest

from mcts import kernels
from mcts.kernels import EXPAND, TERMINAL, WIDEN
from mcts.reference import ReferenceTree
from mcts.synthetic import (
    PACKED_FIELDS,
    Workload,
    _apply_round,
    reference_tables,
    round_buffers,
    run_kernels,
    run_reference,
    visits_identical,
)
from mcts.tree import NO_NODE, ROOT, UNVERIFIED, Forest

DEPTHS = 16
C_MIN_OFF = np.zeros(DEPTHS, np.int64)
C_MAX = np.full(DEPTHS, 8, np.int64)


# -- small drivers over the kernels ----------------------------------------------------------------
def select(forest: Forest, leaves_per_tree=1, c_puct: float = 1.25):
    """One `select_leaves` call with `leaves_per_tree` (an int, or one budget per tree):
    (nodes [B, L], kinds [B, L], count [B]) as numpy arrays."""
    leaves = np.broadcast_to(np.asarray(leaves_per_tree, np.int32), (forest.num_trees,)).copy()
    width = max(int(leaves.max()), 1)
    nodes = np.full((forest.num_trees, width), NO_NODE, np.int32)
    kinds = np.full_like(nodes, -1)
    count = np.zeros(forest.num_trees, np.int32)
    scratch = np.zeros(forest.capacity, np.int32)
    kernels.select_leaves(forest.arrays, c_puct, leaves, nodes, kinds, count, scratch)
    return nodes, kinds, count


def apply_round(w: Workload, forest: Forest, nodes, kinds, count) -> None:
    """The synthetic workload's expansions and backups for one selection round."""
    failed = _apply_round(
        forest.arrays, w.packed, w.k, nodes, kinds, count, w.adaptive, w.alpha_or_off,
        w.c_min_by_depth, w.c_max_by_depth, round_buffers(np.full(forest.num_trees, nodes.shape[1], np.int32), w.k),
    )  # fmt: skip
    assert failed < 0, f"selection {failed} did not fit in capacity {w.capacity}"


def expand_one(forest, b, s, priors, scores=None, terminals=None, outcomes=None, reserve=0) -> int:
    """Write `len(priors)` children under node s of tree b; returns the first new id."""
    k = len(priors)
    first = np.empty(1, np.int32)
    failed = kernels.expand(
        forest.arrays,
        np.array([b], np.int64),
        np.array([s], np.int64),
        np.array([k], np.int64),
        np.array([reserve], np.int64),
        np.asarray(priors, np.float32),
        np.asarray(scores if scores is not None else [0.5] * k, np.float32),
        np.asarray(terminals if terminals is not None else [0] * k, np.int8),
        np.asarray(outcomes if outcomes is not None else [UNVERIFIED] * k, np.int8),
        first,
    )
    assert failed == -1, f"expansion of node {s} with {k} children did not fit"
    return int(first[0])


def backup_one(forest, b, s, evaluated, alpha=-1.0, c_min=C_MIN_OFF, c_max=C_MAX) -> None:
    """Back up one selection `s`; evaluated: [(node, value, success[, verified=1]), ...]."""
    rows = [tuple(e) + (1,) * (4 - len(e)) for e in evaluated]
    kernels.backup(
        forest.arrays,
        np.array([b], np.int64),
        np.array([s], np.int64),
        np.array([0], np.int64),
        np.array([len(rows)], np.int64),
        np.array([e[0] for e in rows], np.int64),
        np.array([e[1] for e in rows], np.float64),
        np.array([e[2] for e in rows], np.float64),
        np.array([e[3] for e in rows], np.int8),
        alpha,
        c_min,
        c_max,
    )


def written(forest: Forest, b: int) -> np.ndarray:
    n = int(forest.num_nodes[b])
    ids = np.arange(n)
    return ids[(forest.parent[b, :n] != NO_NODE) | (ids == ROOT)]


# -- kernels == reference on deterministic workloads -------------------------------------------------
WORKLOADS = {
    "one-tree": dict(num_trees=1, simulations=64),
    "batch": dict(num_trees=12, simulations=80),
    "leaves4": dict(num_trees=12, simulations=60, leaves_per_tree=4),
    "vary-k": dict(num_trees=12, simulations=80, vary_k=True),
    "vary-k-leaves4": dict(num_trees=8, simulations=60, vary_k=True, leaves_per_tree=4),
    "adaptive": dict(num_trees=12, simulations=80, adaptive=True),
    "adaptive-vary-k": dict(num_trees=12, simulations=80, adaptive=True, vary_k=True),
    "adaptive-vary-k-leaves4": dict(
        num_trees=8, simulations=60, adaptive=True, vary_k=True, leaves_per_tree=4, seed=3
    ),
    "terminal-heavy": dict(num_trees=12, simulations=80, terminal_rate=0.6, leaves_per_tree=4),
    "all-terminal": dict(num_trees=4, simulations=40, terminal_rate=1.0, leaves_per_tree=3),
    "no-terminal-k3": dict(num_trees=8, simulations=80, k=3, terminal_rate=0.0, seed=7),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernels_match_reference(name):
    w = Workload(table_rows=4096, **WORKLOADS[name])
    forest = run_kernels(w)
    trees = run_reference(w, reference_tables(w))
    assert visits_identical(forest, trees), f"{name}: visit counts differ from the reference"
    for b, tree in enumerate(trees):
        n = int(forest.num_nodes[b])
        assert n == tree.num_nodes, f"{name} tree {b}: {n} nodes vs reference {tree.num_nodes}"
        for node in tree.nodes:
            if node is None:  # reserved, never written: untouched in the forest too
                continue
            i = node.id
            parent = node.parent.id if node.parent is not None else NO_NODE
            assert forest.parent[b, i] == parent, f"{name} tree {b} node {i}: parent"
            assert forest.num_children[b, i] == len(node.children), f"{name} tree {b} node {i}"
            assert forest.child_slots[b, i] == node.child_slots, f"{name} tree {b} node {i}"
            assert forest.width_target[b, i] == node.width_target, f"{name} tree {b} node {i}"
            assert forest.value_sum[b, i] == pytest.approx(node.value_sum, rel=1e-12, abs=1e-12)
            assert forest.success_sum[b, i] == pytest.approx(node.success_sum, rel=1e-12, abs=1e-12)
            assert forest.verified_visits[b, i] == node.verified_visits, f"{name} tree {b} node {i}"


def test_workloads_exercise_every_selection_kind():
    """The equivalence above means something only if the workloads reach terminals, widen nodes
    and select several leaves: count the kinds a leaves4 adaptive workload produces."""
    w = Workload(table_rows=4096, **WORKLOADS["adaptive-vary-k-leaves4"])
    forest = Forest(w.num_trees, w.capacity)
    seen = {EXPAND: 0, TERMINAL: 0, WIDEN: 0}
    for _ in range(w.simulations):
        nodes, kinds, count = select(forest, w.leaves_per_tree, w.c_puct)
        for b in range(w.num_trees):
            for kind in kinds[b, : count[b]]:
                seen[int(kind)] += 1
        apply_round(w, forest, nodes, kinds, count)
    assert all(v > 10 for v in seen.values()), f"selection kinds seen: {seen}"


# -- selection with several leaves per tree ------------------------------------------------------------
def test_several_leaves_are_distinct_and_virtual_loss_returns_to_zero():
    w = Workload(num_trees=6, simulations=40, leaves_per_tree=4, vary_k=True, table_rows=4096)
    forest = Forest(w.num_trees, w.capacity)
    full_rounds = 0
    for _ in range(w.simulations):
        nodes, kinds, count = select(forest, w.leaves_per_tree, w.c_puct)
        for b in range(w.num_trees):
            chosen = nodes[b, : count[b]].tolist()
            assert len(set(chosen)) == len(chosen), f"tree {b} selected {chosen} twice"
            # virtual loss: one per selected path through each node
            n = forest.num_nodes[b]
            expected = np.zeros(n, np.int64)
            for s in chosen:
                for node in forest.path(b, s):
                    expected[node] += 1
            assert np.array_equal(forest.virtual_loss[b, :n], expected), f"tree {b}: virtual loss"
            full_rounds += int(count[b] == w.leaves_per_tree)
        assert not forest.used("mark").any(), "select_leaves left marks behind"
        apply_round(w, forest, nodes, kinds, count)
        assert not forest.used("virtual_loss").any(), "virtual loss left after backup"
    assert full_rounds > w.num_trees * w.simulations // 2, f"only {full_rounds} rounds selected 4 leaves"


def test_fresh_root_is_selected_once_per_call():
    forest = Forest(3, 32)
    nodes, kinds, count = select(forest, leaves_per_tree=4)
    assert count.tolist() == [1, 1, 1]
    assert nodes[:, 0].tolist() == [ROOT] * 3 and kinds[:, 0].tolist() == [EXPAND] * 3
    assert forest.virtual_loss[:, ROOT].tolist() == [1, 1, 1]


def test_too_many_leaves_per_tree_is_refused_before_any_selection():
    """Virtual loss is int16 and carries the exhausted-node sentinel: a larger budget would wrap."""
    forest = Forest(2, 8)
    with pytest.raises(ValueError, match="MAX_LEAVES_PER_TREE"):
        select(forest, [1, kernels.MAX_LEAVES_PER_TREE + 1])
    assert forest.virtual_loss[:, ROOT].tolist() == [0, 0], "nothing selected before the refusal"


def test_zero_leaf_budget_leaves_a_tree_untouched():
    """A per-tree budget of 0 (a finished tree in the batch) selects nothing and adds no virtual
    loss there, while the other trees select as usual."""
    w = Workload(num_trees=3, simulations=12, leaves_per_tree=2, table_rows=1024)
    forest = Forest(w.num_trees, w.capacity)
    for _ in range(w.simulations):
        nodes, kinds, count = select(forest, [2, 0, 2])
        assert count[1] == 0 and forest.num_nodes[1] == 1 and forest.virtual_loss[1, ROOT] == 0
        apply_round(w, forest, nodes, kinds, count)
    assert forest.num_nodes[1] == 1 and forest.visits[1, ROOT] == 0
    assert (forest.num_nodes[[0, 2]] > 1).all()


# -- terminals ----------------------------------------------------------------------------------------
def test_terminal_is_revisited_with_its_outcome_and_never_expanded():
    forest = Forest(1, 16)
    (root,), _, _ = select(forest)
    a = expand_one(forest, 0, ROOT, [0.7, 0.3], scores=[0.9, 0.2], terminals=[1, 1], outcomes=[1, 0])
    b_ = a + 1
    backup_one(forest, 0, ROOT, [(a, 1.0, 1.0), (b_, 0.0, 0.0)])
    for _ in range(20):
        nodes, kinds, count = select(forest, leaves_per_tree=4)
        assert count[0] == 2, "each terminal can be selected once per call, no more"
        assert kinds[0, :2].tolist() == [TERMINAL, TERMINAL]
        for s in nodes[0, :2]:
            v = float(max(forest.outcome[0, s], 0))
            backup_one(forest, 0, s, [(s, v, v, 1)])
    assert forest.num_nodes[0] == 3, "a terminal was given children"
    assert forest.num_children[0, [a, b_]].tolist() == [0, 0]
    assert forest.visits[0, [ROOT, a, b_]].tolist() == [42, 21, 21]
    assert forest.value_sum[0, [a, b_]].tolist() == [21.0, 0.0]
    assert forest.success_sum[0, ROOT] == 21.0
    assert forest.verified_visits[0, [ROOT, a, b_]].tolist() == [42, 21, 21]
    assert not forest.used("virtual_loss").any()


def test_terminal_revisits_in_synthetic_workload():
    """All children terminal: after the first expansion every round revisits a terminal."""
    w = Workload(num_trees=3, simulations=50, k=5, terminal_rate=1.0, table_rows=1024)
    forest = run_kernels(w)
    assert forest.num_nodes.tolist() == [6, 6, 6]
    assert not forest.num_children[:, 1:6].any()
    assert forest.visits[:, ROOT].tolist() == [5 + 49] * 3
    # first visit: the table's value; every revisit: the known outcome
    for b in range(3):
        for c in range(1, 6):
            revisits = forest.visits[b, c] - 1
            own = forest.value_sum[b, c] - max(forest.outcome[b, c], 0) * revisits
            assert own == pytest.approx(float(forest.score[b, c]), abs=1e-6)
            assert forest.verified_visits[b, c] - revisits in (0, 1), "a revisit of a terminal is verified"


# -- expansion ----------------------------------------------------------------------------------------
def test_expand_with_k_differing_per_leaf():
    forest = Forest(2, 32)
    expand_one(forest, 0, ROOT, [0.5, 0.5])  # tree 0: children 1, 2
    first = np.empty(4, np.int32)
    counts = np.array([3, 1, 0, 2])
    failed = kernels.expand(
        forest.arrays,
        np.array([0, 0, 1, 1]),  # tree
        np.array([1, 2, ROOT, ROOT]),  # node (tree 1's root gets 0 children: a no-op)
        counts,
        counts,
        np.arange(6, dtype=np.float32) / 10,
        np.ones(6, np.float32),
        np.array([0, 0, 1, 0, 0, 0], np.int8),
        np.array([-1, -1, 1, -1, -1, -1], np.int8),
        first,
    )
    assert failed == -1
    assert first.tolist() == [3, 6, NO_NODE, 1]
    assert forest.num_nodes.tolist() == [7, 3]
    assert forest.parent[0, 3:7].tolist() == [1, 1, 1, 2]
    assert forest.depth[0, 3:7].tolist() == [2, 2, 2, 2]
    assert forest.num_children[0, [1, 2]].tolist() == [3, 1]
    assert forest.prior[0, 3:7].tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert forest.terminal[0, 5] == 1 and forest.outcome[0, 5] == 1
    assert forest.parent[1, 1:3].tolist() == [ROOT, ROOT]
    assert forest.prior[1, 1:3].tolist() == pytest.approx([0.4, 0.5])


# -- adaptive widening --------------------------------------------------------------------------------
ALPHA = 8.0
C_MIN = np.full(DEPTHS, 2, np.int64)


def _two_child_root(values):
    forest = Forest(1, 64)
    select(forest)
    first = expand_one(forest, 0, ROOT, [0.5, 0.5], scores=values, reserve=8)
    evaluated = [(first + j, v, 0.0) for j, v in enumerate(values)]
    backup_one(forest, 0, ROOT, evaluated, ALPHA, C_MIN, C_MAX)
    return forest, first


def test_disagreeing_children_widen_within_the_reserved_block():
    forest, first = _two_child_root([0.0, 1.0])
    # I(root) = max |Q(c) - Q(root)| = 0.5, n = floor(8 * 0.5) + 1 = 5
    assert forest.width_target[0, ROOT] == 5
    assert forest.child_slots[0, ROOT] == 8 and forest.num_nodes[0] == 9
    nodes, kinds, count = select(forest)
    assert (nodes[0, 0], kinds[0, 0], count[0]) == (ROOT, WIDEN, 1)
    new = expand_one(forest, 0, ROOT, [0.2, 0.2, 0.2])
    assert new == first + 2, "widening must continue the existing block"
    backup_one(forest, 0, ROOT, [(new + j, 0.5, 0.0) for j in range(3)], ALPHA, C_MIN, C_MAX)
    assert forest.num_children[0, ROOT] == 5
    assert forest.num_nodes[0] == 9, "widening took ids outside the reserved block"
    assert forest.parent[0, first : first + 5].tolist() == [ROOT] * 5
    assert forest.parent[0, first + 5 : first + 8].tolist() == [NO_NODE] * 3
    # full width reached: the next selection descends instead of widening again
    nodes, kinds, _ = select(forest)
    assert kinds[0, 0] == EXPAND and forest.parent[0, nodes[0, 0]] == ROOT


def test_agreeing_children_do_not_widen():
    forest, _ = _two_child_root([0.5, 0.5])
    # I(root) = 0, n = 1, clipped up to c_min = 2 = the children it has
    assert forest.width_target[0, ROOT] == 2
    nodes, kinds, _ = select(forest)
    assert kinds[0, 0] == EXPAND and nodes[0, 0] != ROOT


def test_widening_refresh_is_off_with_negative_alpha():
    forest = Forest(1, 16)
    select(forest)
    first = expand_one(forest, 0, ROOT, [0.5, 0.5], reserve=8)
    backup_one(forest, 0, ROOT, [(first, 0.0, 0.0), (first + 1, 1.0, 1.0)], -1.0, C_MIN, C_MAX)
    assert forest.width_target[0, ROOT] == 0


# -- capacity -----------------------------------------------------------------------------------------
def test_expand_returns_the_index_that_did_not_fit():
    forest = Forest(1, 6)
    first = np.empty(2, np.int32)
    args = (np.ones(6, np.float32), np.ones(6, np.float32), np.zeros(6, np.int8), np.full(6, -1, np.int8))
    failed = kernels.expand(
        forest.arrays, np.array([0, 0]), np.array([ROOT, 1]), np.array([3, 3]), np.array([3, 3]), *args, first
    )
    assert failed == 1 and forest.num_nodes[0] == 4, "the first expansion fits, the second (4 + 3 > 6) not"
    # widening past the reserved block also fails, without writing
    failed = kernels.expand(
        forest.arrays, np.array([0]), np.array([ROOT]), np.array([1]), np.array([0]), *args, first
    )
    assert failed == 0 and forest.num_children[0, ROOT] == 3 and forest.num_nodes[0] == 4


def test_synthetic_capacity_bound_holds():
    w = Workload(num_trees=2, simulations=30, k=4, leaves_per_tree=4, terminal_rate=0.0, table_rows=256)
    forest = run_kernels(w)
    assert (forest.num_nodes <= w.capacity).all()


# -- bandits --------------------------------------------------------------------------------------------
MEANS = [0.2, 0.35, 0.8, 0.5, 0.45]  # best arm: 2


def _bandit_kernels(means, simulations, seed, c_puct=1.25) -> np.ndarray:
    """Arms are terminal children of the root; every selection pulls one arm."""
    forest = Forest(1, 1 + len(means))
    select(forest)
    first = expand_one(forest, 0, ROOT, [1.0 / len(means)] * len(means), terminals=[1] * len(means))
    rng = np.random.default_rng(seed)
    # the expansion's own evaluation: one pull of every arm
    backup_one(
        forest,
        0,
        ROOT,
        [(first + a, float(r), float(r)) for a, r in enumerate(rng.random(len(means)) < means)],
    )
    for _ in range(simulations):
        nodes, kinds, _ = select(forest, c_puct=c_puct)
        arm = int(nodes[0, 0])
        assert kinds[0, 0] == TERMINAL
        r = float(rng.random() < means[arm - first])
        backup_one(forest, 0, arm, [(arm, r, r)])
    return forest.visits[0, first : first + len(means)]


def _bandit_reference(means, simulations, seed, c_puct=1.25) -> np.ndarray:
    tree = ReferenceTree(1 + len(means))
    ((root, _),) = tree.select(c_puct, 1)
    k = len(means)
    arms = tree.expand(root, [np.float32(1.0 / k)] * k, [np.float32(0.5)] * k, [1] * k, [-1] * k, k)
    rng = np.random.default_rng(seed)
    tree.backup(
        root,
        [(a, float(r), float(r), 1) for a, r in zip(arms, rng.random(k) < means, strict=True)],
        -1.0,
        [0],
        [8],
    )
    for _ in range(simulations):
        ((arm, kind),) = tree.select(c_puct, 1)
        assert kind == TERMINAL
        r = float(rng.random() < means[arms.index(arm)])
        tree.backup(arm, [(arm, r, r, 1)], -1.0, [0], [8])
    return np.array([a.visits for a in arms])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bandit_best_arm_is_most_visited(seed):
    visits = _bandit_kernels(MEANS, 2000, seed)
    ref = _bandit_reference(MEANS, 2000, seed)
    assert int(np.argmax(visits)) == 2, f"kernel visits per arm {visits.tolist()}, means {MEANS}"
    assert visits[2] > 0.5 * visits.sum(), f"best arm got only {visits.tolist()}"
    assert np.array_equal(visits, ref), f"kernels {visits.tolist()} vs reference {ref.tolist()}"


def test_bandit_close_arms():
    """Two close arms (0.6 vs 0.5) need more pulls; the best one still wins."""
    means = [0.1, 0.5, 0.6, 0.3, 0.2]
    visits = _bandit_kernels(means, 6000, seed=4)
    assert int(np.argmax(visits)) == 2, f"visits per arm {visits.tolist()}, means {means}"


def test_packed_table_holds_the_workload_tables():
    """The kernels' driver reads `Workload.packed`, the reference the separate tables: the same
    numbers, or the two would search different trees."""
    w = Workload(num_trees=2, simulations=4, k=5, vary_k=True, table_rows=64)
    tb, fields = w.tables, PACKED_FIELDS
    np.testing.assert_array_equal(w.packed[:, 0], tb["count"])
    for f, name in enumerate(fields):
        np.testing.assert_array_equal(w.packed[:, 1 + f :: len(fields)], tb[name].astype(np.float64))


def test_core_benchmark_row_gates_on_identical_visits():
    """`benchmarks.core.measure` on a small workload: both columns timed, the gate holds, and the
    JSON's headline keys are there (no speed asserted: speed goals live in benchmarks/)."""
    from benchmarks.core import measure

    row = measure(trees=3, sims=16, leaves=2, kernel_repeats=2, ref_repeats=1)
    assert row["visits_identical"] is True
    assert row["nodes_written"] > 3 and row["kernels_s"] > 0 and row["python_s"] > 0
    assert row["speedup_vs_python"] == pytest.approx(row["python_s"] / row["kernels_s"])
