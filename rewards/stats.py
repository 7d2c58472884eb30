"""Per-node statistics of a finished tree and the Wilson test that gates a pair on them.

`node_stats` sweeps a tree once bottom-up: visits N (selection only), trials V and successes S
(`FinishedTree.evidence`: distinct verified samples below a node), the most visited verified-correct
and verified-wrong terminals below every node, and the children lists. `wilson_separation` says
at what confidence two success rates over trials are told apart. numpy + stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from mcts.finished import UNVERIFIED, FinishedTree

CORRECT = 1
_Z_MAX = 8.0  # beyond this the two intervals separate at confidence 1 - 1e-15: call it certain


@dataclass
class NodeStats:
    """Per-node statistics of one tree; every array has shape [num_nodes]."""

    visits: np.ndarray  # int32   N (selection)
    trials: np.ndarray  # int64   V: distinct verified samples in the subtree
    successes: np.ndarray  # int64   S: verified correct ones among them
    q: np.ndarray  # float64 W / N (NaN where N == 0)
    success: np.ndarray  # float64 S / V (NaN where V == 0)
    depth: np.ndarray  # int32
    terminal: np.ndarray  # bool
    outcome: np.ndarray  # int8
    success_below: np.ndarray  # bool    S > 0: a verified success (terminal or rollout) below: the
    #                                       hard label (Math-Shepherd's: any completion reaches the answer)
    verified_below: np.ndarray  # bool    an outcome==1 terminal lies in the subtree (node included)
    num_verified_below: np.ndarray  # int32   number of outcome==1 terminals in the subtree
    terminal_below: np.ndarray  # bool    any terminal lies in the subtree
    best_verified: np.ndarray  # int32   most visited outcome==1 terminal in the subtree, -1 if none
    best_wrong: np.ndarray  # int32   most visited outcome==0 terminal in the subtree, -1 if none
    children: list[np.ndarray]  # children[i]: child ids of node i, ascending
    has_verifier: bool  # any verified outcome or verified visit in the tree (the task has a verifier)


def node_stats(tree: FinishedTree) -> NodeStats:
    """Subtree aggregates by one bottom-up sweep over depth levels (vectorised within a level)."""
    nd = tree.nodes
    n = tree.num_nodes
    parent = nd["parent"].astype(np.int64)
    depth = nd["depth"].astype(np.int32)
    ids = np.arange(n, dtype=np.int64)
    nonroot = parent >= 0
    assert np.all(depth[nonroot] == depth[parent[nonroot]] + 1), (
        f"tree {tree.problem_id}: depth is not parent depth + 1 for nodes {ids[nonroot][depth[nonroot] != depth[parent[nonroot]] + 1][:5]}"
    )
    visits = nd["visits"]
    correct = nd["terminal"] & (nd["outcome"] == CORRECT)
    count = correct.astype(np.int32)
    term_below = nd["terminal"].astype(np.int32)
    wrong = nd["terminal"] & (nd["outcome"] == 0)
    # best terminal encoded as one sortable int: more visits wins, then the lower id
    rank = visits.astype(np.int64) * (n + 1) + (n - ids)
    key = np.where(correct, rank, -1)
    key_wrong = np.where(wrong, rank, -1)
    for d in range(int(depth.max(initial=0)), 0, -1):
        level = np.flatnonzero(depth == d)
        np.add.at(count, parent[level], count[level])
        np.add.at(term_below, parent[level], term_below[level])
        np.maximum.at(key, parent[level], key[level])
        np.maximum.at(key_wrong, parent[level], key_wrong[level])
    best = np.where(key >= 0, n - key % (n + 1), -1).astype(np.int32)
    best_wrong = np.where(key_wrong >= 0, n - key_wrong % (n + 1), -1).astype(np.int32)
    successes, trials = tree.evidence()

    order = np.argsort(parent, kind="stable")
    bounds = np.searchsorted(parent[order], np.arange(n + 1))
    children = [order[bounds[i] : bounds[i + 1]] for i in range(n)]
    return NodeStats(
        visits=visits,
        trials=trials,
        successes=successes,
        q=tree.q(),
        success=np.where(trials > 0, successes / np.maximum(trials, 1), np.nan),
        success_below=successes > 0,
        depth=depth,
        terminal=nd["terminal"],
        outcome=nd["outcome"],
        verified_below=count > 0,
        num_verified_below=count,
        terminal_below=term_below > 0,
        best_verified=best,
        best_wrong=best_wrong,
        children=children,
        has_verifier=bool(np.any(nd["outcome"] != UNVERIFIED) or trials[0] > 0),
    )


# -- statistics of a pair ---------------------------------------------------------------------------
def wilson_interval(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson score interval of a success rate p observed over n trials, at normal quantile z (no
    trials: the whole [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(max(p * (1 - p) / n + z2n / (4 * n), 0.0))
    return center - half, center + half


def wilson_separation(p_hi: float, n_hi: float, p_lo: float, n_lo: float) -> tuple[float, float]:
    """(z, level): the largest z (and its two-sided level 2*Phi(z)-1) at which the Wilson intervals of
    the two rates do not overlap. Intervals are nested in z, so the gap shrinks monotonically and a
    bisection finds it. (0, 0) when p_hi <= p_lo."""
    if p_hi <= p_lo:
        return 0.0, 0.0

    def gap(z: float) -> float:
        return wilson_interval(p_hi, n_hi, z)[0] - wilson_interval(p_lo, n_lo, z)[1]

    lo, hi = 0.0, _Z_MAX
    if gap(hi) > 0:
        lo = hi
    else:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if gap(mid) > 0 else (lo, mid)
    return lo, math.erf(lo / math.sqrt(2))


def z_of_confidence(level: float) -> float:
    """Normal quantile of a two-sided level (0.9 -> 1.645)."""
    return NormalDist().inv_cdf((1 + level) / 2) if level > 0 else 0.0
