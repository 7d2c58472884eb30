"""Countdown states and step paths labelled by the exact solver, for critics that must tell a live
state from a dead end.

Whether a state can still reach its target is most of what decides a node's value here: on the
embedded critics' bootstrap rows, reachability alone ranks the value labels at AUROC 0.92 and
the PRM's step labels at 0.95, and no unreachable state was ever solved. A critic learns it from
a few tens of thousands of search rows only in part, so `rewards.critic_bootstrap` adds rows
labelled here: any number of them, from problems the caller allows, at the cost of a solver call.

- `solver_states`: states one or two valid steps deep, not yet at the target, with two numbers or
  more left (the shape of the search's value rows), labelled on their last step.
- `solver_paths`: step paths played to their end, every step labelled; a step is correct, the
  solver's own or a random legal one, or, with `p_error`, broken the ways a small policy breaks
  them (a wrong result, a number used twice, the target claimed). The last label of a path is
  `CountdownTask.verify`'s verdict.

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
class SolvedPath:
    """A problem, steps from its start, and per step whether the target is still reachable after it
    (a step that reaches the target: True; a step that breaks a rule: False)."""

    problem: Problem
    steps: tuple[str, ...]
    reachable: tuple[bool, ...]


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


def _broken(step: str, pool: list[int], target: int, used: list[int], rng: random.Random) -> str:
    """`step` broken as a small policy breaks one: a wrong result, a number used twice, the target claimed."""
    a, op, b, c = parse_step(step)
    kind = rng.random()
    if kind < 0.4:
        wrong = target if len(pool) == 2 and c != target else max(0, c + rng.choice((-2, -1, 1, 2, 10)))
        return f"{a}{op}{b}={wrong}"
    if kind < 0.7 and used:
        return f"{a}{op}{rng.choice(used)}={c}"
    if kind < 0.85:
        return f"{a}{op}{b}={target}"
    return f"{a}{op}{b}={max(0, c + rng.choice((-1, 1)))}"


def _problems(
    n: int, seed: int, difficulty: CountdownDifficulty | None, exclude: Iterable[str]
) -> list[Problem]:
    held = set(exclude)
    return [p for p in generate_problems(n, seed, difficulty) if content_key(p.question, p.meta) not in held]


def solver_states(
    n: int,
    seed: int,
    difficulty: CountdownDifficulty | None = None,
    exclude: Iterable[str] = (),
    p_solver: float = 0.5,
) -> list[SolvedPath]:
    """States of the first `n` generated problems (those in `exclude`, content keys, left out):
    one or two legal steps (two from four numbers or more), ending short of the target with two
    numbers or more left; a problem whose draw ends otherwise gives no row."""
    rng, out = random.Random(seed), []
    for problem in _problems(n, seed, difficulty, exclude):
        pool, target = list(problem.meta["numbers"]), problem.meta["target"]
        steps = []
        for _ in range(rng.choice((1, 2)) if len(pool) >= 4 else 1):
            step = _legal_step(pool, target, rng, p_solver)
            steps.append(step)
            pool = pool_after(pool, [step])
        if target in pool or len(pool) < 2:
            continue
        labels = tuple(reachable(problem, steps[: k + 1]) for k in range(len(steps)))
        out.append(SolvedPath(problem, tuple(steps), labels))
    return out


def solver_paths(
    n: int,
    seed: int,
    difficulty: CountdownDifficulty | None = None,
    exclude: Iterable[str] = (),
    p_solver: float = 0.5,
    p_error: float = 0.25,
) -> list[SolvedPath]:
    """One path per problem of the first `n` generated (those in `exclude` left out), played until
    it reaches the target, breaks a rule or has one number left; each step labelled."""
    rng, out = random.Random(seed), []
    for problem in _problems(n, seed, difficulty, exclude):
        pool, target = list(problem.meta["numbers"]), problem.meta["target"]
        steps: list[str] = []
        used: list[int] = []
        while len(pool) >= 2:
            step = _legal_step(pool, target, rng, p_solver)
            if rng.random() < p_error:
                step = _broken(step, pool, target, used, rng)
            steps.append(step)
            after = pool_after(pool, [step])
            if after is None:
                break
            a, _, b, c = parse_step(step)
            pool, used = after, used + [a, b]
            if c == target:
                break
        labels = tuple(reachable(problem, steps[: k + 1]) for k in range(len(steps)))
        out.append(SolvedPath(problem, tuple(steps), labels))
    return out
