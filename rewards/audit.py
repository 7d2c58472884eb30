"""How far the derived labels can be trusted: checks against the task verifier and fresh rollouts.

Pure numpy; the model work (re-rolling from a node's path of steps, checking steps with the
verifier, searching trees the critics do not steer) comes in as callables and trees, so this module
is tested with fakes and the job injects the real policy, task and critics. A sampled pair is
re-rolled from its tree's nodes (`chosen_node`, `rejected_node`), never from text parsed back; an
exported text is read back into steps only to check that text itself.

`audit_dataset` returns a JSON-able dict (written to `out/audit.json` by `rewards.export`):

    key                                   meaning
    num_trees, num_problems, num_pairs    what was audited
    labels                                the exported texts against the verifier, over every row:
                                          rejected_accepted, undesirable_accepted (negatives the
                                          verifier accepts), chosen_refused, desirable_refused,
                                          sft_refused, unchecked (rows it could not be asked about),
                                          duplicate_pairs (same prompt and texts), contradictory_pairs
                                          (A>B and B>A under one prompt); all 0 in a sound dataset
    pair_precision                        over sampled pairs: fraction where the chosen step node
                                          succeeds more often than the rejected one: a terminal step
                                          by the verifier, a non-terminal one by fresh rollouts from
                                          its path in the tree (None without rerollout)
    pair_precision_ci95                   [low, high] Wilson 95 % interval of pair_precision
    pair_precision_by_stratum             the same per stratum: "both_nonterminal", "one_terminal",
                                          "both_terminal", and "depth_1", "depth_2", "depth_3+":
                                          {precision, ci95, n}
    pair_rerollout_ties, pair_rerollout_gap  share of equal rates; mean chosen - rejected rate
    pairs_sampled, rollouts_per_prefix    the sample behind pair_precision
    pairs_per_problem                     mean / median / min / max and {pairs: problems} histogram
    critics.<name>                        value / prm: non-root, non-terminal nodes with >= 1 trial,
                                          AUROC vs "a verified success lies below" (+ its standard
                                          error), ECE vs the success rate; orm: verified terminals,
                                          AUROC and ECE vs the verdict. Only on `critic_trees`: trees
                                          searched by verified rollouts alone (the critics scored every
                                          node but steered nothing), on problems the critics never
                                          trained on; None without them
    orm_favourite_rejected                over those trees: how often the terminal the ORM scores
                                          highest is verified wrong
    search_success                        fraction of trees holding a verified correct terminal
    greedy_success, search_minus_greedy   when greedy results are given
    seen_in_training                      per model ("policy", "critics"): how many of the job's
                                          problems its training set holds, by content (None: unknown)
    unseen                                problems neither model saw: count, search and greedy success
    distinct_verified_solutions_per_problem  mean and histogram of distinct (whitespace-normalized)
                                          verified-correct solution texts per problem, over all trees
ECE is None for a critic whose scores leave [0, 1] (it is not a probability then).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from critics.metrics import auroc, auroc_se, auroc_se_by_group, ece
from mcts.finished import FinishedTree
from mcts.tasks.base import content_key
from rewards.records import normalize_text, solution_key, text_steps
from rewards.stats import CORRECT, node_stats, wilson_interval

CRITICS = ("value", "prm", "orm")
# [(problem id, the steps of a node's path)], n -> success rate of n fresh verified rollouts from each
Rerollout = Callable[[list[tuple[str, list[str]]], int], list[float]]
# (problem id, steps) -> does the verifier accept them as a solution? None: cannot tell
Verify = Callable[[str, list[str]], bool | None]


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


# -- the exported texts against the verifier -------------------------------------------------------
_LABEL_KEYS = (
    "rejected_accepted",
    "undesirable_accepted",
    "chosen_refused",
    "desirable_refused",
    "sft_refused",
)


def label_check(
    pairs: list[dict], kto: list[dict], sft: list[dict], verify: Verify | None, trees: dict[str, FinishedTree]
) -> dict:
    """Every exported text against the verifier, and duplicate / contradictory pairs. `trees`: tree id
    -> the tree a row was derived from, whose prompt and separator read the text back into steps."""
    out = dict.fromkeys(_LABEL_KEYS, 0)
    out["unchecked"] = 0

    def check(row: dict, text: str, want: bool, bad: str) -> None:
        tree = trees.get(row["tree_id"])
        steps = text_steps(tree, row["prompt"], text) if tree is not None else None
        ok = verify(row["problem_id"], steps) if verify is not None and steps is not None else None
        if ok is None:
            out["unchecked"] += 1
        elif ok != want:
            out[bad] += 1

    for p in pairs:
        check(p, p["chosen"], True, "chosen_refused")
        check(p, p["rejected"], False, "rejected_accepted")
    for r in kto:
        check(
            r,
            r["completion"],
            bool(r["label"]),
            "desirable_refused" if r["label"] else "undesirable_accepted",
        )
    for r in sft:
        check(r, r["completion"], True, "sft_refused")
    exact = Counter((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)
    out["duplicate_pairs"] = sum(c - 1 for c in exact.values())
    orient: dict[tuple, set] = defaultdict(set)
    for p in pairs:
        c, r = normalize_text(p["chosen"]), normalize_text(p["rejected"])
        orient[(p["prompt"], frozenset((c, r)))].add(c)
    out["contradictory_pairs"] = sum(1 for sides in orient.values() if len(sides) > 1)
    return out


# -- pair precision on the exported texts ----------------------------------------------------------
def _precision(correct: np.ndarray) -> dict:
    k = len(correct)
    if not k:
        return {"precision": None, "ci95": None, "n": 0}
    p = float(np.mean(correct))
    return {"precision": p, "ci95": list(wilson_interval(p, k, 1.96)), "n": k}


def sample_indices(total: int, sample: int, seed: int) -> list[int]:
    """Which of `total` pairs (in shard-name order) the pair-precision check re-rolls."""
    if not total:
        return []
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(total, size=min(sample, total), replace=False)]


def pair_precision(
    picked: list[dict],
    paths: list[tuple[list[str], list[str]]],
    rerollout: Rerollout,
    verify: Verify | None,
    n: int,
) -> dict:
    """Re-roll `n` times from both step nodes of each `picked` pair (one batched call), given
    `paths`, the steps down to its chosen and rejected node; a terminal step is scored by the
    verifier instead."""
    rates = np.full((len(picked), 2), np.nan)
    asks: list[tuple[str, list[str]]] = []
    where: list[tuple[int, int]] = []
    for row, (p, sides) in enumerate(zip(picked, paths, strict=True)):
        for col, (side, steps) in enumerate(zip(("chosen", "rejected"), sides, strict=True)):
            if p.get(f"{side}_terminal") and verify is not None:
                verdict = verify(p["problem_id"], steps)
                if verdict is not None:
                    rates[row, col] = float(verdict)
                    continue
            asks.append((p["problem_id"], steps))
            where.append((row, col))
    got = np.asarray(rerollout(asks, n) if asks else [], dtype=np.float64)
    assert got.shape == (len(asks),), f"rerollout returned {got.shape} rates for {len(asks)} prefixes"
    for (row, col), rate in zip(where, got, strict=True):
        rates[row, col] = rate
    chosen, rejected = rates[:, 0], rates[:, 1]
    correct = chosen > rejected
    terminals = np.array(
        [int(bool(p.get("chosen_terminal"))) + int(bool(p.get("rejected_terminal"))) for p in picked]
    )
    depth = np.array([min(int(p["depth"]), 3) for p in picked])
    overall = _precision(correct)
    strata = {
        "both_nonterminal": terminals == 0,
        "one_terminal": terminals == 1,
        "both_terminal": terminals == 2,
        "depth_1": depth == 1,
        "depth_2": depth == 2,
        "depth_3+": depth >= 3,
    }
    k = len(picked)
    return {
        "pair_precision": overall["precision"],
        "pair_precision_ci95": overall["ci95"],
        "pair_precision_by_stratum": {name: _precision(correct[m]) for name, m in strata.items()},
        "pair_rerollout_ties": float(np.mean(chosen == rejected)) if k else None,
        "pair_rerollout_gap": float(np.mean(chosen - rejected)) if k else None,
        "pairs_sampled": k,
        "rollouts_per_prefix": n,
    }


# -- critics on trees they did not steer -----------------------------------------------------------
def critic_agreement(trees: list[FinishedTree]) -> dict:
    """AUROC (+ standard error) and ECE of each critic on rollout-valued trees (see the docstring)."""
    rows: dict[str, list[tuple[float, bool, float, int]]] = defaultdict(list)
    favourite = []
    for k, t in enumerate(trees):
        st = node_stats(t)
        inner = np.flatnonzero((st.depth > 0) & ~st.terminal & (st.trials > 0))
        for name in ("value", "prm"):
            s = t.nodes[name].astype(np.float64)
            rows[name] += [(s[i], bool(st.success_below[i]), float(st.success[i]), k) for i in inner]
        verified = np.flatnonzero(st.terminal & (st.outcome >= 0) & (st.depth > 0))
        orm = t.nodes["orm"].astype(np.float64)
        rows["orm"] += [
            (orm[i], st.outcome[i] == CORRECT, float(st.outcome[i] == CORRECT), k) for i in verified
        ]
        scored = verified[~np.isnan(orm[verified])]
        if len(scored):
            favourite.append(bool(st.outcome[scored[np.argmax(orm[scored])]] != CORRECT))
    out: dict = {}
    for name in CRITICS:
        a = np.asarray(rows[name], dtype=np.float64).reshape(-1, 4)
        a = a[~np.isnan(a[:, 0])]
        y = a[:, 1] > 0
        auc = auroc(a[:, 0], y)
        out[name] = {
            "auroc": auc,
            "auroc_se": auroc_se(auc, int(y.sum()), int((~y).sum())),
            "auroc_se_trees": auroc_se_by_group(a[:, 0], y, a[:, 3]),
            "ece": _safe_ece(a[:, 0], a[:, 2]),
            "n": len(a),
            "positive_rate": float(y.mean()) if len(y) else None,
        }
    return {"critics": out, "orm_favourite_rejected": float(np.mean(favourite)) if favourite else None}


@dataclass
class Shard:
    """One shard's rows, as the audit reads them (one at a time: the driver's memory stays flat)."""

    trees: list[FinishedTree]
    pairs: list[dict]
    kto: Sequence[dict] = ()
    sft: Sequence[dict] = ()

    KINDS = ("trees", "pairs", "kto", "sft")  # the record kinds the audit reads

    @classmethod
    def from_rows(cls, rows: dict[str, list[dict]]) -> Shard:
        """A shard from its rows of `KINDS` ({kind: rows}, as `rewards.export.iter_shards` yields)."""
        return cls([FinishedTree.from_row(r) for r in rows["trees"]], rows["pairs"], rows["kto"], rows["sft"])


def audit_dataset(trees: list[FinishedTree], pairs: list[dict], *, kto=(), sft=(), **kw) -> dict:
    """`audit_shards` over rows held in memory as one shard."""
    return audit_shards([Shard(trees, pairs, kto, sft)], len(pairs), **kw)


def audit_shards(
    shards: Iterable[Shard],
    num_pairs: int,
    *,
    rerollout: Rerollout | None,
    sample_pairs: int,
    greedy: dict[str, bool] | None,
    sample_seed: int,
    rollouts_per_prefix: int = 16,
    verify: Verify | None = None,
    critic_trees: list[FinishedTree] | None = None,
    seen: dict[str, set[str] | None] | None = None,
) -> dict:
    """The audit report (keys in the module docstring), reading `shards` once, in order, and keeping
    only per-problem tallies and the sampled pairs: `num_pairs` (the pairs of all shards) fixes the
    sample (drawn with `sample_seed`) before the first shard is read. `greedy`: problem id -> greedy
    decoding verified correct; `seen`: model name -> content keys of its training problems (None:
    unknown)."""
    picks = (
        sample_indices(num_pairs, sample_pairs, sample_seed)
        if rerollout is not None and sample_pairs > 0
        else []
    )
    wanted = {i: k for k, i in enumerate(picks)}
    picked: list[dict | None] = [None] * len(picks)
    paths: list[tuple[list[str], list[str]] | None] = [None] * len(picks)
    labels: Counter = Counter()
    per_problem: Counter = Counter()
    solved: dict[str, bool] = {}
    keys: dict[str, str] = {}
    solutions: dict[str, set[str]] = defaultdict(set)
    num_trees = seen_pairs = 0
    for shard in shards:
        # a problem's pairs all lie in its batch's shard, so duplicates and contradictions (same
        # prompt) are counted exactly shard by shard
        trees = {t.tree_id: t for t in shard.trees}
        labels.update(label_check(shard.pairs, list(shard.kto), list(shard.sft), verify, trees))
        for row in shard.pairs:
            if seen_pairs in wanted:
                tree = trees[row["tree_id"]]  # a shard holds the trees its records were derived from
                picked[wanted[seen_pairs]] = row
                paths[wanted[seen_pairs]] = (
                    tree.path_steps(int(row["chosen_node"])),
                    tree.path_steps(int(row["rejected_node"])),
                )
            seen_pairs += 1
            per_problem[row["problem_id"]] += 1
        for t in shard.trees:
            num_trees += 1
            st = node_stats(t)
            solved[t.problem_id] = solved.get(t.problem_id, False) or bool(st.verified_below[0])
            keys[t.problem_id] = content_key(t.question, t.meta)
            for i in np.flatnonzero(st.terminal & (st.outcome == CORRECT)):
                solutions[t.problem_id].add(solution_key(t.path_steps(int(i)), t.separator))
    assert seen_pairs == num_pairs, f"the shards hold {seen_pairs} pairs, not the {num_pairs} announced"
    problems = sorted(set(solved) | set(per_problem))
    report: dict = {"num_trees": num_trees, "num_problems": len(problems), "num_pairs": num_pairs}
    report["labels"] = {
        k: labels[k] for k in (*_LABEL_KEYS, "unchecked", "duplicate_pairs", "contradictory_pairs")
    }

    if picks:
        report |= pair_precision(picked, paths, rerollout, verify, rollouts_per_prefix)
    else:
        report |= {"pair_precision": None, "pair_precision_ci95": None, "pair_precision_by_stratum": None}
        report |= {"pair_rerollout_ties": None, "pair_rerollout_gap": None}
        report |= {"pairs_sampled": 0, "rollouts_per_prefix": 0}
    report["pairs_per_problem"] = _distribution([per_problem[p] for p in problems])

    if critic_trees:
        report |= critic_agreement(critic_trees)
        report["critic_trees"] = len(critic_trees)
    else:
        report |= {"critics": None, "orm_favourite_rejected": None, "critic_trees": 0}

    def rate(flags: list[bool]) -> float | None:
        return float(np.mean(flags)) if flags else None

    report["search_success"] = rate(list(solved.values()))
    report["greedy_success"] = rate([greedy[p] for p in solved if p in greedy]) if greedy else None
    report["search_minus_greedy"] = (
        report["search_success"] - report["greedy_success"]
        if report["search_success"] is not None and report["greedy_success"] is not None
        else None
    )
    seen = seen or {}
    report["seen_in_training"] = {
        name: (None if s is None else sum(keys[p] in s for p in solved)) for name, s in seen.items()
    }
    if seen and all(s is not None for s in seen.values()):
        unseen = [p for p in solved if not any(keys[p] in s for s in seen.values())]
        report["unseen"] = {
            "problems": len(unseen),
            "search_success": rate([solved[p] for p in unseen]),
            "greedy_success": rate([greedy[p] for p in unseen if p in greedy]) if greedy else None,
        }
    else:
        report["unseen"] = None
    report["distinct_verified_solutions_per_problem"] = _distribution([len(solutions[p]) for p in problems])
    return report
