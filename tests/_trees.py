"""Hand-built FinishedTree fixtures with statistics that can be worked out on paper.

A tree is written as nested specs; ids are given breadth-first (children of a node form one
contiguous block, as in the search's arena). Leaves carry their own visits and outcome; N, W and
the visit-weighted success sums of internal nodes are sums over children, so the invariant
N = own terminal visits + children's N holds by construction.

Evidence follows the search's rules: a terminal leaf visited 8 times is ONE trial (its revisits add
visits, not samples); a rollout leaf `L(step, visits, successes)` carries `visits` distinct verified
rollouts (`rollout_trials`), unless `verified` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcts.finished import NODE_FIELDS, FinishedTree

NAN = float("nan")


@dataclass
class Spec:
    step: str
    children: list[Spec] = field(default_factory=list)
    visits: int = 0  # own visits (leaves only)
    outcome: int = -1  # terminals: -1 unverified, 0 wrong, 1 correct
    terminal: bool = False
    successes: float | None = None  # own successes; default: visits if outcome == 1 else 0
    verified: int | None = None  # own verified visits; default: visits, except unverified terminals (0)
    value: float | None = None  # own mean backed-up value per visit; default: own success rate
    critics: tuple[float, float, float] | None = None  # (value, prm, orm) of the node's own evaluation
    eos: bool = False  # terminals: the policy ended the step with EOS (no separator after it)


def T(step: str, visits: int, outcome: int, **kw) -> Spec:
    """A terminal leaf."""
    return Spec(step, visits=visits, outcome=outcome, terminal=True, **kw)


def N(step: str, *children: Spec, **kw) -> Spec:
    """An internal node."""
    return Spec(step, children=list(children), **kw)


def L(step: str, visits: int, successes: float, verified: int | None = None, **kw) -> Spec:
    """A non-terminal leaf scored by verified rollouts (S from rollouts, no verified terminal below);
    verified=0 makes it critic-only (counts in N, not in V or S)."""
    return Spec(step, visits=visits, successes=successes, verified=verified, **kw)


def build_tree(
    children: list[Spec], prompt: str = "Q\n", problem_id: str = "p0", seed: int = 0, task: str = "countdown"
) -> FinishedTree:
    """FinishedTree from the root's children. Critic breakdown defaults: value = Q, prm = S/V,
    orm = 0.9 / 0.2 on verified correct / wrong terminals (NaN elsewhere); score = their nan-mean."""
    specs: list[Spec] = [Spec("", children=children)]
    parent, depth = [-1], [0]
    head = 0
    while head < len(specs):  # breadth-first numbering
        for ch in specs[head].children:
            specs.append(ch)
            parent.append(head)
            depth.append(depth[head] + 1)
        head += 1
    n = len(specs)
    visits = np.zeros(n)
    succ = np.zeros(n)
    wsum = np.zeros(n)
    ver = np.zeros(n)
    rollout_trials = np.zeros(n, np.int16)
    rollout_successes = np.zeros(n, np.int16)
    for i, s in enumerate(specs):
        if not s.children:
            visits[i] = s.visits
            succ[i] = s.successes if s.successes is not None else (s.visits if s.outcome == 1 else 0.0)
            wsum[i] = s.visits * (
                s.value if s.value is not None else (succ[i] / s.visits if s.visits else 0.0)
            )
            unverified_terminal = s.terminal and s.outcome == -1
            ver[i] = s.verified if s.verified is not None else (0 if unverified_terminal else s.visits)
            if not s.terminal:
                rollout_trials[i] = int(ver[i])
                rollout_successes[i] = int(round(succ[i])) if ver[i] else 0
    for i in range(n - 1, 0, -1):  # breadth-first ids: children always come after their parent
        visits[parent[i]] += visits[i]
        succ[parent[i]] += succ[i]
        wsum[parent[i]] += wsum[i]
        ver[parent[i]] += ver[i]
    crit = np.full((n, 3), NAN)
    for i, s in enumerate(specs):
        if s.critics is not None:
            crit[i] = s.critics
        elif visits[i] > 0:
            orm = {1: 0.9, 0: 0.2}.get(s.outcome, NAN) if s.terminal else NAN
            crit[i] = (wsum[i] / visits[i], succ[i] / ver[i] if ver[i] else NAN, orm)
    with np.errstate(all="ignore"):
        score = np.where(
            np.isnan(crit).all(axis=1), NAN, np.nanmean(np.where(np.isnan(crit), NAN, crit), axis=1)
        )
    nodes = {
        "parent": parent,
        "depth": depth,
        "visits": visits,
        "value_sum": wsum,
        "success_sum": succ,
        "verified_visits": ver,
        "prior": np.full(n, 1.0),
        "score": score,
        "terminal": [s.terminal for s in specs],
        "outcome": [s.outcome for s in specs],
        "value": crit[:, 0],
        "prm": crit[:, 1],
        "orm": crit[:, 2],
        "num_tokens": [len(s.step) for s in specs],
        "rollout_trials": rollout_trials,
        "rollout_successes": rollout_successes,
        "eos": [s.eos for s in specs],
    }
    assert set(nodes) == set(NODE_FIELDS)
    return FinishedTree(
        problem_id=problem_id,
        task=task,
        prompt=prompt,
        question=prompt.strip(),
        answer="10",
        nodes=nodes,
        steps=[s.step for s in specs],
        seed=seed,
        simulations=int(visits[0]),
        policy_tokens=sum(len(s.step) for s in specs),
        meta={"numbers": [2, 3, 5], "target": 10},
    )


GOLDEN_PROMPT = "Numbers: 2 3 5. Target: 10.\n"


def golden_tree(problem_id: str = "golden", seed: int = 0) -> FinishedTree:
    """The golden tree (ids breadth-first; N, S, S/N):

    0 root                                     N=20 S=9
    ├─ 1 "3 + 2 = 5"                            N=10 S=8  0.8
    │   ├─ 4 "5 + 5 = 10. Answer: 10"   T ok    N=8  S=8  1.0
    │   └─ 5 "5 * 5 = 25. Answer: 25"   T wrong N=2  S=0  0.0
    ├─ 2 "3 * 2 = 6"                            N=8  S=1  0.125
    │   ├─ 6 "6 + 5 = 11"                       N=5  S=1  0.2
    │   │   ├─ 9  "11 - 1 = 10. Answer: 10"  T ok    N=1 S=1
    │   │   └─ 10 "11 + 0 = 11. Answer: 11"  T wrong N=4 S=0
    │   └─ 7 "6 - 5 = 1. Answer: 1"     T wrong N=3  S=0  0.0
    └─ 3 "5 - 3 = 2"                            N=2  S=0  0.0
        └─ 8 "2 * 2 = 4. Answer: 4"     T wrong N=2  S=0
    """
    return build_tree(
        [
            N("3 + 2 = 5", T("5 + 5 = 10. Answer: 10", 8, 1), T("5 * 5 = 25. Answer: 25", 2, 0)),
            N(
                "3 * 2 = 6",
                N("6 + 5 = 11", T("11 - 1 = 10. Answer: 10", 1, 1), T("11 + 0 = 11. Answer: 11", 4, 0)),
                T("6 - 5 = 1. Answer: 1", 3, 0),
            ),
            N("5 - 3 = 2", T("2 * 2 = 4. Answer: 4", 2, 0)),
        ],
        prompt=GOLDEN_PROMPT,
        problem_id=problem_id,
        seed=seed,
    )


def rich_tree(problem_id: str = "rich", seed: int = 0):
    """Distinct samples enough for the gates (ids breadth-first; V trials, S successes):

    0 root                                      V=18 S=9
    ├─ 1 A                                      V=7  S=7  1.0
    │   ├─ 4 "5 + 5 = 10. Answer: 10"  T ok     N=3, one trial
    │   └─ 5 "5 - 2 = 3"               6 rollouts, all correct
    ├─ 2 B                                      V=7  S=0  0.0
    │   ├─ 6 "6 + 5 = 11. Answer: 11"  T wrong  N=2, one trial
    │   └─ 7 "6 - 2 = 4"               6 rollouts, all wrong
    └─ 3 C                             4 rollouts, 2 correct: no verified end below it
    """
    return build_tree(
        [
            N("3 + 2 = 5", T("5 + 5 = 10. Answer: 10", 3, 1), L("5 - 2 = 3", 6, 6)),
            N("3 * 2 = 6", T("6 + 5 = 11. Answer: 11", 2, 0), L("6 - 2 = 4", 6, 0)),
            L("5 - 3 = 2", 4, 2),
        ],
        prompt=GOLDEN_PROMPT,
        problem_id=problem_id,
        seed=seed,
    )
