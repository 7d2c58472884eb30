"""The search loop with a deterministic fake expander (no model), and once with a real tiny LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.base import Child, Expansion, Leaf, SearchConfig, problem_seed
from mcts.finished import FinishedTree
from mcts.search import run_search
from mcts.tasks.base import Problem, StepCheck

GOLDEN = Path(__file__).parent / "golden" / "search_visits.json"


class PathTask:
    """Three moves a/b/c per step; a solution is three steps long; only "b a c" is correct."""

    name = "path"
    step_separator = "\n"
    solution = ("b", "a", "c")

    def prompt(self, problem: Problem) -> str:
        return f"{problem.question}\n"

    def check(self, problem: Problem, steps: list[str]) -> StepCheck:
        if len(steps) < 3:
            return StepCheck(False, None)
        return StepCheck(True, tuple(steps[:3]) == self.solution)

    def normalize_step(self, step: str) -> str:
        return step.strip()


class FakeExpander:
    """Options a/b/c with fixed priors; a node's value is 0.8 on the solution path, 0.2 off it."""

    def __init__(self, task: PathTask):
        self.task = task
        self.calls: list[int] = []

    def __call__(self, leaves: list[Leaf], seed: int) -> list[Expansion]:
        self.calls.append(len(leaves))
        out = []
        for leaf in leaves:
            kids = []
            fresh = [(t, p) for t, p in (("a", 0.5), ("b", 0.3), ("c", 0.2)) if t not in leaf.existing]
            for text, prior in fresh[: leaf.num_options]:
                steps = [*leaf.steps, text]
                check = self.task.check(leaf.problem, steps)
                on_path = tuple(steps) == self.task.solution[: len(steps)]
                if check.terminal:
                    outcome = int(bool(check.success))
                    kids.append(Child(text, prior, float(outcome), float(outcome), True, True, outcome, 1))
                else:
                    kids.append(Child(text, prior, 0.8 if on_path else 0.2, num_tokens=1))
            out.append(Expansion(kids, tokens=len(kids)))
        return out


def _problems(n: int) -> list[Problem]:
    return [Problem(id=f"p{i}", question=f"q{i}", answer="bac") for i in range(n)]


def _search(**overrides) -> tuple[list[FinishedTree], FakeExpander]:
    task = PathTask()
    cfg = SearchConfig(
        **{
            "simulations": 30,
            "leaves_per_tree": 2,
            "num_options": 3,
            "max_nodes": 256,
            "adaptive_branching": False,
            **overrides,
        }
    )
    expander = FakeExpander(task)
    return run_search(_problems(3), task, expander, cfg, seed=1), expander


def test_search_finds_the_only_solution_and_prefers_it():
    trees, _ = _search()
    for tree in trees:
        solved = [i for i in range(tree.num_nodes) if tree.nodes["outcome"][i] == 1]
        assert len(solved) == 1 and tree.path_steps(solved[0]) == ["b", "a", "c"]
        root_kids = tree.children(0)
        best = root_kids[np.argmax(tree.nodes["visits"][root_kids])]
        assert tree.steps[best] == "b", f"visits per first step: {tree.nodes['visits'][root_kids]}"


def test_one_expander_call_per_round_serves_every_tree():
    trees, expander = _search(simulations=5)
    assert len(expander.calls) == 5
    assert expander.calls[0] == 3  # round 1: the three roots, in one call
    assert max(expander.calls) > 3  # later rounds: several leaves per tree, still one call


def test_tree_invariants_and_round_trip():
    trees, _ = _search()
    for tree in trees:
        n = tree.nodes
        for i in range(tree.num_nodes):
            kids = tree.children(i)
            if kids.size:
                # every visit ends at a node (its evaluation when it was created, a terminal's
                # revisit) or passes on to exactly one child: an internal node was evaluated once
                own = 0 if i == 0 else 1
                assert n["visits"][i] == own + n["visits"][kids].sum(), f"node {i}"
                assert n["depth"][kids].tolist() == [n["depth"][i] + 1] * kids.size
            assert 0 <= n["success_sum"][i] <= n["verified_visits"][i] <= n["visits"][i]
        again = FinishedTree.from_row(json.loads(json.dumps(tree.to_row())))
        assert again.steps == tree.steps
        for name, arr in tree.nodes.items():
            np.testing.assert_array_equal(again.nodes[name], arr, err_msg=name)


