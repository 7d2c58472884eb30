"""Finished trees -> preference records. Pure functions over `FinishedTree`s (numpy + stdlib only).

Per node the search leaves N (visits) and Q = W / N for selection, and its evidence: V trials, the
distinct verified samples in its subtree (each verified terminal once however often it was revisited,
each rollout once), S of them verified correct (`FinishedTree.evidence`); the success rate is S / V.
Every statistic a record is gated or labelled on is built on trials, never on visits. From those:

- `step_pairs`: under every internal node, sibling options are compared; the one with the higher
  success rate is chosen. A pair is kept only when the gap is real: both sides visited at least
  `min_visits` times, a gap of at least `min_margin`, and Wilson score intervals of the two success
  rates (over trials) that do not overlap at the `confidence` level. Each side is continued to a
  verified end so that DPO sees whole solutions the verifier has judged: chosen by its most visited
  verified-correct terminal, rejected by its most visited verified-wrong terminal; a side without
  such an end drops the pair. Pairs are keyed by the unordered texts: A>B and B>A under one prompt
  both go, exact duplicates are kept once.
- `prm_rows`: root-to-terminal paths with hard (Math-Shepherd "hard estimation": a verified
  success lies below the step) and soft (the step's success rate) labels per step.
- `kto_rows`, `sft_rows`, `value_rows`: unpaired labels, the best verified trajectory, value targets.

Completions end the way the policy ends its own solutions: every step followed by the tree's
separator (a step the policy ended with EOS by nothing), then TRL's EOS.

The Wilson test treats the trials under a node as independent draws. They are not quite (MCTS steers
later samples by earlier ones), so read `confidence` as a ranking of how clearly two siblings
separate, not as a calibrated probability; `rewards.audit` measures the real precision with fresh
rollouts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mcts.finished import UNVERIFIED, FinishedTree
from rewards.records import completion_text, dedupe, kto_key, normalize_text, pair_key, prefix_text
from rewards.stats import CORRECT, NodeStats, node_stats, wilson_separation


@dataclass
class DeriveConfig:
    """How finished trees become records. Every field is recorded (hashed) with the records."""

    min_visits: int = 2
    """A pair side, or a value-target node, needs at least this many visits N (a pair side also
    needs V > 0 verified visits; the Wilson test then weighs how many)."""
    min_margin: float = 0.2
    """Minimum success-rate gap (chosen - rejected) of a pair."""
    confidence: float = 0.9
    """Two-sided level of the Wilson score intervals that must not overlap (0 disables the test)."""
    max_pairs_per_node: int = 3
    """At most this many pairs per parent node, largest success gap (best vs worst) first."""
    trajectory_min_visits: int = 1
    """PRM / KTO trajectories: a root-to-terminal path is used when its terminal has this many visits."""
    max_trajectories_per_tree: int = 32
    """PRM / KTO trajectories per tree, most visited terminals first."""
    value_target: str = "success"
    """`values.value` column: "success" (S / V over trials, anchored on the verifier) or "q" (W / N,
    critic-backed)."""
    kto_from_pairs: bool = True
    """KTO rows from the two sides of every accepted pair (chosen desirable, rejected not)."""
    kto_trajectories: bool = True
    """KTO rows from whole verified trajectories (label = verified outcome)."""
    sft_solutions: int = 1
    """`sft` rows per problem: its distinct verified-correct trajectories, most visited first (1: the
    best trajectory; more: rejection-sampling fine-tuning on every distinct solution the search found,
    as `arborist improve` trains)."""

    def __post_init__(self) -> None:
        if self.min_visits < 1:
            raise ValueError(f"min_visits={self.min_visits}: a pair side needs at least 1 visit; use >= 1")
        if not 0.0 <= self.min_margin <= 1.0:
            raise ValueError(f"min_margin={self.min_margin} is a success-rate gap; use a value in [0, 1]")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(
                f"confidence={self.confidence}: use a level in [0, 1), e.g. 0.9; 0 disables the test"
            )
        if self.sft_solutions < 1:
            raise ValueError(f"sft_solutions={self.sft_solutions}: keep at least 1 trajectory per problem")
        if self.max_pairs_per_node < 1 or self.max_trajectories_per_tree < 0:
            raise ValueError("max_pairs_per_node must be >= 1 and max_trajectories_per_tree >= 0")
        if self.value_target not in ("success", "q"):
            raise ValueError(f"value_target={self.value_target!r}: use 'success' or 'q'")

    def hash(self) -> str:
        """The hash written into every record: the job's (`for_job`), else a short sha256 of this
        class's fields (stable across runs; a subclass's extra settings do not enter it)."""
        if getattr(self, "_job_hash", ""):
            return self._job_hash
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DeriveConfig)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def for_job(self, config_hash: str) -> DeriveConfig:
        """A copy whose records carry `config_hash` (the whole job's config, not only these fields)."""
        stamped = copy.copy(self)
        stamped._job_hash = config_hash
        return stamped


def continuation(
    tree: FinishedTree, stats: NodeStats, node: int, correct: bool
) -> tuple[list[int], int] | None:
    """(node ids from `node` down to its end, end node): the most visited verified-correct
    (`correct`) or verified-wrong terminal below `node` (the node itself included); None if there is none."""
    end = int(stats.best_verified[node] if correct else stats.best_wrong[node])
    if end < 0:
        return None
    path = tree.path(end)
    start = int(stats.depth[node]) - 1
    assert path[start] == node, f"node {node} is not on the path to {end}: {path}"
    return path[start:], end


def _f(x) -> float:
    return float(x)


# -- records ----------------------------------------------------------------------------------------
def step_pairs(tree: FinishedTree, cfg: DeriveConfig, stats: NodeStats | None = None) -> list[dict]:
    """Sibling preference pairs (rows of records.PAIRS_SCHEMA), parents in id order, per parent the
    largest success gaps first. See the module docstring for the acceptance tests."""
    st = stats or node_stats(tree)
    nd, chash, tid = tree.nodes, cfg.hash(), tree.tree_id
    q_key = np.nan_to_num(st.q, nan=-np.inf)
    rows: list[dict] = []
    for parent, kids in enumerate(st.children):
        kids = kids[(st.visits[kids] >= cfg.min_visits) & (st.trials[kids] > 0)]
        if len(kids) < 2:
            continue
        ranked = kids[np.lexsort((kids, -q_key[kids], -st.success[kids]))]  # best first
        candidates = [
            (ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(len(ranked) - 1, a, -1)
        ]
        candidates.sort(
            key=lambda cr: -(st.success[cr[0]] - st.success[cr[1]])
        )  # stable: best-vs-worst first
        prompt = prefix_text(tree, parent)
        seen: set[frozenset[str]] = set()
        for c, r in candidates:
            if len(seen) >= cfg.max_pairs_per_node:
                break
            gap = float(st.success[c] - st.success[r])
            if gap <= 0 or gap < cfg.min_margin - 1e-12:
                continue
            z, level = wilson_separation(st.success[c], st.trials[c], st.success[r], st.trials[r])
            if level < cfg.confidence:
                continue
            chosen_side = continuation(tree, st, int(c), correct=True)
            rejected_side = continuation(tree, st, int(r), correct=False)
            if chosen_side is None or rejected_side is None:
                continue  # a side the verifier has not judged would be presented as finished
            (c_path, c_end), (r_path, r_end) = chosen_side, rejected_side
            chosen, rejected = completion_text(tree, c_path), completion_text(tree, r_path)
            key = frozenset((normalize_text(chosen), normalize_text(rejected)))
            if len(key) < 2 or key in seen:
                continue  # un-merged near-identical siblings: the pair would teach nothing
            seen.add(key)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "margin": gap,
                    "problem_id": tree.problem_id,
                    "tree_id": tid,
                    "parent_node": parent,
                    "chosen_node": int(c),
                    "rejected_node": int(r),
                    "chosen_end": c_end,
                    "rejected_end": r_end,
                    "depth": int(st.depth[c]),
                    "chosen_q": _f(st.q[c]),
                    "rejected_q": _f(st.q[r]),
                    "chosen_n": int(st.visits[c]),
                    "rejected_n": int(st.visits[r]),
                    "chosen_v": int(st.trials[c]),
                    "rejected_v": int(st.trials[r]),
                    "chosen_success": _f(st.success[c]),
                    "rejected_success": _f(st.success[r]),
                    "confidence": level,
                    "separation_z": z,
                    "chosen_verified": bool(st.outcome[c_end] == CORRECT),
                    "chosen_outcome": int(st.outcome[c_end]),
                    "rejected_outcome": int(st.outcome[r_end]),
                    "chosen_terminal": bool(st.terminal[c]),
                    "rejected_terminal": bool(st.terminal[r]),
                    **{
                        f"{side}_{k}": _f(nd[k][i])
                        for side, i in (("chosen", c), ("rejected", r))
                        for k in ("value", "prm", "orm")
                    },
                    "config_hash": chash,
                }
            )
    return rows


