"""How far the derived labels can be trusted: checks against the task verifier and fresh rollouts.

Pure numpy; the only model work (re-rolling from a prefix) comes in as a callable, so this module
is tested with fakes and the pipeline injects the real policy.

`audit_dataset` returns a JSON-able dict (written to `out/audit.json` by `rewards.export`):

    key                                   meaning
    num_trees, num_problems, num_pairs    what was audited
    pair_precision                        over sampled pairs: fraction where fresh rollouts from the
                                          chosen prefix (prompt + chosen's first step) succeed more
                                          often than from the rejected prefix (None without rerollout)
    pair_precision_ci95                   [low, high] Wilson 95 % interval of pair_precision
    pair_rerollout_ties                   fraction of sampled pairs where the two rates were equal
    pair_rerollout_gap                    mean (chosen rate - rejected rate) over sampled pairs
    pairs_sampled, rollouts_per_prefix    the sample behind pair_precision
    pairs_per_problem                     mean / median / min / max and {pairs: problems} histogram
    critics.<name>.terminal_auroc/_ece/_n AUROC and ECE of the critic on verified terminals vs outcome
    critics.<name>.subtree_auroc/_ece/_n  on non-root nodes with verified visits: AUROC vs
                                          "a verified success lies below", ECE vs the success rate
    search_success                        fraction of trees holding a verified correct terminal
    greedy_success, search_minus_greedy   when the greedy success rate is given
    critic_favourite_rejected.<name>      over trees with verified terminals: how often the terminal
                                          the critic scores highest is verified wrong
    distinct_verified_solutions_per_problem  mean and histogram of distinct (whitespace-normalized)
                                          verified-correct solution texts per problem, over all trees
ECE is None for a critic whose scores leave [0, 1] (it is not a probability then).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from mcts.finished import FinishedTree
from rewards.derive import CORRECT, node_stats, normalize_text, wilson_interval
from rewards.metrics import auroc, ece

CRITICS = ("score", "value", "prm", "orm")
Rerollout = Callable[[list[str], int], list[float]]


def _distribution(counts: Sequence[int]) -> dict:
    if not counts:
        return {"mean": None, "median": None, "min": None, "max": None, "histogram": {}}
    a = np.asarray(counts, dtype=np.float64)
    hist = Counter(int(c) for c in counts)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "min": int(a.min()),
        "max": int(a.max()),
        "histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def _safe_ece(pred: np.ndarray, target: np.ndarray) -> float | None:
    p = pred[~np.isnan(pred)]
    if len(p) == 0 or p.min() < 0 or p.max() > 1:
        return None
    return ece(pred, target)


def pair_prefixes(pair: dict, trees_by_id: dict[str, FinishedTree]) -> tuple[str, str]:
    """(chosen prefix, rejected prefix): the pair's prompt plus that side's first step and "\\n"."""
    tree = trees_by_id.get(pair["tree_id"])
    if tree is not None:
        c, r = tree.steps[pair["chosen_node"]], tree.steps[pair["rejected_node"]]
    else:  # the tree is not at hand: the first line of each side is its step
        c, r = pair["chosen"].split("\n", 1)[0], pair["rejected"].split("\n", 1)[0]
    return pair["prompt"] + c + "\n", pair["prompt"] + r + "\n"


def pair_precision(
    pairs: list[dict],
    trees_by_id: dict[str, FinishedTree],
    rerollout: Rerollout,
    sample: int,
    n: int,
    seed: int,
) -> dict:
    """Re-roll `n` times from both prefixes of up to `sample` random pairs (one batched call)."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pairs), size=min(sample, len(pairs)), replace=False) if pairs else []
    prefixes = [p for i in pick for p in pair_prefixes(pairs[int(i)], trees_by_id)]
    rates = np.asarray(rerollout(prefixes, n) if prefixes else [], dtype=np.float64)
    assert rates.shape == (len(prefixes),), (
        f"rerollout returned {rates.shape} rates for {len(prefixes)} prefixes"
    )
    chosen, rejected = rates[0::2], rates[1::2]
    k = len(chosen)
    precision = float(np.mean(chosen > rejected)) if k else None
    return {
        "pair_precision": precision,
        "pair_precision_ci95": list(wilson_interval(precision, k, 1.96)) if k else None,
        "pair_rerollout_ties": float(np.mean(chosen == rejected)) if k else None,
        "pair_rerollout_gap": float(np.mean(chosen - rejected)) if k else None,
        "pairs_sampled": k,
        "rollouts_per_prefix": n,
    }