def test_golden_visit_counts():
    """The whole loop (kernels + search bookkeeping) against a stored expected tree."""
    trees, _ = _search()
    got = {t.problem_id: {"visits": t.nodes["visits"].tolist(), "steps": t.steps} for t in trees}
    if not GOLDEN.exists():  # first run writes it; it is committed and compared from then on
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1))
        pytest.fail(f"wrote {GOLDEN}: review and commit it")
    assert got == json.loads(GOLDEN.read_text())


def test_budgets_stop_trees():
    trees, _ = _search(max_tokens=10)
    assert all(10 <= t.policy_tokens < 10 + 2 * 3 for t in trees)
    trees, _ = _search(max_nodes=12, simulations=50)
    assert all(t.num_nodes <= 12 for t in trees)
    trees, _ = _search(converged_share=0.5, min_simulations=4, simulations=200)
    assert all(t.simulations < 200 for t in trees)


def test_a_fully_explored_tree_stops_by_itself():
    trees, _ = _search(simulations=500, leaves_per_tree=4)
    for t in trees:
        assert t.num_nodes == 1 + 3 + 9 + 27  # every path of the 3-ary, depth-3 tree
        assert t.simulations < 500


def test_widening_adds_children_where_values_disagree():
    task = PathTask()
    cfg = SearchConfig(
        simulations=20,
        leaves_per_tree=1,
        num_options=2,
        max_nodes=256,
        adaptive_branching=True,
        alpha=10.0,
        c_min=1,
        c_max=3,
    )
    tree = run_search(_problems(1), task, FakeExpander(task), cfg, seed=0)[0]
    root_kids = tree.children(0)
    assert len(root_kids) == 3, "the root's a/b values differ by 0.6: it must be widened to c"


def test_root_width_widens_the_root_only():
    task = PathTask()
    common = dict(simulations=12, leaves_per_tree=1, num_options=1, max_nodes=256, adaptive_branching=True)
    # alpha 0: the importance rule alone keeps every node at c_min = 1 child
    narrow = run_search(
        _problems(1),
        task,
        FakeExpander(task),
        SearchConfig(**common, alpha=0.0, c_min=1, c_max=1, root_width=0),
    )
    wide = run_search(
        _problems(1),
        task,
        FakeExpander(task),
        SearchConfig(**common, alpha=0.0, c_min=1, c_max=1, root_width=3),
    )
    assert len(narrow[0].children(0)) == 1
    assert [wide[0].steps[c] for c in wide[0].children(0)] == ["a", "b", "c"]  # widened one option at a time
    below = [c for c in range(1, wide[0].num_nodes) if wide[0].children(c).size]
    assert below and all(len(wide[0].children(c)) == 1 for c in below), "only the root is wider"
    with pytest.raises(ValueError, match="root_width"):
        SearchConfig(root_width=-1)


def test_problem_seed_depends_on_the_problem_only():
    assert problem_seed(3, "p1") == problem_seed(3, "p1") != problem_seed(3, "p2")
    assert problem_seed(3, "p1") != problem_seed(4, "p1")


class SeededExpander(FakeExpander):
    """Like FakeExpander, but the priors are drawn from the leaf's seed (one int for the call, or
    one per leaf): trees depend on the seeds a batch's rounds get."""

    def __call__(self, leaves: list[Leaf], seed) -> list[Expansion]:
        seeds = seed if isinstance(seed, list) else [seed] * len(leaves)
        out = super().__call__(leaves, seed)
        draws: dict[int, np.random.Generator] = {}
        for leaf_seed, expansion in zip(seeds, out, strict=True):
            rng = draws.setdefault(leaf_seed, np.random.default_rng(leaf_seed))
            for child in expansion.children:
                child.prior = float(rng.random())
        return out


def _same_trees(a: list[FinishedTree], b: list[FinishedTree]) -> bool:
    return len(a) == len(b) and all(
        x.steps == y.steps
        and x.nodes.keys() == y.nodes.keys()
        and all(np.array_equal(x.nodes[k], y.nodes[k], equal_nan=True) for k in x.nodes)
        for x, y in zip(a, b, strict=True)
    )