def _trajectory_ends(st: NodeStats, cfg: DeriveConfig, verified_only: bool) -> list[int]:
    """Terminals (not the root) with enough visits, most visited first (ties: higher Q, lower id), capped."""
    ok = st.terminal & (st.visits >= cfg.trajectory_min_visits) & (st.depth > 0)
    if verified_only:
        ok &= st.outcome != UNVERIFIED
    ends = np.flatnonzero(ok)
    ends = ends[np.lexsort((ends, -np.nan_to_num(st.q[ends], nan=-np.inf), -st.visits[ends]))]
    return [int(e) for e in ends[: cfg.max_trajectories_per_tree]]


def prm_rows(tree: FinishedTree, cfg: DeriveConfig, stats: NodeStats | None = None) -> list[dict]:
    """Stepwise-supervision rows (records.STEPS_SCHEMA), one per root-to-terminal path. Trees without
    any verified outcome give none: their hard labels would all be False, which is noise, not signal."""
    st = stats or node_stats(tree)
    if not st.has_verifier:
        return []
    rows = []
    for end in _trajectory_ends(st, cfg, verified_only=False):
        path = tree.path(end)
        rows.append(
            {
                "prompt": tree.prompt,
                "completions": [tree.steps[i] for i in path],
                "labels": [bool(st.success_below[i]) for i in path],
                "soft_labels": [_f(st.success[i]) for i in path],
                "problem_id": tree.problem_id,
                "tree_id": tree.tree_id,
                "nodes": [int(i) for i in path],
                "visits": [int(st.visits[i]) for i in path],
                "q": [_f(st.q[i]) for i in path],
                "end_node": end,
                "outcome": int(st.outcome[end]),
                "config_hash": cfg.hash(),
            }
        )
    return rows


