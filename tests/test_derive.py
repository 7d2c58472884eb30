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
from rewards.derive import (
    DeriveConfig,
    derive_all,
    kto_rows,
    prm_rows,
    sft_rows,
    step_pairs,
    value_rows,
)
from rewards.records import dedupe, normalize_text, pair_key, prefix_text
from rewards.stats import node_stats, wilson_interval, wilson_separation, z_of_confidence
from tests._trees import GOLDEN_PROMPT, L, N, T, build_tree, golden_tree, rich_tree

P = GOLDEN_PROMPT
A, B, C = "3 + 2 = 5", "3 * 2 = 6", "5 - 3 = 2"


def test_node_stats_golden():
    s = node_stats(golden_tree())
    np.testing.assert_array_equal(s.visits, [20, 10, 8, 2, 8, 2, 5, 3, 2, 1, 4])
    # a revisited terminal is one trial: node 1's 10 visits rest on two samples (4 right, 5 wrong)
    np.testing.assert_array_equal(s.trials, [6, 2, 3, 1, 1, 1, 2, 1, 1, 1, 1])
    np.testing.assert_array_equal(s.successes, [2, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_allclose(s.success, [1 / 3, 0.5, 1 / 3, 0, 1, 0, 0.5, 0, 0, 1, 0])
    np.testing.assert_array_equal(s.verified_below, [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(s.num_verified_below, [2, 1, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    # most visited correct terminal below: 4 (N=8) beats 9 (N=1) at the root; wrong: 10 (N=4)
    np.testing.assert_array_equal(s.best_verified, [4, 4, 9, -1, 4, -1, 9, -1, -1, 9, -1])
    np.testing.assert_array_equal(s.best_wrong, [10, 5, 10, 8, -1, 5, 10, 7, 8, -1, 10])
    assert s.has_verifier


def test_revisits_do_not_pass_the_gate():
    # 8/8 visits of one correct terminal against 2/2 of one wrong one was a "certain" pair; it is
    # one sample against one: no 0.9 Wilson separation anywhere in the golden tree
    assert step_pairs(golden_tree(), DeriveConfig()) == []
    z, level = wilson_separation(1.0, 1, 0.0, 1)
    assert level < 0.9
    # without the confidence test the gaps still rank the same siblings
    pairs = step_pairs(golden_tree(), DeriveConfig(confidence=0.0))
    got = [(p["parent_node"], p["chosen_node"], p["rejected_node"]) for p in pairs]
    assert got == [(0, 1, 3), (0, 2, 3), (1, 4, 5), (2, 6, 7)]
    root = pairs[0]
    assert (root["chosen_v"], root["rejected_v"], root["chosen_n"], root["rejected_n"]) == (2, 1, 10, 2)
    assert (root["chosen_end"], root["rejected_end"]) == (4, 8)


def test_rich_pairs():
    (p,) = step_pairs(rich_tree(), DeriveConfig(confidence=0.95))
    assert (p["parent_node"], p["chosen_node"], p["rejected_node"]) == (0, 1, 2)
    assert p["prompt"] == P
    # each side continues to a verified end of its own kind, every step ended by the separator
    assert p["chosen"] == f"{A}\n5 + 5 = 10. Answer: 10\n"
    assert p["rejected"] == f"{B}\n6 + 5 = 11. Answer: 11\n"
    assert (p["chosen_outcome"], p["rejected_outcome"], p["chosen_verified"]) == (1, 0, True)
    assert (p["chosen_terminal"], p["rejected_terminal"]) == (False, False)
    assert (p["chosen_v"], p["rejected_v"], p["margin"]) == (7, 7, 1.0)
    # Wilson bounds of 7/7 and 0/7 meet where 7/(7+z^2) = z^2/(7+z^2), i.e. z = sqrt(7)
    assert p["separation_z"] == pytest.approx(math.sqrt(7), abs=1e-9)
    assert p["confidence"] == pytest.approx(math.erf(math.sqrt(7) / math.sqrt(2)))
    assert p["tree_id"] == "rich/0" and p["config_hash"] == DeriveConfig(confidence=0.95).hash()


def test_confidence_test_rejects_then_accepts():
    # 8/10 vs 0/2 separate between z = 1.2816 (80 %) and z = 1.6449 (90 %)
    z, level = wilson_separation(0.8, 10, 0.0, 2)
    assert z_of_confidence(0.8) < z < z_of_confidence(0.9)
    assert wilson_interval(0.8, 10, z)[0] == pytest.approx(wilson_interval(0.0, 2, z)[1], abs=1e-9)
    assert wilson_interval(0.0, 0, z) == (0.0, 1.0)  # no trials: nothing is known
    level = math.erf(math.sqrt(7) / math.sqrt(2))  # the rich root pair's level, 0.9918
    assert len(step_pairs(rich_tree(), DeriveConfig(confidence=level - 1e-6))) == 1
    assert step_pairs(rich_tree(), DeriveConfig(confidence=level + 1e-6)) == []


def _three():
    return build_tree(
        [
            N(A, T("5 + 5 = 10. Answer: 10", 2, 1), L("5 - 2 = 3", 5, 5)),  # 6/6
            N(
                B, T("6 + 4 = 10. Answer: 10", 2, 1), T("6 + 5 = 11. Answer: 11", 2, 0), L("6 - 2 = 4", 4, 2)
            ),  # 3/6
            N(C, T("2 * 2 = 4. Answer: 4", 2, 0), L("2 + 2 = 4", 5, 0)),  # 0/6
        ],
        prompt=P,
    )


def test_min_margin_and_max_pairs_per_node():
    pairs = step_pairs(_three(), DeriveConfig(confidence=0.0, min_margin=0.1))
    root = [(p["chosen_node"], p["rejected_node"]) for p in pairs if p["parent_node"] == 0]
    assert root == [(1, 3), (1, 2), (2, 3)]  # largest gap first
    strict = step_pairs(_three(), DeriveConfig(confidence=0.0, min_margin=0.6))
    assert [(p["chosen_node"], p["rejected_node"]) for p in strict if p["parent_node"] == 0] == [(1, 3)]
    one = step_pairs(_three(), DeriveConfig(confidence=0.0, max_pairs_per_node=1))
    assert [(p["chosen_node"], p["rejected_node"]) for p in one if p["parent_node"] == 0] == [(1, 3)]


def test_min_visits():
    at6 = lambda cfg: [p for p in step_pairs(golden_tree(), cfg) if p["parent_node"] == 6]  # noqa: E731
    assert at6(DeriveConfig(confidence=0.0)) == []  # node 9 has N = 1
    (p,) = at6(DeriveConfig(confidence=0.0, min_visits=1))
    assert (p["chosen_node"], p["rejected_node"], p["margin"]) == (9, 10, 1.0)
    assert p["prompt"] == P + B + "\n6 + 5 = 11\n"
    assert (p["chosen_terminal"], p["rejected_terminal"]) == (True, True)


def test_sides_need_verified_ends():
    # "x" succeeds in 6 of 6 verified rollouts but no verified solution lies below it: never chosen
    tree = build_tree([L("x", 6, 6), T("y = 3. Answer: 3", 6, 0)], prompt=P)
    assert step_pairs(tree, DeriveConfig(confidence=0.0)) == []
    # "z" fails all its rollouts but no verified-wrong end lies below it: never rejected
    tree = build_tree([T("y = 10. Answer: 10", 6, 1), L("z", 6, 0)], prompt=P)
    assert step_pairs(tree, DeriveConfig(confidence=0.0)) == []
    # the rejected side goes to a wrong end even where its most visited path ends correct
    tree = build_tree(
        [
            N(A, T("5 + 5 = 10. Answer: 10", 3, 1), L("5 - 2 = 3", 6, 6)),
            N(B, T("6 + 4 = 10. Answer: 10", 9, 1), T("6 + 5 = 11. Answer: 11", 1, 0), L("6 - 2 = 4", 6, 0)),
        ],
        prompt=P,
    )
    (p,) = step_pairs(tree, DeriveConfig(confidence=0.9))
    assert p["rejected"] == f"{B}\n6 + 5 = 11. Answer: 11\n" and p["rejected_outcome"] == 0


def test_critic_only_nodes_have_no_success_rate():
    tree = build_tree([L("x", 6, 0, verified=0), T("y = 10. Answer: 10", 6, 1)], prompt=P)
    s = node_stats(tree)
    assert np.isnan(s.success[1]) and s.visits[1] == 6 and s.trials[1] == 0
    assert step_pairs(tree, DeriveConfig(confidence=0.0)) == []  # nothing to compare x with
    assert 1 not in [r["node"] for r in value_rows(tree, DeriveConfig())]
    assert 1 in [r["node"] for r in value_rows(tree, DeriveConfig(value_target="q"))]


def test_near_duplicates_and_contradictions_dropped():
    tree = build_tree(
        [
            N("2 + 3 = 5", T("5 * 2 = 10", 6, 1)),
            N(" 2 +  3 = 5", T("5 * 2 = 10 ", 5, 1)),  # an un-merged whitespace variant
            T("2 * 3 = 6. Answer: 6", 6, 0),
        ],
        prompt=P,
    )
    pairs = step_pairs(tree, DeriveConfig(confidence=0.0))
    assert [(p["chosen_node"], p["rejected_node"]) for p in pairs] == [(1, 3)]
    cfg = DeriveConfig(confidence=0.0)
    one = len(step_pairs(golden_tree(), cfg))
    both = derive_all([golden_tree(seed=0), golden_tree(seed=1)], cfg)
    assert one > 0 and len(both["pairs"]) == one  # the second seed found the same pairs
    two = derive_all([golden_tree("a"), golden_tree("b")], cfg)
    assert len(two["pairs"]) == 2 * one  # ...but another problem's pairs are its own
    # A > B and B > A under one prompt (possible only where texts differ in whitespace, since both
    # ends are verified): every row of that key goes; an exact duplicate is kept once
    (p,) = step_pairs(rich_tree(), cfg)
    flipped = {**p, "chosen": p["rejected"] + " ", "rejected": p["chosen"]}
    assert dedupe([p, flipped], pair_key, label="chosen", normalize=normalize_text) == []
    assert dedupe([p, dict(p)], pair_key, label="chosen", normalize=normalize_text) == [p]


def test_golden_prm_rows():
    rows = prm_rows(golden_tree(), DeriveConfig())
    assert [r["end_node"] for r in rows] == [4, 10, 7, 5, 8, 9]  # most visited terminals first
    by_end = {r["end_node"]: r for r in rows}
    r = by_end[10]
    assert r["prompt"] == P
    assert r["completions"] == [B, "6 + 5 = 11", "11 + 0 = 11. Answer: 11"]
    assert r["labels"] == [True, True, False]  # a verified success (node 9) lies below 2 and 6
    assert r["soft_labels"] == pytest.approx([1 / 3, 0.5, 0.0])  # over trials, not visits
    assert (r["nodes"], r["outcome"]) == ([2, 6, 10], 0)
    assert by_end[8]["labels"] == [False, False]
    assert by_end[4]["labels"] == [True, True] and by_end[4]["soft_labels"] == [0.5, 1.0]
    assert len(prm_rows(golden_tree(), DeriveConfig(max_trajectories_per_tree=2))) == 2
    assert [r["end_node"] for r in prm_rows(golden_tree(), DeriveConfig(trajectory_min_visits=4))] == [4, 10]


def test_golden_sft_and_values():
    (row,) = sft_rows(golden_tree(), DeriveConfig())
    assert (row["prompt"], row["completion"]) == (P, f"{A}\n5 + 5 = 10. Answer: 10\n")
    assert (row["end_node"], row["visits"], row["num_verified_terminals"]) == (4, 8, 2)
    unsolved = build_tree([T("1 + 1 = 2. Answer: 2", 3, 0)], prompt=P)
    assert sft_rows(unsolved, DeriveConfig()) == []
    # across seeds the most visited verified trajectory of the problem wins
    other = build_tree([N(C, T("2 * 5 = 10. Answer: 10", 12, 1))], prompt=P, problem_id="golden", seed=7)
    (best,) = derive_all([golden_tree(), other], DeriveConfig())["sft"]
    assert (best["tree_id"], best["completion"]) == ("golden/7", f"{C}\n2 * 5 = 10. Answer: 10\n")
    # sft_solutions > 1: every distinct verified solution of the problem, most visited first, across
    # its trees; a solution found in two trees is kept once
    many = derive_all([golden_tree(), other, golden_tree(seed=3)], DeriveConfig(sft_solutions=8))["sft"]
    assert [(r["tree_id"], r["end_node"], r["visits"]) for r in many] == [
        ("golden/7", 2, 12),
        ("golden/0", 4, 8),
        ("golden/0", 9, 1),
    ]
    assert [len(derive_all([golden_tree()], DeriveConfig(sft_solutions=n))["sft"]) for n in (1, 2, 3)] == [
        1,
        2,
        2,
    ]

    values = value_rows(golden_tree(), DeriveConfig())
    assert [r["node"] for r in values] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]  # node 9 has N = 1
    root = values[0]
    assert (root["prompt"], root["value"], root["visits"], root["trials"], root["depth"]) == (
        P,
        1 / 3,
        20,
        6,
        0,
    )
    v6 = next(r for r in values if r["node"] == 6)
    assert v6["prompt"] == prefix_text(golden_tree(), 6) == P + B + "\n6 + 5 = 11\n"
    assert (v6["value"], v6["verified_below"], v6["terminal"]) == (0.5, True, False)


def test_golden_kto_rows():
    # the golden tree has no pair at 0.9: its KTO rows are its verified trajectories, most visited first
    rows = kto_rows(golden_tree(), DeriveConfig())
    got = [(r["prompt"], r["completion"], r["label"], r["source"]) for r in rows]
    assert got == [
        (P, f"{A}\n5 + 5 = 10. Answer: 10\n", True, "trajectory"),
        (P, f"{B}\n6 + 5 = 11\n11 + 0 = 11. Answer: 11\n", False, "trajectory"),
        (P, f"{B}\n6 - 5 = 1. Answer: 1\n", False, "trajectory"),
        (P, f"{A}\n5 * 5 = 25. Answer: 25\n", False, "trajectory"),
        (P, f"{C}\n2 * 2 = 4. Answer: 4\n", False, "trajectory"),
        (P, f"{B}\n6 + 5 = 11\n11 - 1 = 10. Answer: 10\n", True, "trajectory"),
    ]
    # the rich tree's pair gives the two pair rows; its trajectories repeat them and are kept once
    rows = kto_rows(rich_tree(), DeriveConfig(confidence=0.95))
    got = [(r["prompt"], r["completion"], r["label"], r["source"], r["success"]) for r in rows]
    assert got == [
        (P, f"{A}\n5 + 5 = 10. Answer: 10\n", True, "pair", 1.0),
        (P, f"{B}\n6 + 5 = 11. Answer: 11\n", False, "pair", 0.0),
    ]


def test_every_kind_fits_its_schema_and_is_documented():
    out = derive_all([golden_tree(), rich_tree()], DeriveConfig())
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
    assert DeriveConfig().for_job("job-abc").hash() == "job-abc"


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
)
def test_pairs_always_prefer_the_higher_success_rate(children, confidence, margin, min_visits):
    tree = build_tree(children, prompt=P)
    cfg = DeriveConfig(confidence=confidence, min_margin=margin, min_visits=min_visits)
    s = node_stats(tree)
    assert s.visits[0] == s.visits[1:][tree.nodes["parent"][1:] == 0].sum()  # the builder's invariant
    for p in step_pairs(tree, cfg, s):
        assert p["chosen_success"] > p["rejected_success"]
        assert p["margin"] == pytest.approx(p["chosen_success"] - p["rejected_success"])
        assert p["margin"] >= margin - 1e-12 and p["confidence"] >= confidence
        assert min(p["chosen_n"], p["rejected_n"]) >= min_visits
        assert p["prompt"] == prefix_text(tree, p["parent_node"])
        assert (p["chosen_v"], p["rejected_v"]) == (s.trials[p["chosen_node"]], s.trials[p["rejected_node"]])
        for side in ("chosen", "rejected"):
            path = tree.path(p[f"{side}_end"])
            assert p[f"{side}_node"] in path
            assert p[side] == "".join(tree.steps[i] + "\n" for i in path[path.index(p[f"{side}_node"]) :])
            assert tree.nodes["terminal"][p[f"{side}_end"]]
        assert (p["chosen_outcome"], p["rejected_outcome"]) == (1, 0) and p["chosen_verified"]
    # evidence: V at a node is its subtree's verified terminals (once each) plus its rollouts
    verdict = tree.nodes["terminal"] & (tree.nodes["outcome"] >= 0)
    for node in range(tree.num_nodes):
        below = [i for i in range(tree.num_nodes) if node == 0 or node in tree.path(i)]
        assert s.trials[node] == sum(int(verdict[i]) + int(tree.nodes["rollout_trials"][i]) for i in below)
    for r in prm_rows(tree, cfg, s):
        assert len(r["completions"]) == len(r["labels"]) == len(r["soft_labels"])
        assert r["labels"][-1] == (r["outcome"] == 1)
        assert all(
            a or not b for a, b in itertools.pairwise(r["labels"])
        )  # success below a step is below its parent


def test_rewards_layer_imports_no_model_or_cluster_code():
    import subprocess
    import sys

    code = (
        "import sys, rewards.derive, rewards.records, rewards.export, rewards.audit, critics.metrics; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'numba') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_step_label_counts_rollouts_below_it_as_math_shepherd_does():
    """Math-Shepherd's hard estimate: 1 if any completion from the step reaches the answer. A step
    whose own rollouts succeeded (S > 0, no correct terminal in the tree below it) is labelled True."""
    tree = build_tree([N("a", L("a1", 4, 3), T("a2", 2, 0)), T("b", 2, 0)])
    rows = {tuple(r["completions"]): r for r in prm_rows(tree, DeriveConfig())}
    assert rows[("a", "a2")]["labels"] == [True, False]
    assert rows[("b",)]["labels"] == [False]
    assert rows[("a", "a2")]["soft_labels"][0] == pytest.approx(3 / 5)  # a terminal is one trial


def test_an_empty_step_the_model_ended_gives_no_text_and_no_value_row_of_its_own():
    tree = build_tree([N("a", T("", 1, 0, eos=True), T("c", 1, 1)), T("b", 2, 0)])
    out = derive_all([tree], DeriveConfig(confidence=0.0, min_visits=1))
    prompts = [r["prompt"] for r in out["values"]]
    assert len(prompts) == len(set(prompts)), "the empty EOS step's prompt would repeat its parent's"
    assert not any("\n\n" in r["prompt"] + r["completion"] for r in out["kto"])
    assert any(r["completion"] == "a\n" for r in out["kto"])  # the policy wrote "a\n", then EOS