def test_batches_side_by_side_grow_the_trees_they_grow_alone():
    """`search_stream`: batches searched two at a time (a new one joining as one finishes, rounds
    sharing one expander call) grow exactly the trees each grows alone, in fewer calls."""
    from mcts.search import search_stream

    task = PathTask()
    cfg = SearchConfig(
        simulations=12, leaves_per_tree=2, num_options=2, max_nodes=128, adaptive_branching=False
    )
    batches = [(f"b{i}", _problems(3 + i)[i:]) for i in range(4)]  # 3 trees each, different problems
    lone = SeededExpander(task)
    alone = {key: run_search(problems, task, lone, cfg, seed=3) for key, problems in batches}
    together = SeededExpander(task)
    side = list(search_stream(batches, task, together, cfg, seed=3, side_by_side=2))
    assert sorted(key for key, _ in side) == sorted(alone)
    for key, trees in side:
        assert _same_trees(trees, alone[key]), key
    assert len(together.calls) < len(lone.calls)
    assert not _same_trees(alone["b0"], run_search(batches[0][1], task, SeededExpander(task), cfg, seed=4))


@pytest.mark.slow
def test_end_to_end_search_on_a_tiny_model(tmp_path):
    from _tiny_models import save_tiny_llama

    from mcts.expander import ExpandConfig, PolicyExpander
    from mcts.policy import Policy, PolicyConfig
    from mcts.tasks.countdown import CountdownTask, generate_problems

    policy = Policy.load(
        PolicyConfig(path=str(save_tiny_llama(tmp_path / "m")), max_step_tokens=10, max_rollout_tokens=30)
    )
    task = CountdownTask()
    expander = PolicyExpander(policy, task, ExpandConfig(rollouts=1))
    calls_before = policy.generate_calls
    cfg = SearchConfig(simulations=3, leaves_per_tree=2, num_options=3, max_nodes=128)
    trees = run_search(generate_problems(3, seed=5), task, expander, cfg, seed=0)
    # propose + rollout per round, for all three trees together
    assert policy.generate_calls - calls_before <= 2 * 3
    for tree in trees:
        assert tree.num_nodes > 1 and tree.policy_tokens > 0
        assert tree.nodes["visits"][0] == tree.nodes["visits"][tree.children(0)].sum()  # root: no own
        for i in range(1, tree.num_nodes):
            if tree.nodes["terminal"][i]:
                verdict = task.check(_as_problem(tree), tree.path_steps(i))
                assert tree.nodes["outcome"][i] == int(bool(verdict.success))


def _as_problem(tree: FinishedTree) -> Problem:
    return Problem(id=tree.problem_id, question=tree.question, answer=tree.answer, meta=tree.meta)


class GraftingExpander(FakeExpander):
    """Like FakeExpander, but its 'rollout' from the first step "b" solves the problem."""

    def __call__(self, leaves: list[Leaf], seed: int) -> list[Expansion]:
        out = super().__call__(leaves, seed)
        for leaf, expansion in zip(leaves, out, strict=True):
            for child in expansion.children:
                if not leaf.steps and child.text == "b":
                    child.graft, child.graft_outcome = ("a", "c"), 1
                elif not leaf.steps and child.text == "a":
                    child.graft, child.graft_outcome = ("a", "a"), 0
        return out


def test_a_solved_rollout_is_grafted_as_an_unvisited_verified_path():
    task = PathTask()
    cfg = SearchConfig(
        simulations=1,
        leaves_per_tree=1,
        num_options=3,
        max_nodes=64,
        adaptive_branching=True,
        c_min=2,
        c_max=3,
    )
    tree = run_search(_problems(1), task, GraftingExpander(task), cfg, seed=0)[0]
    solved = [i for i in range(tree.num_nodes) if tree.nodes["outcome"][i] == 1]
    assert len(solved) == 1 and tree.path_steps(solved[0]) == ["b", "a", "c"]
    chain = tree.path(solved[0])[1:]  # the grafted "a" and "c"
    assert tree.nodes["visits"][chain].tolist() == [0, 0], "grafts add no visits"
    assert tree.nodes["visits"][0] == 3  # one evaluation per first step, nothing from the graft
    failed = [i for i in range(tree.num_nodes) if tree.path_steps(i) == ["a", "a", "a"]]
    assert len(failed) == 1 and tree.nodes["terminal"][failed[0]] and tree.nodes["outcome"][failed[0]] == 0
    solved_only = run_search(
        _problems(1),
        task,
        GraftingExpander(task),
        SearchConfig(**{**cfg.__dict__, "keep_rollouts": "solved"}),
        seed=0,
    )[0]
    assert solved_only.num_nodes == tree.num_nodes - 2
    # the search goes on from there: the grafted terminal is reachable (a revisit adds N, not evidence)
    tree = run_search(
        _problems(1),
        task,
        GraftingExpander(task),
        SearchConfig(simulations=12, leaves_per_tree=1, num_options=3, max_nodes=128, c_min=2, c_max=3),
        seed=0,
    )[0]
    for i in range(tree.num_nodes):
        kids = tree.children(i)
        if kids.size:
            assert tree.nodes["visits"][i] >= tree.nodes["visits"][kids].sum()