def _kto_row(tree: FinishedTree, st: NodeStats, prompt, completion, label, source, node, end, chash) -> dict:
    return {
        "prompt": prompt,
        "completion": completion,
        "label": bool(label),
        "source": source,
        "problem_id": tree.problem_id,
        "tree_id": tree.tree_id,
        "node": int(node),
        "end_node": int(end),
        "depth": int(st.depth[node]),
        "q": _f(st.q[node]),
        "n": int(st.visits[node]),
        "success": _f(st.success[node]),
        "outcome": int(st.outcome[end]),
        "config_hash": chash,
    }


def kto_rows(
    tree: FinishedTree, cfg: DeriveConfig, stats: NodeStats | None = None, pairs: list[dict] | None = None
) -> list[dict]:
    """Unpaired rows (records.KTO_SCHEMA): the sides of accepted pairs (`node` = the step node) and
    whole verified trajectories (`node` = the terminal, label = its outcome). Identical
    prompt+completion texts are kept once; texts that got both labels are dropped."""
    st = stats or node_stats(tree)
    chash = cfg.hash()
    rows: list[dict] = []
    if cfg.kto_from_pairs:
        for p in step_pairs(tree, cfg, st) if pairs is None else pairs:
            rows.append(
                _kto_row(
                    tree, st, p["prompt"], p["chosen"], True, "pair", p["chosen_node"], p["chosen_end"], chash
                )
            )
            rows.append(
                _kto_row(
                    tree,
                    st,
                    p["prompt"],
                    p["rejected"],
                    False,
                    "pair",
                    p["rejected_node"],
                    p["rejected_end"],
                    chash,
                )
            )
    if cfg.kto_trajectories:
        for end in _trajectory_ends(st, cfg, verified_only=True):
            text = completion_text(tree, tree.path(end))
            rows.append(
                _kto_row(
                    tree, st, tree.prompt, text, st.outcome[end] == CORRECT, "trajectory", end, end, chash
                )
            )
    return dedupe(rows, kto_key, label="label")


