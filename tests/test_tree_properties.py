"""Tree invariants of the numba kernels on random synthetic workloads (hypothesis).

What the rules imply for a written node s (the root, or any id with a parent; ids reserved for
widening but never written are left out):
- own evaluations: the root has none; every other node was evaluated once when it was created
  (the table's value, success indicator and verified flag of its column); a terminal adds one
  evaluation per revisit, with its known outcome (verified). Internal non-terminal nodes get no
  visits of their own after creation.
- N(s) = own evaluations + sum of children's N; W, S and V likewise; 0 <= S <= V <= N.
- structure: depth = parent depth + 1, every node reaches the root, a node's children are one
  contiguous block inside its reserved `child_slots`, blocks tile ids 1 .. num_nodes - 1.
- between calls: no virtual loss after a backup, no mark after a selection.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts import kernels
from mcts.synthetic import Workload, _apply_round, round_buffers, run_reference, visits_identical
from mcts.tree import FIELD_NAMES, NO_NODE, ROOT, UNWRITTEN, Forest

HASH_NODE, HASH_TREE = 2654435761, 40503  # the synthetic table's row hash (mcts.synthetic._row)


def poison(dtype: np.dtype):
    """A value no field ever holds legitimately."""
    return np.nan if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).max


def is_poison(values: np.ndarray) -> np.ndarray:
    return np.isnan(values) if np.issubdtype(values.dtype, np.floating) else values == poison(values.dtype)


def run_checked(w: Workload) -> Forest:
    """`run_kernels`, checking the between-call invariants after every select and backup."""
    forest = Forest(w.num_trees, w.capacity)
    for name in FIELD_NAMES:  # ids past the roots start as poison: the kernels must write every id they take
        getattr(forest, name)[:, ROOT + 1 :] = poison(getattr(forest, name).dtype)
    F = forest.arrays
    leaves = np.full(w.num_trees, w.leaves_per_tree, np.int32)
    nodes = np.zeros((w.num_trees, w.leaves_per_tree), np.int32)
    kinds = np.zeros_like(nodes)
    count = np.zeros(w.num_trees, np.int32)
    scratch = np.zeros(w.capacity, np.int32)
    buffers = round_buffers(leaves, w.k)
    for r in range(w.simulations):
        kernels.select_leaves(F, w.c_puct, leaves, nodes, kinds, count, scratch)
        assert not forest.used("mark").any(), f"round {r}: select_leaves left marks behind"
        for b in range(w.num_trees):
            chosen = nodes[b, : count[b]]
            assert len(set(chosen.tolist())) == count[b], f"round {r} tree {b}: repeated {chosen}"
        failed = _apply_round(
            F, w.packed, w.k, nodes, kinds, count, w.adaptive, w.alpha_or_off, w.c_min_by_depth,
            w.c_max_by_depth, buffers,
        )  # fmt: skip
        assert failed < 0, f"round {r}: selection {failed} overflowed capacity {w.capacity}"
        assert not forest.used("virtual_loss").any(), f"round {r}: virtual loss left after backup"
    return forest


def own_evaluations(w: Workload, forest: Forest, b: int, s: int) -> tuple[int, float, float, int]:
    """(visits, value, successes, verified visits) that s contributed itself."""
    if s == ROOT:
        return 0, 0.0, 0.0, 0
    p = int(forest.parent[b, s])
    rows, k = w.tables["prior"].shape
    row = (p * HASH_NODE + b * HASH_TREE) % rows
    col = (s - int(forest.first_child[b, p])) % k
    tb = w.tables
    n, value, success, verified = (
        1,
        tb["value"][row, col],
        tb["success"][row, col],
        int(tb["verified"][row, col]),
    )
    if forest.terminal[b, s]:
        revisits = int(forest.visits[b, s]) - 1
        known = float(max(forest.outcome[b, s], 0))
        n += revisits
        value += revisits * known
        success += revisits * known
        verified += revisits * int(forest.outcome[b, s] >= 0)
    return n, value, success, verified


def check_tree(w: Workload, forest: Forest, b: int) -> None:
    n = int(forest.num_nodes[b])
    assert 1 <= n <= w.capacity
    parent, first, num, slots = (
        forest.parent[b],
        forest.first_child[b],
        forest.num_children[b],
        forest.child_slots[b],
    )
    visits, vsum, ssum, vvis = (
        forest.visits[b],
        forest.value_sum[b],
        forest.success_sum[b],
        forest.verified_visits[b],
    )
    ids = np.arange(n)
    is_written = (parent[:n] != NO_NODE) | (ids == ROOT)
    for name in FIELD_NAMES:
        field = getattr(forest, name)[b]
        assert not is_poison(field[:n]).any(), f"tree {b}: {name} of a used id was never written"
        assert is_poison(field[n:]).all(), f"tree {b}: {name} written past num_nodes={n}"
        assert (field[:n][~is_written] == UNWRITTEN[name]).all(), f"tree {b}: a reserved id's {name}"
    reserved = np.zeros(n, np.int64)
    reserved[ROOT] = 1
    for s in ids[is_written]:
        s = int(s)
        if s != ROOT:
            p = int(parent[s])
            assert 0 <= p < n and is_written[p], f"tree {b} node {s}: parent {p} is not a written node"
            assert forest.depth[b, s] == forest.depth[b, p] + 1, f"tree {b} node {s}: depth"
            assert first[p] <= s < first[p] + num[p], f"tree {b} node {s}: outside its parent's block"
            assert len(forest.path(b, s)) == forest.depth[b, s] + 1, f"tree {b} node {s}: path to root"
        if num[s] == 0:
            assert first[s] == NO_NODE and slots[s] == 0, f"tree {b} node {s}: leaf with a block"
            children = np.empty(0, np.int64)
        else:
            assert not forest.terminal[b, s], f"tree {b} node {s}: a terminal was expanded"
            assert 0 < num[s] <= slots[s] and first[s] >= 1 and first[s] + slots[s] <= n, (
                f"tree {b} node {s}: block {first[s]} + {num[s]}/{slots[s]} slots, {n} nodes"
            )
            # adaptive: a leaf reserves c_max = k ids to widen into; otherwise exactly its children
            assert slots[s] == (w.k if w.adaptive else num[s]), f"tree {b} node {s}: {slots[s]} slots"
            children = np.arange(first[s], first[s] + num[s])
            assert (parent[children] == s).all(), f"tree {b} node {s}: a child points elsewhere"
            assert (parent[first[s] + num[s] : first[s] + slots[s]] == NO_NODE).all()
            reserved[first[s] : first[s] + slots[s]] += 1
        own_n, own_w, own_s, own_v = own_evaluations(w, forest, b, s)
        assert visits[s] == own_n + visits[children].sum(), (
            f"tree {b} node {s}: N={visits[s]} but own {own_n} + children {visits[children].sum()}"
        )
        assert abs(vsum[s] - own_w - vsum[children].sum()) < 1e-9, f"tree {b} node {s}: W"
        assert abs(ssum[s] - own_s - ssum[children].sum()) < 1e-9, f"tree {b} node {s}: S"
        assert vvis[s] == own_v + vvis[children].sum(), f"tree {b} node {s}: V"
        assert 0 <= ssum[s] <= vvis[s] <= visits[s], (
            f"tree {b} node {s}: S={ssum[s]} V={vvis[s]} N={visits[s]}"
        )
        if w.adaptive and num[s] > 0 and visits[s] > 0:
            target = forest.width_target[b, s]
            assert w.c_min <= target <= max(w.c_min, w.k), f"tree {b} node {s}: width target {target}"
    assert (reserved == 1).all(), f"tree {b}: child blocks overlap or leave gaps: {reserved.tolist()}"


workloads = st.builds(
    Workload,
    num_trees=st.integers(1, 4),
    simulations=st.integers(1, 40),
    k=st.integers(1, 6),
    leaves_per_tree=st.integers(1, 4),
    vary_k=st.booleans(),
    adaptive=st.booleans(),
    terminal_rate=st.sampled_from([0.0, 0.15, 0.5, 1.0]),
    c_min=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    table_rows=st.just(512),
)


@settings(max_examples=60, deadline=None)
@given(w=workloads)
def test_tree_invariants(w: Workload):
    forest = run_checked(w)
    for b in range(w.num_trees):
        check_tree(w, forest, b)
    assert visits_identical(forest, run_reference(w)), "kernels and reference disagree"
