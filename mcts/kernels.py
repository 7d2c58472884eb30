"""numba kernels over `Forest.arrays`: select, expand, back up, adaptive widening, summaries.

Every kernel is a pure function of arrays (`@njit(cache=True)`), takes the forest as one tuple
`F = Forest.arrays` (flat [num_trees * capacity] fields, then num_nodes) and a few small arrays,
and loops over trees itself, so one call serves the whole forest. Arithmetic is float64 in a
fixed order so that `mcts.reference` (plain Python, the same rules) gives bit-identical visit
counts; the tests hold both to that.

The rules, shared with the reference:
- PUCT: score(c) = Q(c) + c_puct * P(c) * sqrt(N(s) + VL(s)) / (1 + N(c) + VL(c)),
  Q(c) = W(c) / (N(c) + VL(c)): a pending selection counts as a visit of value 0 (virtual loss),
  so later selections in the same call spread out. An unvisited child uses its own score as Q.
  Ties go to the lowest child id.
- A selection ends at (a) an unexpanded leaf (to expand), (b) a terminal (to back up its known
  outcome, never expanded), or (c) an internal node whose adaptive width exceeds its children
  (to widen). A node selected in this call is not selected again; an internal node none of
  whose children can be selected is skipped for the rest of the call.
- Backup adds one visit per evaluated node along its path (value, success indicator and whether
  that indicator was verified: a critic-only evaluation has a value but no verified outcome, so
  the success rate S / V counts verified evaluations only), and removes each selection's virtual loss; then it refreshes the adaptive width of the path's nodes:
  n(s) = clip(floor(alpha * I(s)) + 1, c_min[depth], c_max[depth]), I(s) = max_c |Q(c) - Q(s)|.
"""

from __future__ import annotations

import math

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mcts.tree import NO_NODE, ROOT, UNVERIFIED

# Loop heads on 64-byte boundaries. Without it the speed of these kernels depended on where LLVM
# happened to place the hot loops: the same source under two module names ran 3.06 vs 2.55 ms on
# the 64x256x8 workload (16 % apart, every time); with it both ran 2.6 ms. Set before any kernel
# compiles (numba compiles on first call), and baked into numba's on-disk cache. It is an LLVM
# option of the whole process, so other numba code in it gets aligned loops too (a few bytes of
# padding per loop).
if llvm.llvm_version_info >= (14,):  # the option exists from LLVM 14 (numba 0.60's); an unknown one exits
    llvm.set_option("", "-align-loops=64")


