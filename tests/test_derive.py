"""Golden derivation from the hand-built tree in tests/_trees.py, acceptance rules one by one,
properties on random trees, and the audit metrics against brute-force references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import records
from rewards.audit import audit_dataset
from rewards.derive import (
    DeriveConfig,
    derive_all,
    kto_rows,
    node_stats,
    prefix_text,
    prm_rows,
    sft_rows,
    step_pairs,
    value_rows,
    wilson_interval,
    wilson_separation,
    z_of_confidence,
)
from rewards.metrics import auroc, ece
from tests._trees import GOLDEN_PROMPT, L, N, T, build_tree, golden_tree

P = GOLDEN_PROMPT
A, B, C = "3 + 2 = 5", "3 * 2 = 6", "5 - 3 = 2"


def test_node_stats_golden():
    s = node_stats(golden_tree())
    np.testing.assert_array_equal(s.visits, [20, 10, 8, 2, 8, 2, 5, 3, 2, 1, 4])
    np.testing.assert_allclose(s.success, [0.45, 0.8, 0.125, 0, 1, 0, 0.2, 0, 0, 1, 0])
    np.testing.assert_array_equal(s.verified_below, [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(s.num_verified_below, [2, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    # most visited correct terminal below: 4 (N=8) beats 9 (N=1) at the root
    np.testing.assert_array_equal(s.best_verified, [4, 4, 9, -1, 4, -1, 9, -1, -1, 9, -1])
    assert s.has_verifier


def test_golden_pairs():
    pairs = step_pairs(golden_tree(), DeriveConfig())
    # root: 1 vs 3 fails the 0.9 Wilson test, 2 vs 3 the margin; node 2: 6 vs 7 fails Wilson;
    # node 6: child 9 has N=1 < min_visits. Left: 1 vs 2 at the root and 4 vs 5 under node 1.
    assert [(p["parent_node"], p["chosen_node"], p["rejected_node"]) for p in pairs] == [(0, 1, 2), (1, 4, 5)]
    root, inner = pairs
    assert root["prompt"] == P
    assert root["chosen"] == f"{A}\n5 + 5 = 10. Answer: 10"
    assert root["rejected"] == f"{B}\n6 + 5 = 11\n11 + 0 = 11. Answer: 11"  # most visited path: 6 then 10
    assert root["margin"] == pytest.approx(0.675)
    assert (root["chosen_end"], root["rejected_end"], root["depth"]) == (4, 10, 1)
    assert (root["chosen_n"], root["rejected_n"], root["chosen_v"], root["rejected_v"]) == (10, 8, 10, 8)
    assert (root["chosen_verified"], root["chosen_outcome"], root["rejected_outcome"]) == (True, 1, 0)
    assert root["tree_id"] == "golden/0" and root["config_hash"] == DeriveConfig().hash()
    assert inner["prompt"] == P + A + "\n"
    assert (inner["chosen"], inner["rejected"]) == ("5 + 5 = 10. Answer: 10", "5 * 5 = 25. Answer: 25")
    assert inner["margin"] == 1.0
    # Wilson bounds of 8/8 and 0/2 meet where 8/(8+z^2) = z^2/(2+z^2), i.e. z = 2
    assert inner["separation_z"] == pytest.approx(2.0, abs=1e-9)
    assert inner["confidence"] == pytest.approx(math.erf(2 / math.sqrt(2)))
    assert inner["chosen_orm"] == pytest.approx(0.9) and inner["rejected_orm"] == pytest.approx(0.2)


def test_confidence_test_rejects_then_accepts():
    # 8/10 vs 0/2 separate between z = 1.2816 (80 %) and z = 1.6449 (90 %)
    z, level = wilson_separation(0.8, 10, 0.0, 2)
    assert z_of_confidence(0.8) < z < z_of_confidence(0.9)
    assert wilson_interval(0.8, 10, z)[0] == pytest.approx(wilson_interval(0.0, 2, z)[1], abs=1e-9)
    pairs = step_pairs(golden_tree(), DeriveConfig(confidence=0.8))
    assert [(p["chosen_node"], p["rejected_node"]) for p in pairs if p["parent_node"] == 0] == [
        (1, 3),
        (1, 2),
    ]
    assert pairs[0]["confidence"] == pytest.approx(level)


def test_min_margin_and_max_pairs_per_node():
    pairs = step_pairs(golden_tree(), DeriveConfig(confidence=0.0, min_margin=0.1))
    root = [(p["chosen_node"], p["rejected_node"]) for p in pairs if p["parent_node"] == 0]
    assert root == [(1, 3), (1, 2), (2, 3)]  # largest gap first; 2 vs 3 (gap .125) now passes
    strict = step_pairs(golden_tree(), DeriveConfig(confidence=0.0, min_margin=0.13))
    assert (2, 3) not in [(p["chosen_node"], p["rejected_node"]) for p in strict]
    one = step_pairs(golden_tree(), DeriveConfig(confidence=0.0, max_pairs_per_node=1))
    assert [(p["chosen_node"], p["rejected_node"]) for p in one if p["parent_node"] == 0] == [(1, 3)]


def test_min_visits():
    at6 = lambda cfg: [p for p in step_pairs(golden_tree(), cfg) if p["parent_node"] == 6]  # noqa: E731
    assert at6(DeriveConfig(confidence=0.0)) == []  # node 9 has N = 1
    (p,) = at6(DeriveConfig(confidence=0.0, min_visits=1))
    assert (p["chosen_node"], p["rejected_node"], p["margin"]) == (9, 10, 1.0)
    assert p["prompt"] == P + B + "\n6 + 5 = 11\n"


def test_verifier_gate():
    # "x" succeeds in 6 of 6 verified rollouts but no verified solution lies below it
    tree = build_tree([L("x", 6, 6), T("y = 3. Answer: 3", 6, 0)], prompt=P)
    assert step_pairs(tree, DeriveConfig()) == []  # gate on: the tree has a verifier
    (p,) = step_pairs(tree, DeriveConfig(verifier_gate=False))
    assert (p["chosen"], p["chosen_verified"], p["chosen_outcome"], p["margin"]) == ("x", False, -1, 1.0)


def test_critic_only_nodes_have_no_success_rate():
    tree = build_tree([L("x", 6, 0, verified=0), T("y = 10. Answer: 10", 6, 1)], prompt=P)
    s = node_stats(tree)
    assert np.isnan(s.success[1]) and s.visits[1] == 6 and s.verified_visits[1] == 0
    assert step_pairs(tree, DeriveConfig(confidence=0.0)) == []  # nothing to compare x with
    assert 1 not in [r["node"] for r in value_rows(tree, DeriveConfig())]
    assert 1 in [r["node"] for r in value_rows(tree, DeriveConfig(value_target="q"))]


def test_near_duplicates_dropped():
    tree = build_tree(
        [
            N("2 + 3 = 5", T("5 * 2 = 10", 6, 1)),
            N(" 2 +  3 = 5", T("5 * 2 = 10 ", 5, 1)),  # an un-merged whitespace variant
            T("2 * 3 = 6. Answer: 6", 6, 0),
        ],
        prompt=P,
    )
    pairs = step_pairs(tree, DeriveConfig())
    assert [(p["chosen_node"], p["rejected_node"]) for p in pairs] == [(1, 3)]
    both = derive_all([golden_tree(seed=0), golden_tree(seed=1)], DeriveConfig())
    assert len(both["pairs"]) == 2  # the second seed found the same pairs
    two = derive_all([golden_tree("a"), golden_tree("b")], DeriveConfig())
    assert len(two["pairs"]) == 4  # ...but another problem's pairs are its own


def test_golden_prm_rows():
    rows = prm_rows(golden_tree(), DeriveConfig())
    assert [r["end_node"] for r in rows] == [4, 10, 7, 5, 8, 9]  # most visited terminals first
    by_end = {r["end_node"]: r for r in rows}
    r = by_end[10]
    assert r["prompt"] == P
    assert r["completions"] == [B, "6 + 5 = 11", "11 + 0 = 11. Answer: 11"]
    assert r["labels"] == [True, True, False]  # a verified success (node 9) lies below 2 and 6
    assert r["soft_labels"] == pytest.approx([0.125, 0.2, 0.0])
    assert (r["nodes"], r["outcome"]) == ([2, 6, 10], 0)
    assert by_end[8]["labels"] == [False, False]
    assert by_end[4]["labels"] == [True, True] and by_end[4]["soft_labels"] == [0.8, 1.0]
    assert len(prm_rows(golden_tree(), DeriveConfig(max_trajectories_per_tree=2))) == 2
    assert [r["end_node"] for r in prm_rows(golden_tree(), DeriveConfig(trajectory_min_visits=4))] == [4, 10]


def test_golden_sft_and_values():
    (row,) = sft_rows(golden_tree(), DeriveConfig())
    assert (row["prompt"], row["completion"]) == (P, f"{A}\n5 + 5 = 10. Answer: 10")
    assert (row["end_node"], row["visits"], row["num_verified_terminals"]) == (4, 8, 2)
    unsolved = build_tree([T("1 + 1 = 2. Answer: 2", 3, 0)], prompt=P)
    assert sft_rows(unsolved, DeriveConfig()) == []
    # across seeds the most visited verified trajectory of the problem wins
    other = build_tree([N(C, T("2 * 5 = 10. Answer: 10", 12, 1))], prompt=P, problem_id="golden", seed=7)
    (best,) = derive_all([golden_tree(), other], DeriveConfig())["sft"]
    assert (best["tree_id"], best["completion"]) == ("golden/7", f"{C}\n2 * 5 = 10. Answer: 10")

    values = value_rows(golden_tree(), DeriveConfig())
    assert [r["node"] for r in values] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]  # node 9 has N = 1
    root = values[0]
    assert (root["prompt"], root["value"], root["visits"], root["depth"]) == (P, 0.45, 20, 0)
    v6 = next(r for r in values if r["node"] == 6)
    assert v6["prompt"] == prefix_text(golden_tree(), 6) == P + B + "\n6 + 5 = 11\n"
    assert (v6["value"], v6["verified_below"], v6["terminal"]) == (0.2, True, False)


def test_golden_kto_rows():
    rows = kto_rows(golden_tree(), DeriveConfig())
    got = [(r["prompt"], r["completion"], r["label"], r["source"]) for r in rows]
    assert got == [
        (P, f"{A}\n5 + 5 = 10. Answer: 10", True, "pair"),
        (P, f"{B}\n6 + 5 = 11\n11 + 0 = 11. Answer: 11", False, "pair"),
        (P + A + "\n", "5 + 5 = 10. Answer: 10", True, "pair"),
        (P + A + "\n", "5 * 5 = 25. Answer: 25", False, "pair"),
        # trajectories; 4's and 10's equal the root pair's sides and are kept once
        (P, f"{B}\n6 - 5 = 1. Answer: 1", False, "trajectory"),
        (P, f"{A}\n5 * 5 = 25. Answer: 25", False, "trajectory"),
        (P, f"{C}\n2 * 2 = 4. Answer: 4", False, "trajectory"),
        (P, f"{B}\n6 + 5 = 11\n11 - 1 = 10. Answer: 10", True, "trajectory"),
    ]


def test_every_kind_fits_its_schema_and_is_documented():
    out = derive_all([golden_tree(), golden_tree(seed=3)], DeriveConfig())
    assert set(out) == set(records.KINDS)
    docs = records.column_docs()
    for kind, rows in out.items():
        assert rows, kind
        assert records.to_table(kind, rows).num_rows == len(rows)
        missing = [c for c in records.SCHEMAS[kind].names if c not in docs[kind]]
        assert not missing, f"{kind} columns not in the records docstring: {missing}"
    with pytest.raises(ValueError, match="missing"):
        records.to_table("pairs", [{"prompt": "x"}])


@pytest.mark.parametrize(
    "kw", [{"min_visits": 0}, {"min_margin": 1.5}, {"confidence": 1.0}, {"value_target": "mean"}]
)
def test_config_errors_say_how_to_fix(kw):
    with pytest.raises(ValueError, match="use"):
        DeriveConfig(**kw)


def test_config_hash_is_stable_and_overridable():
    assert DeriveConfig().hash() == DeriveConfig().hash() != DeriveConfig(min_margin=0.3).hash()
    assert DeriveConfig(config_hash="job-abc").hash() == "job-abc"


# -- properties on random trees ----------------------------------------------------------------------
_steps = st.sampled_from(["a", "b", " a", "c = 1", "d"])


def _leaf():
    terminal = st.builds(T, _steps, st.integers(1, 12), st.sampled_from([0, 1]))
    rollout = st.builds(lambda s, n, k: L(s, n, min(k, n)), _steps, st.integers(1, 12), st.integers(0, 12))
    return terminal | rollout


_trees = st.recursive(
    _leaf(),
    lambda kids: st.builds(lambda s, ch: N(s, *ch), _steps, st.lists(kids, min_size=1, max_size=4)),
    max_leaves=14,
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(_trees, min_size=1, max_size=4),
    st.sampled_from([0.0, 0.5, 0.9]),
    st.sampled_from([0.0, 0.1, 0.3]),
    st.sampled_from([1, 2, 4]),
    st.sampled_from([None, False]),
)
def test_pairs_always_prefer_the_higher_success_rate(children, confidence, margin, min_visits, gate):
    tree = build_tree(children, prompt=P)
    cfg = DeriveConfig(confidence=confidence, min_margin=margin, min_visits=min_visits, verifier_gate=gate)
    s = node_stats(tree)
    assert s.visits[0] == s.visits[1:][tree.nodes["parent"][1:] == 0].sum()  # the builder's invariant
    for p in step_pairs(tree, cfg, s):
        assert p["chosen_success"] > p["rejected_success"]
        assert p["margin"] == pytest.approx(p["chosen_success"] - p["rejected_success"])
        assert p["margin"] >= margin - 1e-12 and p["confidence"] >= confidence
        assert min(p["chosen_n"], p["rejected_n"]) >= min_visits
        assert p["prompt"] == prefix_text(tree, p["parent_node"])
        for side in ("chosen", "rejected"):
            path = tree.path(p[f"{side}_end"])
            assert p[f"{side}_node"] in path
            assert p[side] == "\n".join(tree.steps[i] for i in path[path.index(p[f"{side}_node"]) :])
        if gate is None:
            assert p["chosen_verified"]
    for r in prm_rows(tree, cfg, s):
        assert len(r["completions"]) == len(r["labels"]) == len(r["soft_labels"])
        assert r["labels"][-1] == (r["outcome"] == 1)
        assert all(
            a or not b for a, b in itertools.pairwise(r["labels"])
        )  # success below a step is below its parent


# -- audit metrics ---------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.booleans()), min_size=2, max_size=30)
)
def test_auroc_matches_pairwise_count(data):
    s = np.array([d[0] for d in data])
    y = np.array([d[1] for d in data])
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(auroc(s, y))
        return
    ref = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auroc(s, y) == pytest.approx(ref)


def test_ece():
    assert ece([0.1, 0.9], [0, 1]) == pytest.approx(0.1)
    assert ece([0.5, 0.5], [0, 1]) == pytest.approx(0.0)  # one bin, mean 0.5 vs 0.5
    assert ece([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0]) == pytest.approx(0.5)


def test_audit_on_golden_trees():
    # the ORM loves node 5 (verified wrong); everything else keeps the builder's defaults
    fooled = build_tree(
        [
            N(
                A,
                T("5 + 5 = 10. Answer: 10", 8, 1),
                T("5 * 5 = 25. Answer: 25", 2, 0, critics=(0.1, 0.1, 0.99)),
            )
        ],
        prompt=P,
        problem_id="fooled",
    )
    trees = [golden_tree(), golden_tree(seed=1), fooled]
    pairs = derive_all(trees, DeriveConfig())["pairs"]
    seen = []

    def rerollout(prefixes: list[str], n: int) -> list[float]:
        seen.append((len(prefixes), n))
        return [0.9 if p.endswith((A + "\n", "10. Answer: 10\n")) else 0.2 for p in prefixes]

    a = audit_dataset(trees, pairs, rerollout=rerollout, sample_pairs=10, greedy_success=0.25, seed=0)
    assert seen == [(2 * len(pairs), 8)] and a["pairs_sampled"] == len(pairs) == 3
    assert a["pair_precision"] == 1.0
    low, high = a["pair_precision_ci95"]
    assert 0.4 < low < 0.5 and high == pytest.approx(1.0)  # 3 of 3: Wilson's 95 % interval is wide
    assert a["search_success"] == 1.0 and a["search_minus_greedy"] == pytest.approx(0.75)
    assert a["critic_favourite_rejected"]["orm"] == pytest.approx(1 / 3)
    assert a["critic_favourite_rejected"]["value"] == 0.0
    assert a["critics"]["value"]["terminal_auroc"] == 1.0
    assert a["critics"]["orm"]["terminal_auroc"] < 1.0
    assert a["distinct_verified_solutions_per_problem"]["histogram"] == {"1": 1, "2": 1}
    assert a["pairs_per_problem"]["histogram"] == {"1": 1, "2": 1}
    none = audit_dataset(trees, pairs, rerollout=None, sample_pairs=10, greedy_success=None, seed=0)
    assert none["pair_precision"] is None and none["search_minus_greedy"] is None


def test_rewards_layer_imports_no_model_or_cluster_code():
    import subprocess
    import sys

    code = (
        "import sys, rewards.derive, rewards.records, rewards.export, rewards.audit, rewards.metrics; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'numba') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
