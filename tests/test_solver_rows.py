"""Solver-labelled value rows: legal states labelled by the exact solver, a target rate read on the
training split only, problems kept apart from the held-out and the search's own, and the critic's
logit offset fitted back to the search rows' mean."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_models import save_tiny_llama

from critics.labels import Labels, split_by_problem
from critics.metrics import auroc
from critics.readout import fit_offset, read_logits
from critics.train import TrainCriticsConfig, train_one
from mcts.embedded import default_difficulty
from mcts.tasks.base import content_key
from mcts.tasks.countdown import CountdownTask, generate_problems, make_problem, solve
from mcts.tasks.countdown_states import pool_after, reachable, solver_states
from rewards.solver_rows import SOLVER_SEED_BASE, reachable_rate, solver_value_rows

TASK = CountdownTask()


def test_reachable_follows_the_solver():
    p = make_problem("p", [3, 7, 9, 4], 24)
    assert reachable(p, solve([3, 7, 9, 4], 24)[:1]), "the solver's own first step"
    assert not reachable(p, ["3*7=21"]) and solve([9, 4, 21], 24) is None, "21, 9, 4 cannot make 24"
    assert not reachable(p, ["3*7=20"]), "a broken step is a dead end"
    assert reachable(make_problem("q", [1, 2, 5], 3), ["1+2=3"]), "a step that makes the target"
    assert not reachable(make_problem("r", [1, 1, 1], 60), ["1+1=2"]), "60 is out of reach of 2 and 1"


def test_solver_states_are_legal_labelled_and_seeded():
    rows = solver_states(400, 7, default_difficulty())
    assert rows and rows == solver_states(400, 7, default_difficulty()), "seeded"
    held = {content_key(r.problem.question, r.problem.meta) for r in rows[:50]}
    kept = solver_states(400, 7, default_difficulty(), exclude=held)
    assert kept and not {content_key(r.problem.question, r.problem.meta) for r in kept} & held
    for r in rows:
        numbers, target = r.problem.meta["numbers"], r.problem.meta["target"]
        pool = pool_after(numbers, list(r.steps))
        assert pool is not None and len(pool) >= 2 and target not in pool, r
        assert not TASK.check(r.problem, list(r.steps)).terminal, "a value row's state is not terminal"
        assert r.reachable == (solve(pool, target) is not None), r
    share = np.mean([r.reachable for r in rows])
    assert 0.2 < share < 0.8, f"both kinds of state are drawn ({share:.2f} reachable)"


def _value_labels(problems, steps, hard, keys=None) -> Labels:
    out = Labels("value")
    for i, (p, s, h) in enumerate(zip(problems, steps, hard, strict=True)):
        out.add_solved(p.id, keys[i] if keys else content_key(p.question, p.meta), "x", s, [float(h)], [h])
    return out


def test_rate_is_read_on_the_training_split_only():
    problems = generate_problems(200, 11, default_difficulty())
    first = {p.id: p for p in problems}
    steps = [[solve(p.meta["numbers"], p.meta["target"])[0]] if solve(p.meta["numbers"], p.meta["target"])
             else [] for p in problems]  # fmt: skip
    keep = [i for i, s in enumerate(steps) if s and reachable(problems[i], s) and len(s[0])]
    keep = [i for i in keep if not TASK.check(problems[i], steps[i]).terminal]
    ps = [problems[i] for i in keep]
    value = _value_labels(ps, [steps[i] for i in keep], [True] * len(ps))
    train, val = split_by_problem(value, 0.5, 3)
    assert len(train) and len(val)
    val_ids = set(val.problem_ids)
    value.hard = [[pid not in val_ids] for pid in value.problem_ids]  # positives on the training side only
    assert reachable_rate(value, first) == pytest.approx(len(train) / len(value))
    rows, rate = solver_value_rows(value, problems, 300, 0, default_difficulty(), set(), 0.5, 3)
    assert rate == 1.0, "the validation split's labels must not move the rate"
    assert rows and all(s[0] == (rate if h[0] else 0.0) for s, h in zip(rows.soft, rows.hard, strict=True))
    assert rows.nodes == [[]] * len(rows), "no tree holds a solver row"


def test_solver_rows_leave_out_the_held_out_and_the_searched_problems_and_keep_within():
    drawn = generate_problems(300, SOLVER_SEED_BASE, default_difficulty())
    keys = [content_key(p.question, p.meta) for p in drawn]
    held = set(keys[:40])
    searched = drawn[40:80]
    empty = Labels("value")
    rows, _ = solver_value_rows(empty, searched, 300, 0, default_difficulty(), held, 0.1, 0)
    got = set(rows.keys)
    assert got and not got & held and not got & {content_key(p.question, p.meta) for p in searched}
    within = set(keys[100:200])
    inside, _ = solver_value_rows(empty, searched, 300, 0, default_difficulty(), held, 0.1, 0, within=within)
    assert inside and set(inside.keys) <= within and len(inside) < len(rows), "no problem outside `within`"
    assert rows.prompts[0] == TASK.prompt(
        next(p for p in drawn if content_key(p.question, p.meta) == rows.keys[0])
    )


def test_fit_offset_gives_the_mean_back_and_keeps_ranks():
    rng = np.random.default_rng(0)
    logits = rng.normal(1.5, 2.0, 5000)
    targets = (rng.random(5000) < 0.2).astype(float)
    o = fit_offset(logits, targets)
    probs = 1 / (1 + np.exp(-(logits + o)))
    assert probs.mean() == pytest.approx(targets.mean(), abs=1e-9)
    assert o < 0, "predictions above the mean are pulled down"
    assert auroc(probs, targets > 0) == auroc(logits, targets > 0)


def _toy_value(n: int, prefix: str, positive_rate: float) -> Labels:
    """A '+' step is worth `positive_rate`, a '-' step 0."""
    out = Labels("value")
    for i in range(n):
        good = i % 2 == 0
        step = f"{i % 7 + 2}+1={i % 7 + 3}" if good else f"{i % 7 + 2}-1={i % 7 + 1}"
        out.add_solved(
            f"{prefix}{i}", f"{prefix}{i}", f"{i % 5} ->\n", [step], [positive_rate * good], [good]
        )
    return out


def test_extra_rows_train_but_never_validate_and_the_offset_restores_the_mean(tmp_path):
    policy = save_tiny_llama(tmp_path / "policy")
    train, val = _toy_value(64, "s", 0.2), _toy_value(32, "v", 0.2)
    extra = _toy_value(256, "x", 0.9)  # another source, a much higher mean
    cfg = TrainCriticsConfig(steps=60, batch_size=32, lr=3e-3, progress=False)
    model, tok, report = train_one("value", train, val, policy, "\n", cfg, extra=extra)
    assert report["extra_rows"] == 256 and report["train_rows"] == 64 and report["val_rows"] == 32
    assert report["calibration_rows"] == 64
    logits, soft, _ = read_logits(model, tok, "value", train, "\n", "cpu")
    probs = 1 / (1 + np.exp(-(logits + report["logit_offset"])))
    assert probs.mean() == pytest.approx(soft.mean(), abs=1e-6), "the search rows' mean comes back"
    assert report["logit_offset"] < -0.5, "the extra rows' higher targets were taken back"
    _, _, plain = train_one("value", train, val, policy, "\n", cfg)
    assert plain["logit_offset"] == 0.0 and plain["calibration_rows"] == 0 and plain["extra_rows"] == 0
