"""The audit against hand-built trees: pair precision from the trees' nodes, the exported texts read
back under each tree's prompt and separator, the critics on unsteered trees, and its metrics
against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from critics.metrics import auroc, auroc_se, auroc_se_by_group, ece
from mcts.finished import FinishedTree
from mcts.tasks.base import content_key
from rewards.audit import audit_dataset
from rewards.derive import DeriveConfig, derive_all
from tests._trees import GOLDEN_PROMPT, N, T, build_tree, golden_tree, rich_tree

P = GOLDEN_PROMPT
A, B, C = "3 + 2 = 5", "3 * 2 = 6", "5 - 3 = 2"


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


def test_auroc_se_by_group_widens_for_clustered_positions():
    """Positions copied within a group carry no new evidence: resampling whole groups gives an
    interval as wide as the groups alone give, where Hanley-McNeil counts every copy."""
    rng = np.random.default_rng(1)
    base_y = rng.random(100) < 0.2
    base_s = rng.normal(0, 1, 100) + base_y
    alone = auroc_se_by_group(base_s, base_y, np.arange(100))
    g = np.repeat(np.arange(100), 7)
    s, y = base_s[g], base_y[g]
    grouped = auroc_se_by_group(s, y, g)
    assert grouped == pytest.approx(alone, rel=0.25), "copies add nothing"
    assert grouped > 2 * auroc_se(auroc(s, y), int(y.sum()), int((~y).sum())), "Hanley-McNeil counts copies"
    assert math.isnan(auroc_se_by_group(s, y, np.zeros(len(s)))), "one group: no spread to measure"
    assert auroc_se_by_group(s, y, g) == grouped, "seeded"


def test_ece():
    assert ece([0.1, 0.9], [0, 1]) == pytest.approx(0.1)
    assert ece([0.5, 0.5], [0, 1]) == pytest.approx(0.0)  # one bin, mean 0.5 vs 0.5
    assert ece([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0]) == pytest.approx(0.5)


def test_audit_on_golden_trees():
    golden, rich = golden_tree(), rich_tree()
    rich.meta = {"numbers": [1, 2, 3], "target": 6}  # another problem by content
    out = derive_all([golden, rich], DeriveConfig(confidence=0.0))
    pairs = out["pairs"]
    strata = [(p["chosen_terminal"], p["rejected_terminal"]) for p in pairs]
    assert len(pairs) == 5 and strata.count((False, False)) == 3 and strata.count((True, True)) == 1

    def verify(problem_id: str, steps: list[str]) -> bool:
        return bool(steps) and steps[-1].endswith("Answer: 10")

    # fresh-rollout rates by the node's last step; C looks better than A and B to the rollouts
    rate = {A: 0.9, B: 0.3, C: 0.95, "6 + 5 = 11": 0.5}
    asked = []

    def rerollout(items: list[tuple[str, list[str]]], n: int) -> list[float]:
        asked.append((len(items), n))
        return [rate[steps[-1]] for _, steps in items]

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
    a = audit_dataset(
        [golden, rich],
        pairs,
        kto=out["kto"],
        sft=out["sft"],
        rerollout=rerollout,
        verify=verify,
        sample_pairs=10,
        greedy={"golden": False, "rich": True},
        sample_seed=0,
        critic_trees=[fooled, golden_tree()],
        seen={"policy": {content_key(golden.question, golden.meta)}, "critics": set()},
    )
    # terminal sides are scored by their verdict: 3 both-non-terminal pairs x 2 + 1 one-terminal
    assert asked == [(7, 16)] and a["pairs_sampled"] == 5
    assert a["pair_precision"] == pytest.approx(3 / 5)  # (0,1,3) and (0,2,3) lose to C's 0.95
    by = a["pair_precision_by_stratum"]
    assert by["both_nonterminal"]["precision"] == pytest.approx(1 / 3) and by["both_nonterminal"]["n"] == 3
    assert by["both_terminal"]["precision"] == 1.0 and by["one_terminal"]["precision"] == 1.0
    assert by["depth_1"]["n"] == 3 and by["depth_2"]["n"] == 2
    assert set(a["labels"].values()) == {0}  # every exported text agrees with the verifier
    assert a["search_success"] == 1.0 and a["greedy_success"] == 0.5 and a["search_minus_greedy"] == 0.5
    assert a["seen_in_training"] == {"policy": 1, "critics": 0}
    assert a["unseen"] == {"problems": 1, "search_success": 1.0, "greedy_success": 1.0}
    assert a["orm_favourite_rejected"] == 0.5  # fooled's favourite is wrong, golden's is right
    assert 0 < a["critics"]["orm"]["auroc"] < 1 and a["critics"]["orm"]["n"] == 8
    assert a["critics"]["orm"]["auroc_se"] > 0
    assert a["critics"]["orm"]["auroc_se_trees"] > 0, "two trees: a bootstrap over them has a spread"
    assert "score" not in a["critics"]  # a terminal's score is its own verdict: nothing to audit
    # a negative the verifier accepts, a positive it refuses, duplicates and a contradiction are counted
    bad = {**pairs[0], "rejected": pairs[0]["chosen"]}
    flipped = {**pairs[1], "chosen": pairs[1]["rejected"], "rejected": pairs[1]["chosen"]}
    unreadable = {**pairs[0], "prompt": "another problem\n"}  # not the tree's prompt
    k = {**out["kto"][0], "label": not out["kto"][0]["label"]}
    labels = audit_dataset(
        [golden, rich], [*pairs, pairs[2], bad, flipped, unreadable], kto=[k], rerollout=None, verify=verify,
        sample_pairs=0, greedy=None, sample_seed=0,
    )["labels"]  # fmt: skip
    assert labels["rejected_accepted"] == 2 and labels["chosen_refused"] == 1
    assert labels["unchecked"] == 2  # both sides of the unreadable pair
    assert labels["duplicate_pairs"] == 1 and labels["contradictory_pairs"] == 1
    assert labels["undesirable_accepted"] + labels["desirable_refused"] == 1
    none = audit_dataset([golden], pairs, rerollout=None, sample_pairs=10, greedy=None, sample_seed=0)
    assert none["pair_precision"] is None and none["search_minus_greedy"] is None and none["critics"] is None


def test_texts_use_the_trees_own_separator_and_read_back_to_its_steps():
    """A task whose steps end with " ;" gets records whose every step ends with " ;", and the audit
    reads each exported text back into exactly the steps of the nodes it came from."""
    from rewards.records import completion_text, prefix_text, text_steps

    tree = golden_tree()
    tree.separator = " ;"
    back = FinishedTree.from_row(tree.to_row())
    assert back.separator == " ;" and back.tree_id == "golden/0"
    old = tree.to_row()
    del old["separator"]  # a tree written before the column existed
    assert FinishedTree.from_row(old).separator == "\n"
    out = derive_all([tree], DeriveConfig(confidence=0.0))
    assert out["pairs"] and out["sft"]
    for p in out["pairs"]:
        assert "\n" not in p["chosen"] + p["rejected"] and p["chosen"].endswith(" ;")
        for side in ("chosen", "rejected"):
            end = p[f"{side}_end"]
            assert text_steps(tree, p["prompt"], p[side]) == tree.path_steps(end)
            assert prefix_text(tree, end) == p["prompt"] + p[side]
    assert text_steps(tree, "another prompt\n", "8 ;") is None
    assert text_steps(tree, tree.prompt, "a ;ended by EOS") == ["a", "ended by EOS"]  # an `eos` step
    assert completion_text(tree, tree.path(1)) == tree.steps[1] + " ;"

    def verify(problem_id: str, steps: list[str]) -> bool:
        return steps[-1].endswith("Answer: 10")

    a = audit_dataset([tree], out["pairs"], kto=out["kto"], sft=out["sft"], rerollout=None, verify=verify,
                      sample_pairs=0, greedy=None, sample_seed=0)  # fmt: skip
    assert a["labels"]["unchecked"] == 0 and set(a["labels"].values()) == {0}