def audit_dataset(
    trees: list[FinishedTree],
    pairs: list[dict],
    *,
    rerollout: Rerollout | None,
    sample_pairs: int,
    greedy_success: float | None,
    seed: int,
    rollouts_per_prefix: int = 8,
) -> dict:
    """The audit report (keys in the module docstring) for `trees` and the `pairs` derived from them."""
    trees_by_id = {f"{t.problem_id}/{t.seed}": t for t in trees}
    problems = sorted({t.problem_id for t in trees} | {p["problem_id"] for p in pairs})
    report: dict = {"num_trees": len(trees), "num_problems": len(problems), "num_pairs": len(pairs)}

    if rerollout is not None:
        report |= pair_precision(pairs, trees_by_id, rerollout, sample_pairs, rollouts_per_prefix, seed)
    else:
        report |= {"pair_precision": None, "pair_precision_ci95": None}
        report |= {"pair_rerollout_ties": None, "pair_rerollout_gap": None}
        report |= {"pairs_sampled": 0, "rollouts_per_prefix": 0}
    per_problem = Counter(p["problem_id"] for p in pairs)
    report["pairs_per_problem"] = _distribution([per_problem[p] for p in problems])

    # critic agreement with the verifier, pooled over trees
    term = defaultdict(list)  # critic -> [(score, outcome)]
    sub = defaultdict(list)  # critic -> [(score, verified_below, success)]
    favourite = defaultdict(list)  # critic -> [favourite verified wrong?]
    solved = []
    solutions: dict[str, set[str]] = defaultdict(set)
    for t in trees:
        st = node_stats(t)
        solved.append(bool(st.verified_below[0]))
        verified = np.flatnonzero(st.terminal & (st.outcome >= 0))
        visited = np.flatnonzero((st.depth > 0) & (st.verified_visits > 0))
        for name in CRITICS:
            s = t.nodes[name].astype(np.float64)
            term[name] += [(s[i], st.outcome[i] == CORRECT) for i in verified]
            if st.has_verifier:
                sub[name] += [(s[i], st.verified_below[i], st.success[i]) for i in visited]
            scored = verified[~np.isnan(s[verified])]
            if len(scored):
                favourite[name].append(bool(st.outcome[scored[np.argmax(s[scored])]] != CORRECT))
        for i in verified[st.outcome[verified] == CORRECT]:
            solutions[t.problem_id].add(normalize_text("\n".join(t.path_steps(int(i)))))

    report["critics"] = {}
    for name in CRITICS:
        ts = np.asarray(term[name], dtype=np.float64).reshape(-1, 2)
        ss = np.asarray(sub[name], dtype=np.float64).reshape(-1, 3)
        report["critics"][name] = {
            "terminal_auroc": auroc(ts[:, 0], ts[:, 1] > 0),
            "terminal_ece": _safe_ece(ts[:, 0], ts[:, 1]),
            "terminal_n": int((~np.isnan(ts[:, 0])).sum()),
            "subtree_auroc": auroc(ss[:, 0], ss[:, 1] > 0),
            "subtree_ece": _safe_ece(ss[:, 0], ss[:, 2]),
            "subtree_n": int((~np.isnan(ss[:, 0])).sum()),
        }
    report["critic_favourite_rejected"] = {
        name: (float(np.mean(favourite[name])) if favourite[name] else None) for name in CRITICS
    }
    report["critic_favourite_trees"] = len(favourite["score"])

    search = float(np.mean(solved)) if solved else None
    report["search_success"] = search
    report["greedy_success"] = greedy_success
    report["search_minus_greedy"] = (
        search - greedy_success if search is not None and greedy_success is not None else None
    )
    report["distinct_verified_solutions_per_problem"] = _distribution([len(solutions[p]) for p in problems])
    return report