class SamplingExpander(FakeExpander):
    """Random valued options, some terminal, and `rollouts` random rollouts per new non-terminal node
    (the first one handed back for grafting). Every verified sample it makes is recorded once, as
    (problem id, the option it came from, its full path, verdict): what the tree's evidence must add
    up to, over the options the search kept (widening keeps the best few by prior)."""

    def __init__(self, task: PathTask, rollouts: int, seed: int):
        super().__init__(task)
        self.rollouts, self.rng = rollouts, np.random.default_rng(seed)
        self.samples: list[tuple[str, tuple[str, ...], tuple[str, ...], int]] = []

    def __call__(self, leaves: list[Leaf], seed: int) -> list[Expansion]:
        out = super().__call__(leaves, seed)
        for leaf, expansion in zip(leaves, out, strict=True):
            for child in expansion.children:
                path = (*leaf.steps, child.text)
                if child.terminal:
                    self.samples.append((leaf.problem.id, path, path, child.outcome))
                    continue
                for r in range(self.rollouts):
                    steps = tuple(self.rng.choice(["a", "b", "c"], size=3 - len(path)).tolist())
                    if self.rng.random() < 0.2:  # cut short before any verdict: no sample
                        steps = steps[:-1]
                    check = self.task.check(leaf.problem, [*path, *steps])
                    verdict = int(bool(check.success)) if check.terminal else -1
                    if verdict >= 0:
                        self.samples.append((leaf.problem.id, path, path + steps, verdict))
                        child.rollout_trials += 1
                        child.rollout_successes += verdict
                    if r == 0 and steps:
                        child.graft, child.graft_outcome = steps, verdict
        return out


@settings(max_examples=25, deadline=None)
@given(
    keep=st.sampled_from(["all", "solved", "none"]),
    seed=st.integers(0, 10_000),
    rollouts=st.integers(0, 3),
    leaves=st.integers(1, 3),
    max_nodes=st.sampled_from([24, 64, 256]),
    root_width=st.sampled_from([0, 12]),
)
def test_evidence_counts_each_verified_sample_once(keep, seed, rollouts, leaves, max_nodes, root_width):
    # a wide root next to a small node budget once overran it: several expansions of one round each
    # checked their room against the nodes already written, not against each other's
    _check_evidence(keep, seed, rollouts, leaves, max_nodes, root_width)


def _check_evidence(
    keep: str, seed: int, rollouts: int, leaves: int, max_nodes: int, root_width: int = 0
) -> int:
    """V at a node never exceeds the distinct verified samples below it (S: the correct ones), and the
    root holds them all, however often terminals are revisited, whether rollouts are grafted, kept
    apart or cut by the node budget, and whether the width keeps every option offered."""
    task = PathTask()
    expander = SamplingExpander(task, rollouts, seed)
    cfg = SearchConfig(
        simulations=100, leaves_per_tree=leaves, num_options=2, max_nodes=max_nodes, c_min=1, c_max=3,
        keep_rollouts=keep, root_width=root_width,
    )  # fmt: skip
    trees = run_search(_problems(2), task, expander, cfg, seed=seed)
    revisits = 0
    for tree in trees:
        successes, trials = tree.evidence()
        kept = {tuple(tree.path_steps(i)) for i in range(tree.num_nodes)}
        made = [(origin, path, v) for pid, origin, path, v in expander.samples if pid == tree.problem_id]
        assert trials[0] <= len(made)  # never more evidence than samples were drawn
        # every sample was drawn below a node of the tree (an option the width left out, or a rollout
        # from it, counts at the node it was offered to)
        assert all(origin[:-1] in kept for origin, _, _ in made)
        mine = [(path, v) for _, path, v in made]
        for node in range(tree.num_nodes):
            prefix = tuple(tree.path_steps(node))
            below = [v for path, v in mine if path[: len(prefix)] == prefix]
            assert trials[node] <= len(below), f"node {node} {prefix}: V={trials[node]}, samples {len(below)}"
            assert successes[node] <= sum(below)
            if tree.nodes["terminal"][node] and tree.nodes["outcome"][node] >= 0:
                revisits += max(int(tree.nodes["visits"][node]) - 1, 0)
        # nothing lost: every sample is evidence somewhere (an ungrafted rollout at its option, a
        # grafted one at its terminal, a dropped option's at the node it was offered to)
        assert trials[0] == len(mine) and successes[0] == sum(v for _, v in mine)
    return revisits


