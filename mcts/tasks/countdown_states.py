"""Countdown states labelled by the exact solver: can the target still be reached from here?

On the embedded critics' bootstrap rows, reachability alone ranks the value labels at AUROC 0.92,
and no unreachable state was ever solved. A value function learns it from the search's rows only
in part, so `rewards.solver_rows` adds states labelled here (`solver_states`): one or two legal
steps into a generated problem, short of the target, with two numbers or more left: the shape of
the search's value rows (a broken step is a terminal failure there, so it never heads a value row).

Pure Python and seeded: the same arguments give the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from mcts.tasks.base import Problem, content_key
from mcts.tasks.countdown import (
    CountdownDifficulty,
    CountdownTask,
    apply_op,
    format_step,
    generate_problems,
    parse_step,
    solve,
)

_OPS = ("+", "-", "*", "/")
_TASK = CountdownTask()


@dataclass(frozen=True)
class SolvedState:
    """A problem, legal steps from its start, and whether the target is still reachable after them."""

    problem: Problem
    steps: tuple[str, ...]
    reachable: bool


def pool_after(numbers: list[int], steps: list[str]) -> list[int] | None:
    """The numbers left after `steps`, or None where a step breaks a rule (unparsable, an operand
    not in the pool, a wrong or forbidden result)."""
    pool = list(numbers)
    for step in steps:
        parsed = parse_step(step)
        if parsed is None:
            return None
        a, op, b, c = parsed
        if a not in pool:
            return None
        pool.remove(a)
        if b not in pool or apply_op(a, op, b) != c:
            return None
        pool.remove(b)
        pool.append(c)
    return pool


def reachable(problem: Problem, steps: list[str]) -> bool:
    """Whether the target can still be reached after `steps` (True once a step has reached it)."""
    check = _TASK.check(problem, steps)
    if check.terminal:
        return bool(check.success)
    pool = pool_after(problem.meta["numbers"], steps)
    return pool is not None and solve(pool, problem.meta["target"]) is not None


def _legal_step(pool: list[int], target: int, rng: random.Random, p_solver: float) -> str:
    """The solver's next step (with probability `p_solver`, where the target is reachable), else a
    random legal one."""
    if rng.random() < p_solver:
        steps = solve(pool, target)
        if steps:
            return steps[0]
    while True:
        a, b = rng.sample(pool, 2)
        op = rng.choice(_OPS)
        c = apply_op(a, op, b)
        if c is not None:
            return format_step(a, op, b, c)


def _problems(
    n: int, seed: int, difficulty: CountdownDifficulty | None, exclude: Iterable[str], within: set[str] | None
) -> list[Problem]:
    held = set(exclude)
    keys = [(p, content_key(p.question, p.meta)) for p in generate_problems(n, seed, difficulty)]
    return [p for p, k in keys if k not in held and (within is None or k in within)]


def solver_states(
    n: int,
    seed: int,
    difficulty: CountdownDifficulty | None = None,
    exclude: Iterable[str] = (),
    p_solver: float = 0.5,
    within: set[str] | None = None,
) -> list[SolvedState]:
    """States of the first `n` generated problems (those in `exclude`, content keys, left out, and
    where `within` is given, those not in it): one or two legal steps (two from four numbers or
    more), ending short of the target with two numbers or more left; a problem whose draw ends
    otherwise gives no row."""
    rng, out = random.Random(seed), []
    for problem in _problems(n, seed, difficulty, exclude, within):
        pool, target = list(problem.meta["numbers"]), problem.meta["target"]
        steps, made = [], False
        for _ in range(rng.choice((1, 2)) if len(pool) >= 4 else 1):
            step = _legal_step(pool, target, rng, p_solver)
            steps.append(step)
            pool = pool_after(pool, [step])
            made = parse_step(step)[3] == target
            if made:  # a solved state is terminal: no value row, and no step after it
                break
        if made or target in pool or len(pool) < 2:
            continue
        # legal steps to a state that is not terminal: `reachable` would walk them again to this pool
        out.append(SolvedState(problem, tuple(steps), solve(pool, target) is not None))
    return out