# the intrinsic's name carries its pointer type: typed pointers up to LLVM 14, opaque ones after
_PREFETCH_NAME = "llvm.prefetch.p0" if llvm.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask the CPU to start loading the cache line of `arr[index]` (LLVM's prefetch: read, keep
    in all cache levels); no effect on results, no fault on any address."""
    is_tuple = isinstance(index, types.BaseTuple)  # arr[i, j]
    index_types = list(index) if is_tuple else [index]
    if not isinstance(arr, types.Array) or len(index_types) != arr.ndim:
        return None  # a typing error: one integer index per dimension of an array
    if not all(isinstance(t, types.Integer) for t in index_types):
        return None

    def codegen(context, builder, sig, args):
        array_type = sig.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        indices = cgutils.unpack_tuple(builder, args[1], len(index_types)) if is_tuple else [args[1]]
        indices = [context.cast(builder, v, t, types.intp) for v, t in zip(indices, index_types, strict=True)]
        ptr = cgutils.get_item_pointer(context, builder, array_type, array, indices, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn_type = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, _PREFETCH_NAME)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


# selection kinds returned by `select_leaves`
EXPAND, TERMINAL, WIDEN = 0, 1, 2
# values of the scratch `mark` field inside `select_leaves`
_SELECTED, _EXHAUSTED = 1, 2
# Added to an exhausted node's virtual loss for the rest of a `select_leaves` call (and taken off
# with its mark), so that scoring children tests one field, virtual loss, for "blocked" instead of
# two: the children's `mark` line was the most sampled load in select (perf); 1-2 % faster.
# Pending selections through a node (at most the leaves per tree) stay below it: int16 field.
_EXHAUSTED_VL = 1 << 14
MAX_LEAVES_PER_TREE = _EXHAUSTED_VL - 1


@njit(cache=True, error_model="numpy")
def capacity_of(F):
    """Nodes per tree: the fields are flat [num_trees * capacity] arrays (see `Forest.arrays`)."""
    return F[0].shape[0] // F[16].shape[0]


@njit(cache=True, error_model="numpy")
def select_leaves(F, c_puct, leaves, out_nodes, out_kinds, out_count, scratch):
    """Select up to `leaves[b]` distinct nodes in every tree b (0 leaves the tree untouched).

    leaves: int32 [B]; out_nodes, out_kinds: int32 [B, max(leaves)]; out_count: int32 [B];
    scratch: int32 [capacity], reused to clear the marks. Virtual loss is added on each path.
    """
    num_trees, cap = F[16].shape[0], capacity_of(F)
    # The fields are flat, indexed at b * capacity + node: one multiply per tree instead of a
    # 2-D index per access. Flat indices are unsigned (`u`): numba gives every signed index a
    # negative-index fix-up (three instructions and often a spilled array length per access).
    parent, first_child, num_children, child_slots = F[0], F[1], F[2], F[3]
    width_target, visits, vloss, value_sum = F[4], F[6], F[7], F[8]
    prior, score, terminal, mark = F[10], F[11], F[12], F[14]
    scores = np.empty(32768, np.float64)  # one node's children (num_children is int16)
    for b0 in range(num_trees):
        if leaves[b0] > MAX_LEAVES_PER_TREE:  # virtual loss is int16, and carries a sentinel
            raise ValueError("select_leaves: more leaves per tree than MAX_LEAVES_PER_TREE")
    for b0 in range(num_trees):
        b = np.uint64(b0) * np.uint64(cap)  # offset of tree b0
        count = 0
        num_marked = 0
        while count < leaves[b0] and mark[b + np.uint64(ROOT)] != _EXHAUSTED:
            s = ROOT
            x = b + np.uint64(ROOT)  # flat index of s
            kind = -1
            while True:
                if terminal[x] != 0 or num_children[x] == 0:
                    if mark[x] == _SELECTED or vloss[x] > 0:
                        mark[x] = _EXHAUSTED  # only reachable for the root
                        vloss[x] += _EXHAUSTED_VL
                        scratch[num_marked] = s
                        num_marked += 1
                        break
                    kind = TERMINAL if terminal[x] != 0 else EXPAND
                    break
                room = min(np.int64(width_target[x]), np.int64(child_slots[x]))
                if num_children[x] < room and mark[x] != _SELECTED:  # wants widening
                    kind = WIDEN
                    break
                sqrt_parent = math.sqrt(np.float64(visits[x] + vloss[x]))
                first = b + np.uint64(first_child[x])
                k = np.uint64(num_children[x])
                # scores of all children in one pass without early exits, then the argmax: ~5-10 %
                # faster than scoring inside the argmax loop (numba does not vectorise either)
                for j in range(k):
                    c = first + j
                    n = np.float64(visits[c] + vloss[c])
                    q = value_sum[c] / n if n > 0 else np.float64(score[c])
                    sc = q + c_puct * np.float64(prior[c]) * sqrt_parent / (1.0 + n)
                    # blocked: exhausted, or a pending leaf (a selected node holds virtual loss);
                    # pending or exhausted is rare, so the leaf fields are read only then
                    if vloss[c] > 0 and (
                        vloss[c] >= _EXHAUSTED_VL or terminal[c] != 0 or num_children[c] == 0
                    ):
                        sc = -np.inf
                    scores[j] = sc
                best = k
                best_score = -np.inf
                for j in range(k):
                    if scores[j] > best_score:
                        best_score = scores[j]
                        best = j
                if best == k:
                    mark[x] = _EXHAUSTED
                    vloss[x] += _EXHAUSTED_VL
                    scratch[num_marked] = s
                    num_marked += 1
                    break
                vloss[x] += 1  # the virtual loss goes on the path on the way down
                s = first_child[x] + np.int64(best)
                x = first + best
            if kind < 0:  # hit an exhausted node: take the path's virtual loss back, start again
                node = parent[x]
                while node != NO_NODE:
                    vloss[b + np.uint64(node)] -= 1
                    node = parent[b + np.uint64(node)]
                continue
            if mark[x] == 0:
                scratch[num_marked] = s
                num_marked += 1
            mark[x] = _SELECTED
            out_nodes[b0, count] = s
            out_kinds[b0, count] = kind
            count += 1
            vloss[x] += 1
        out_count[b0] = count
        for i in range(num_marked):
            x = b + np.uint64(scratch[i])
            if mark[x] == _EXHAUSTED:  # a node can be listed twice: the mark is cleared once
                vloss[x] -= _EXHAUSTED_VL
            mark[x] = 0
    return out_count


@njit(cache=True, error_model="numpy")
def expand(F, tree_ids, node_ids, counts, reserve, priors, scores, terminals, outcomes, out_first):
    """Write children for M selected nodes (children of selection m are rows
    start_m .. start_m + counts[m] of the flat child arrays, in order).

    tree_ids, node_ids, counts, reserve: int [M]; reserve[m] >= counts[m] ids are reserved for a
    leaf's block (ignored when widening into an existing block); priors, scores: float [sum counts];
    terminals, outcomes: int8 [sum counts]; out_first: int32 [M], id of the first new child
    (NO_NODE if counts[m] == 0). Returns -1 on success, else the index m that did not fit.
    """
    num_nodes = F[16]
    capacity = capacity_of(F)
    parent, first_child, num_children, child_slots = F[0], F[1], F[2], F[3]
    width_target, depth, visits, vloss = F[4], F[5], F[6], F[7]
    value_sum, success_sum, prior, score = F[8], F[9], F[10], F[11]
    terminal, outcome, mark, verified_visits = F[12], F[13], F[14], F[15]
    row = 0
    for m in range(tree_ids.shape[0]):
        t, s, k = tree_ids[m], node_ids[m], counts[m]
        out_first[m] = NO_NODE
        if k == 0:
            continue
        b = np.uint64(t) * np.uint64(capacity)  # unsigned flat offset of tree t (see select_leaves)
        x = b + np.uint64(s)
        ids = k  # ids written below: the children, plus on a fresh block the ids it reserves
        if num_children[x] == 0:
            ids = max(k, reserve[m])
            if num_nodes[t] + ids > capacity:
                return m
            first_child[x] = num_nodes[t]
            child_slots[x] = ids
            num_nodes[t] += ids
        elif num_children[x] + k > child_slots[x]:
            return m
        start = first_child[x] + num_children[x]
        d = depth[x] + 1
        for j in range(ids):
            # every field of every id taken (the forest is not zeroed): a child, or a reserved id
            # as `tree.UNWRITTEN`
            c = b + np.uint64(start + j)
            child = j < k
            parent[c] = s if child else NO_NODE
            first_child[c] = NO_NODE
            num_children[c] = 0
            child_slots[c] = 0
            width_target[c] = 0
            depth[c] = d if child else 0
            visits[c] = 0
            vloss[c] = 0
            value_sum[c] = 0.0
            success_sum[c] = 0.0
            verified_visits[c] = 0
            prior[c] = priors[row + j] if child else 0.0
            score[c] = scores[row + j] if child else 0.0
            terminal[c] = terminals[row + j] if child else 0
            outcome[c] = outcomes[row + j] if child else UNVERIFIED
            mark[c] = 0
        num_children[x] += k
        out_first[m] = start
        row += k
    return -1


@njit(cache=True, error_model="numpy")
def _refresh_width(
    first_child, num_children, width_target, depth, visits, value_sum, b, s, alpha, c_min, c_max
):
    """n(s) from I(s) = max_c |Q(c) - Q(s)|, over flat fields (b: the tree's unsigned flat offset)."""
    x = b + np.uint64(s)
    if num_children[x] == 0 or visits[x] == 0:
        return
    q_s = value_sum[x] / visits[x]
    importance = 0.0
    first = b + np.uint64(first_child[x])
    for j in range(np.uint64(num_children[x])):
        c = first + j
        if visits[c] > 0:
            importance = max(importance, abs(value_sum[c] / visits[c] - q_s))
    d = min(np.int64(depth[x]), c_min.shape[0] - 1)
    n = np.int64(math.floor(alpha * importance)) + 1
    width_target[x] = max(c_min[d], min(n, c_max[d]))


@njit(cache=True, error_model="numpy")
def backup(
    F,
    sel_tree,
    sel_node,
    eval_start,
    eval_count,
    eval_node,
    eval_value,
    eval_success,
    eval_verified,
    alpha,
    c_min,
    c_max,
):
    """Back up M selections: remove each one's virtual loss, then add one visit per evaluated
    node (eval rows eval_start[m] .. + eval_count[m]) along its path to the root.

    eval_value, eval_success: float [E] in [0, 1]; eval_verified: int8 [E], 1 where eval_success
    is a verified outcome (a terminal's, or a verified rollout's), 0 for critic-only evaluations.
    An expansion evaluates the selected node's new children; a terminal revisit (or a dead end)
    evaluates the selected node itself. Evaluations of one selection share the path above the
    selected node, so their totals (summed in eval order) are added to it once: k + depth
    updates instead of k * depth. With alpha >= 0 the adaptive width of every node on the path
    is refreshed (c_min, c_max: int [max_depth + 1], indexed by depth).
    """
    cap = capacity_of(F)
    parent, first_child, num_children, width_target = F[0], F[1], F[2], F[4]
    depth, visits, vloss, value_sum = F[5], F[6], F[7], F[8]
    success_sum, verified_visits = F[9], F[15]
    for m in range(sel_tree.shape[0]):
        b = np.uint64(sel_tree[m]) * np.uint64(cap)  # flat offset, unsigned (see select_leaves)
        s = sel_node[m]
        n_tot, w_tot, s_tot, v_tot = 0, 0.0, 0.0, 0
        for e in range(eval_start[m], eval_start[m] + eval_count[m]):
            c = eval_node[e]
            if c != s:
                x = b + np.uint64(c)
                assert parent[x] == s, "an evaluated node must be the selected node or its child"
                visits[x] += 1
                value_sum[x] += eval_value[e]
                success_sum[x] += eval_success[e]
                verified_visits[x] += eval_verified[e]
            n_tot += 1
            w_tot += eval_value[e]
            s_tot += eval_success[e]
            v_tot += eval_verified[e]
        node = s
        while node != NO_NODE:  # one walk up: the selection's virtual loss out, the totals in
            x = b + np.uint64(node)
            vloss[x] -= 1
            visits[x] += n_tot
            value_sum[x] += w_tot
            success_sum[x] += s_tot
            verified_visits[x] += v_tot
            node = parent[x]
        if alpha >= 0.0:
            node = s
            while node != NO_NODE:
                _refresh_width(
                    first_child,
                    num_children,
                    width_target,
                    depth,
                    visits,
                    value_sum,
                    b,
                    node,
                    alpha,
                    c_min,
                    c_max,
                )
                node = parent[b + np.uint64(node)]