def test_the_evidence_workload_revisits_terminals():
    """Several leaves a round reach terminals again while others grow: the property above is tested
    on trees whose visits overstate their samples."""
    assert _check_evidence(keep="all", seed=1, rollouts=2, leaves=3, max_nodes=256) > 0


class EndingProposer:
    """A scripted `Proposer` on PathTask: option "b", and an option the model ends at once (EOS, no
    text). From every new node three rollouts: one that solves the problem from "b" and ends with EOS
    right after its last step ("a\\nc": no separator written after "c"; the one grafted), one the
    model ends at once with no answer, and one cut off at the token cap."""

    def propose(self, prompts, num_options, seed, stop="\n"):
        from mcts.merge import Option

        return [[Option("b", -0.5, 2, ended=False), Option("", -1.0, 1, ended=True)][:k] for k in num_options]

    def rollout(self, prompts, seed, max_new_tokens=None, sep="\n"):
        from mcts.policy import Rollout

        scripted = [
            Rollout(text="a\nc", num_tokens=4, steps=["a", "c"], ended=True),  # EOS right after "c"
            Rollout(text="", num_tokens=1, steps=[], ended=True),  # EOS, no answer
            Rollout(text="a", num_tokens=8, steps=["a"], ended=False),  # the token cap
        ]
        return [scripted[i % 3] for i in range(len(prompts))]


def test_what_the_model_ends_is_a_wrong_sample_and_its_text_carries_no_separator():
    """EOS without an answer is a verified wrong sample, from an option (a terminal) or a rollout (a
    trial of its node); a rollout cut at its token cap is not a sample. A step the model ended with
    EOS is exported as written: no separator after it (TRL appends the EOS), so an empty one adds no
    text at all."""
    from mcts.expander import ExpandConfig, PolicyExpander
    from rewards.derive import DeriveConfig, derive_all

    task = PathTask()
    expander = PolicyExpander(EndingProposer(), task, ExpandConfig(rollouts=3))
    problem = Problem(id="p", question="go", answer="")
    cfg = SearchConfig(simulations=1, num_options=2, leaves_per_tree=1)
    (tree,) = run_search([problem], task, expander, cfg, seed=0)
    kids = {tree.steps[int(c)]: int(c) for c in tree.children(0)}
    b, empty = kids["b"], kids[""]
    assert tree.nodes["terminal"][empty] and tree.nodes["outcome"][empty] == 0 and tree.nodes["eos"][empty]
    assert tree.path_steps(int(np.flatnonzero(tree.nodes["eos"] & tree.nodes["terminal"])[-1])) == [
        "b",
        "a",
        "c",
    ]
    assert not tree.nodes["eos"][b]
    # below b: the grafted "a c" (a success), the rollout ended at once (a wrong trial), the cap (none)
    successes, trials = tree.evidence()
    assert (int(successes[b]), int(trials[b])) == (1, 2)
    pairs = derive_all([tree], DeriveConfig(confidence=0.0, min_visits=1))["pairs"]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("go\n", "b\na\nc", "")]


