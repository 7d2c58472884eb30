"""Rows labelled by the Countdown solver (`mcts.tasks.countdown_states`, `rewards.solver_rows`) and
how the critics train on them (`critics.train`): right labels, nothing of a held-out or
validation problem, the search's own rates as targets, probabilities calibrated on the search's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_models import save_tiny_llama

from critics.labels import Labels
from critics.train import TrainCriticsConfig, _search_rows, _targets, train_critics, train_one
from mcts.tasks.base import content_key
from mcts.tasks.countdown import CountdownTask, generate_problems, make_problem, solve
from mcts.tasks.countdown_states import pool_after, reachable, solver_paths, solver_states
from rewards.solver_rows import SolverRowsConfig, search_rates, with_solver_rows

TASK = CountdownTask()


def _reachable_by_search(numbers: list[int], target: int) -> bool:
    """Brute force, independent of the solver: some sequence of legal steps makes `target`."""
    if target in numbers:
        return True
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            if i == j:
                continue
            a, b = numbers[i], numbers[j]
            rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
            for c in (a + b, a * b, a - b if a >= b else None, a // b if b and a % b == 0 else None):
                if c is not None and _reachable_by_search(rest + [c], target):
                    return True
    return False


def test_pool_after_follows_the_rules():
    assert sorted(pool_after([3, 7, 9], ["7*3=21"])) == [9, 21]
    assert pool_after([3, 7, 9], ["7*3=20"]) is None  # a wrong result
    assert pool_after([3, 7, 9], ["7*3=21", "21+3=24"]) is None  # 3 used twice
    assert pool_after([3, 3, 9], ["3+3=6"]) == [9, 6]  # two 3s: both may be used
    assert pool_after([3, 7, 9], ["7*3"]) is None  # unparsable


def test_the_paths_labels_are_the_rules_and_the_solver():
    paths = solver_paths(300, seed=5)
    assert len(paths) == 300
    broken = 0
    for r in paths:
        p, steps = r.problem, list(r.steps)
        assert r.reachable[-1] == TASK.verify(p, steps)  # a finished path: the verifier's verdict
        assert TASK.check(p, steps).terminal  # every path is played to its end
        for k in range(len(steps)):
            pool = pool_after(p.meta["numbers"], steps[: k + 1])
            expect = pool is not None and _reachable_by_search(pool, p.meta["target"])
            assert r.reachable[k] == expect, (p.question, steps[: k + 1])
        broken += pool_after(p.meta["numbers"], steps) is None
    assert 0.1 < broken / len(paths) < 0.6  # p_error breaks some paths, not most
    assert not any(
        pool_after(r.problem.meta["numbers"], list(r.steps)) is None
        for r in solver_paths(200, 5, p_error=0.0)
    )


def test_the_states_have_the_shape_of_value_rows_and_leave_out_what_is_excluded():
    held = {content_key(p.question, p.meta) for p in generate_problems(400, seed=9)[::2]}
    states = solver_states(400, seed=9, exclude=held)
    assert states and all(content_key(r.problem.question, r.problem.meta) not in held for r in states)
    for r in states:
        pool = pool_after(r.problem.meta["numbers"], list(r.steps))
        assert pool is not None and len(pool) >= 2 and r.problem.meta["target"] not in pool
        assert 1 <= len(r.steps) <= 2
        assert r.reachable[-1] == (solve(pool, r.problem.meta["target"]) is not None)
    assert 0.2 < np.mean([r.reachable[-1] for r in states]) < 0.8
    assert states == solver_states(400, seed=9, exclude=held)  # seeded


def _search_labels() -> tuple[dict[str, Labels], dict]:
    """Search-like rows of two problems. 3 7 9 -> 30 is reachable after 7*3=21 (21+9) and not after
    9+7=16; 2 5 8 -> 80 after 8*5=40 (40*2) and not after 8+5=13."""
    p1, p2 = make_problem("a", [3, 7, 9], 30), make_problem("b", [2, 5, 8], 80)
    problems = {p.id: p for p in (p1, p2)}
    labels = {k: Labels(k) for k in ("value", "prm", "orm")}

    def add(kind, p, steps, soft, hard):
        labels[kind].problem_ids.append(p.id)
        labels[kind].keys.append(content_key(p.question, p.meta))
        labels[kind].prompts.append(TASK.prompt(p))
        labels[kind].steps.append(steps)
        labels[kind].soft.append(soft)
        labels[kind].hard.append(hard)
        labels[kind].nodes.append([(p.id, k) for k in range(len(hard))])

    for p, steps, soft in [
        (p1, ["7*3=21"], 0.5),
        (p1, ["9+7=16"], 0.1),  # not reachable (a label no search would give): left out of the rate
        (p2, ["8*5=40"], 0.0),
        (p2, ["8+5=13"], 0.0),
    ]:
        add("value", p, steps, [soft], [soft > 0])
    for p, steps, hard in [
        (p1, ["7*3=21", "21+9=30"], [True, True]),  # reachable, then the target: left out of the rate
        (p1, ["7*3=21", "21-9=12"], [False, False]),  # reachable, then a dead end
        (p2, ["8+5=13", "13*2=26"], [False, False]),  # never reachable
        (p2, ["8*5=40", "40+2=42"], [True, False]),
    ]:
        add("prm", p, steps, [float(h) for h in hard], hard)
    return labels, problems


def test_the_rates_are_the_searchs_own_on_reachable_states():
    labels, problems = _search_labels()
    for p, steps, expect in [("a", ["7*3=21"], True), ("a", ["9+7=16"], False), ("b", ["8*5=40"], True),
                             ("b", ["8+5=13"], False), ("a", ["7*3=21", "21+9=30"], True)]:  # fmt: skip
        assert reachable(problems[p], steps) == expect
    rates = search_rates(labels, problems)
    assert rates["value"] == pytest.approx(0.5)  # 7*3=21 solved, 8*5=40 not: unreachable states left out
    assert rates["prm"] == pytest.approx(2 / 3)  # 7*3=21 (True, False), 8*5=40 (True)


def test_solver_rows_take_the_rates_and_the_verdicts():
    labels, problems = _search_labels()
    labels["orm"] = labels["value"].subset(range(0))
    out, rates = with_solver_rows(
        labels, problems, SolverRowsConfig(states=60, paths=60), seed=0, difficulty=None,
        exclude=(), val_fraction=0.0, split_seed=0,
    )  # fmt: skip
    for kind in ("value", "prm", "orm"):
        rows, flags = out[kind], out[kind].from_solver()
        assert flags[: len(labels[kind])] == [False] * len(labels[kind]) and all(flags[len(labels[kind]) :])
        for i in range(len(labels[kind]), len(rows)):
            p = make_problem("x", *_numbers_and_target(rows.prompts[i]))
            ok = [reachable(p, rows.steps[i][: k + 1]) for k in range(len(rows.steps[i]))]
            if kind == "value":
                assert rows.soft[i] == [pytest.approx(rates["value"] * ok[-1])]
            elif kind == "prm":
                assert rows.hard[i] == ok
                assert all(s in (0.0, 1.0, pytest.approx(rates["prm"])) for s in rows.soft[i])
                assert (rows.soft[i][-1] == 1.0) == TASK.verify(p, rows.steps[i])
            else:
                assert rows.soft[i] == [float(TASK.verify(p, rows.steps[i]))]


def _numbers_and_target(prompt: str) -> tuple[list[int], int]:
    numbers, target = prompt.strip().split(" -> ")
    return [int(n) for n in numbers.split()], int(target)


def test_a_solvers_prm_row_trains_on_its_own_target_and_counts_in_no_validation(tmp_path):
    labels, problems = _search_labels()
    out, _ = with_solver_rows(
        {"prm": labels["prm"], "value": labels["value"]}, problems, SolverRowsConfig(states=40, paths=40),
        seed=0, difficulty=None, exclude=(), val_fraction=0.0, split_seed=0,
    )  # fmt: skip
    prm = out["prm"]
    targets, _, _ = _targets("prm", prm, TrainCriticsConfig(progress=False))
    flags = prm.from_solver()
    assert any(flags)
    for t, soft, hard, solved in zip(targets, prm.soft, prm.hard, flags, strict=True):
        assert t == (soft if solved else [float(h) for h in hard])
    assert any(
        t != [float(h) for h in hard] for t, hard, s in zip(targets, prm.hard, flags, strict=True) if s
    )
    assert len(_search_rows(prm)) == len(labels["prm"])

    base = save_tiny_llama(tmp_path / "base", n_layers=2)
    cfg = TrainCriticsConfig(kinds=("prm",), steps=3, batch_size=8, val_fraction=0.5, progress=False)
    report = train_critics({"prm": prm}, tmp_path / "out", base, cfg)["prm"]
    from critics.labels import split_by_problem

    val = split_by_problem(prm, 0.5, 0)[1]
    assert report["val_rows"] == len(_search_rows(val)) < len(val)


def test_the_offset_makes_the_mean_probability_right_on_the_search_rows(tmp_path):
    """Solver rows with targets far above the search's pull the critic's probabilities up; the
    fitted offset brings their mean back to the search rows' mean target."""
    base = save_tiny_llama(tmp_path / "base", n_layers=2)
    labels, problems = _search_labels()
    value = labels["value"]
    for i in range(6):  # more search rows, all with target 0.05
        value.problem_ids.append(f"s{i}")
        value.keys.append(f"s{i}")
        value.prompts.append(f"{i + 1} 4 -> 9\n")
        value.steps.append([f"{i + 1}+4={i + 5}"])
        value.soft.append([0.05])
        value.hard.append([True])
        value.nodes.append([(f"s{i}", 1)])
    for i in range(40):
        value.add_solved(
            f"z{i}", f"z{i}", f"{i % 9 + 1} 2 -> 7\n", [f"{i % 9 + 1}*2={2 * (i % 9 + 1)}"], [0.9], [True]
        )
    cfg = TrainCriticsConfig(
        kinds=("value",), value_steps=40, batch_size=8, lr=3e-3, val_fraction=0.0, progress=False
    )
    model, tok, report = train_one("value", value, Labels("value"), base, "\n", cfg)
    from critics.train import _scores

    search = _search_rows(value)
    z, _, soft = _scores(model, tok, "value", search, "\n", "cpu")
    calibrated = torch.sigmoid(torch.from_numpy(z).double() + report["logit_offset"]).numpy()
    assert calibrated.mean() == pytest.approx(soft.mean(), abs=1e-6)
    assert torch.sigmoid(torch.from_numpy(z).double()).numpy().mean() > soft.mean() + 0.1  # canary: pulled up
    assert report["solver_rows"] == 40