def sft_rows(tree: FinishedTree, cfg: DeriveConfig, stats: NodeStats | None = None) -> list[dict]:
    """The tree's `cfg.sft_solutions` most visited verified-correct trajectories with distinct texts
    (records.SFT_SCHEMA); [] if none."""
    st = stats or node_stats(tree)
    ends = np.flatnonzero(st.terminal & (st.outcome == CORRECT) & (st.depth > 0))
    ends = ends[np.lexsort((ends, -st.visits[ends]))]  # as best_verified: most visits, then lower id
    rows, seen = [], set()
    for end in (int(e) for e in ends):
        completion = completion_text(tree, tree.path(end))
        if normalize_text(completion) in seen:
            continue
        seen.add(normalize_text(completion))
        rows.append(
            {
                "prompt": tree.prompt,
                "completion": completion,
                "problem_id": tree.problem_id,
                "tree_id": tree.tree_id,
                "end_node": end,
                "visits": int(st.visits[end]),
                "q": _f(st.q[end]),
                "depth": int(st.depth[end]),
                "num_verified_terminals": int(st.num_verified_below[0]),
                "config_hash": cfg.hash(),
            }
        )
        if len(rows) == cfg.sft_solutions:
            break
    return rows


def value_rows(tree: FinishedTree, cfg: DeriveConfig, stats: NodeStats | None = None) -> list[dict]:
    """Value targets (records.VALUES_SCHEMA) for every node (root included) with N >= min_visits and
    a defined target (with value_target="success", at least one trial)."""
    st = stats or node_stats(tree)
    target = st.success if cfg.value_target == "success" else st.q
    keep = (st.visits >= cfg.min_visits) & ~np.isnan(target)
    # an empty step the policy ended with EOS adds no text: its prompt would be its parent's
    keep &= ~(tree.nodes["eos"] & np.array([s == "" for s in tree.steps]))
    return [
        {
            "prompt": prefix_text(tree, i),
            "value": _f(target[i]),
            "visits": int(st.visits[i]),
            "trials": int(st.trials[i]),
            "success": _f(st.success[i]),
            "q": _f(st.q[i]),
            "verified_below": bool(st.verified_below[i]),
            "success_below": bool(st.success_below[i]),
            "problem_id": tree.problem_id,
            "tree_id": tree.tree_id,
            "node": int(i),
            "depth": int(st.depth[i]),
            "terminal": bool(st.terminal[i]),
            "config_hash": cfg.hash(),
        }
        for i in np.flatnonzero(keep)
    ]


def derive_all(trees: Iterable[FinishedTree], cfg: DeriveConfig) -> dict[str, list[dict]]:
    """Every record kind for a batch of trees: {"pairs", "steps", "kto", "sft", "values", "trees"}.
    Pairs are de-duplicated across the trees of one problem (several seeds find the same options),
    and contradictory ones (A>B in one tree, B>A in another) are dropped before KTO rows are made
    from them; SFT keeps the `sft_solutions` most visited distinct verified trajectories per problem."""
    out: dict[str, list[dict]] = {k: [] for k in ("pairs", "steps", "kto", "sft", "values", "trees")}
    sft: dict[str, list[dict]] = {}
    trees = list(trees)
    stats = [node_stats(tree) for tree in trees]
    for tree, st in zip(trees, stats, strict=True):
        out["pairs"] += step_pairs(tree, cfg, st)
        out["steps"] += prm_rows(tree, cfg, st)
        out["values"] += value_rows(tree, cfg, st)
        out["trees"].append(tree.to_row())
        for row in sft_rows(tree, cfg, st):
            sft.setdefault(row["problem_id"], []).append(row)
    out["pairs"] = dedupe(out["pairs"], pair_key, label="chosen", normalize=normalize_text)
    by_tree: dict[str, list[dict]] = {}
    for p in out["pairs"]:
        by_tree.setdefault(p["tree_id"], []).append(p)
    for tree, st in zip(trees, stats, strict=True):
        out["kto"] += kto_rows(tree, cfg, st, by_tree.get(tree.tree_id, []))
    out["kto"] = dedupe(out["kto"], kto_key, label="label")
    for rows in sft.values():  # the problem's most visited distinct solutions over all its trees
        rows.sort(key=lambda r: -r["visits"])  # stable: ties keep tree order
        out["sft"] += dedupe(rows, lambda r: normalize_text(r["completion"]))[: cfg.sft_solutions]
    return out