def test_the_orm_reads_a_rollout_as_a_tree_holds_it():
    """Cut at its verdict (the ORM never trains past a terminal), and the policy's EOS right after a
    separator kept as the empty last step a tree gives it (the ORM's training rows have it)."""
    from mcts.expander import _as_tree_path
    from mcts.policy import Rollout

    task, problem = PathTask(), Problem(id="p", question="go", answer="")

    def path(text: str, ended: bool) -> list[str]:
        steps = text.split("\n")
        steps = steps[:-1] if steps[-1] == "" else steps
        return _as_tree_path(task, problem, ["b"], Rollout(text=text, num_tokens=1, steps=steps, ended=ended))

    assert path("a\nc\nx\n", ended=True) == ["b", "a", "c"]  # the verdict at "c"; "x" is past it
    assert path("a\nc", ended=True) == ["b", "a", "c"]
    assert path("a\n", ended=True) == ["b", "a", ""]  # "a\n</s>": EOS after the separator
    assert path("", ended=True) == ["b", ""]  # EOS at once
    assert path("a\n", ended=False) == ["b", "a"]  # cut at the token cap: no EOS written


class _LongGraft(FakeExpander):
    """Options a/b/c, none terminal; every new node hands back an unfinished 4-step rollout."""

    def __call__(self, leaves, seed):
        out = []
        for leaf in leaves:
            fresh = [(t, p) for t, p in (("a", 0.5), ("b", 0.3), ("c", 0.2)) if t not in leaf.existing]
            kids = [
                Child(t, p, 0.5, num_tokens=1, graft=("g1", "g2", "g3", "g4"), graft_outcome=-1)
                for t, p in fresh[: leaf.num_options]
            ]
            out.append(Expansion(kids, tokens=len(kids)))
        return out


def test_no_node_lies_below_max_depth_grafted_or_widened():
    """A rollout grafted near max_depth is cut there, and a grafted node at max_depth is never
    widened with sampled options (both had grown trees to depth 10 under max_depth=2)."""
    cfg = SearchConfig(
        simulations=60, leaves_per_tree=2, num_options=3, max_nodes=512, max_depth=2, c_min=2, c_max=3,
        root_width=0, keep_rollouts="all",
    )  # fmt: skip
    (tree,) = run_search(_problems(1), PathTask(), _LongGraft(PathTask()), cfg, seed=0)
    assert tree.nodes["depth"].max() == cfg.max_depth
    assert any(s.startswith("g") for s in tree.steps), "no graft was kept: the cut proved nothing"


def test_room_is_counted_as_taken_and_a_root_that_cannot_fit_is_refused():
    """An expansion takes c_max ids (adaptive): with num_options above c_max the tree grew until its
    ids ran out, not stopping with 5 of 10 used; a root_width no max_nodes can hold is one line."""
    cfg = SearchConfig(
        simulations=50, leaves_per_tree=1, num_options=6, max_nodes=10, c_min=2, c_max=2, root_width=0,
        keep_rollouts="none", alpha=0.0,
    )  # fmt: skip
    (tree,) = run_search(_problems(1), PathTask(), FakeExpander(PathTask()), cfg)
    assert tree.num_nodes >= cfg.max_nodes - cfg.c_max  # not one more expansion of 2 ids would fit
    with pytest.raises(ValueError, match="no room for the root's 12 children"):
        SearchConfig(max_nodes=12, root_width=12)


def test_a_dead_end_is_worth_0_on_every_visit():
    """An expansion with no option is an unverified dead end: its revisits back up 0, not the
    score it was created with (its Q had climbed 0.45 -> 0.77 over revisits)."""

    class DeadEndA:
        def __call__(self, leaves, seed):
            out = []
            for leaf in leaves:
                if not leaf.steps:
                    kids = [Child("a", 0.5, 0.9, num_tokens=1), Child("b", 0.5, 0.1, num_tokens=1)]
                else:
                    kids = [] if leaf.steps[0] == "a" else [Child("b", 1.0, 0.1, num_tokens=1)]
                out.append(Expansion(kids, tokens=1))
            return out

    cfg = SearchConfig(
        simulations=8, leaves_per_tree=1, num_options=2, max_nodes=64, max_depth=50, adaptive_branching=False
    )
    (tree,) = run_search(_problems(1), PathTask(), DeadEndA(), cfg)
    a = next(int(c) for c in tree.children(0) if tree.steps[int(c)] == "a")
    assert tree.nodes["terminal"][a] and tree.nodes["visits"][a] >= 3
    assert tree.nodes["value_sum"][a] == pytest.approx(0.9)  # its creation's 0.9, then 0 each revisit
