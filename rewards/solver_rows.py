"""Rows labelled by the task's solver beside the search's (`mcts.tasks.countdown_states`): where the
embedded critics learn whether a Countdown state can still reach its target.

A search row's target is the policy's success; a solver's row knows only whether success is still
possible. So a solver's row takes the search rows' own rate for its case: a reachable value state
the share of the search's reachable states that the policy solved (0.45 in the bootstrap: a
reachable state's mean value target, 0.20, trained a value function 0.02 AUROC weaker on the
tune slice), a reachable PRM step the PRM's positive rate on the search's reachable steps (0.6), a
step that reaches the target 1, anything unreachable 0; an ORM row its verdict. The rates are read
on the critics' training split only (`critics.labels.split_by_problem`, the training's fraction
and seed). The critics' probabilities are then set back to the search rows' own mean
(`critics.train`, a logit offset).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from critics.labels import Labels, split_by_problem
from mcts.tasks.base import Problem, content_key
from mcts.tasks.countdown import CountdownDifficulty, CountdownTask, parse_step
from mcts.tasks.countdown_states import SolvedPath, reachable, solver_paths, solver_states

SOLVER_SEED_BASE = 3_000_000  # problems of the solver's rows: seed SOLVER_SEED_BASE + 3 * seed + kind


@dataclass(frozen=True)
class SolverRowsConfig:
    """How many solver-labelled rows each critic gets (0: none)."""

    states: int = 90_000
    """Problems drawn for the value function's states (about 3 in 4 give a row)."""
    paths: int = 60_000
    """Problems drawn for the PRM's step paths, and as many again for the ORM's."""
    p_error: float = 0.25
    """Chance that a step of a path is broken (a wrong result, a number used twice, the target claimed)."""


def solver_seeds(seed: int) -> dict[str, int]:
    """The problem seed of each critic's solver rows."""
    return {kind: SOLVER_SEED_BASE + 3 * seed + k for k, kind in enumerate(("value", "prm", "orm"))}


def solver_problem_keys(cfg: SolverRowsConfig, seed: int, difficulty, exclude: Iterable[str]) -> set[str]:
    """Content keys of every problem the solver's rows come from."""
    rows = _solved(cfg, seed, difficulty, set(exclude))
    return {content_key(r.problem.question, r.problem.meta) for paths in rows.values() for r in paths}


def _solved(cfg: SolverRowsConfig, seed: int, difficulty, exclude: set[str]) -> dict[str, list[SolvedPath]]:
    seeds = solver_seeds(seed)
    return {
        "value": solver_states(cfg.states, seeds["value"], difficulty, exclude),
        "prm": solver_paths(cfg.paths, seeds["prm"], difficulty, exclude, p_error=cfg.p_error),
        "orm": solver_paths(cfg.paths, seeds["orm"], difficulty, exclude, p_error=cfg.p_error),
    }


def _makes(step: str, target: int) -> bool:
    """The step writes the target as its result (right or not)."""
    parsed = parse_step(step)
    return parsed is not None and parsed[3] == target


def search_rates(labels: dict[str, Labels], problems: dict[str, Problem]) -> dict[str, float]:
    """The search rows' positive rate where the target is still reachable: over the value
    function's reachable states, and over the PRM's reachable steps that do not make the target."""
    value = labels["value"]
    hits = [h[-1] for pid, st, h in zip(value.problem_ids, value.steps, value.hard, strict=True)
            if reachable(problems[pid], st)]  # fmt: skip
    prm, steps = labels["prm"], []
    for pid, st, hard in zip(prm.problem_ids, prm.steps, prm.hard, strict=True):
        target = problems[pid].meta["target"]
        for k, h in enumerate(hard):
            if reachable(problems[pid], st[: k + 1]) and not _makes(st[k], target):
                steps.append(h)
    return {"value": float(np.mean(hits)) if hits else 0.0, "prm": float(np.mean(steps)) if steps else 0.0}


def with_solver_rows(
    labels: dict[str, Labels],
    problems: dict[str, Problem],
    cfg: SolverRowsConfig,
    seed: int,
    difficulty: CountdownDifficulty | None,
    exclude: Iterable[str],
    val_fraction: float,
    split_seed: int,
) -> tuple[dict[str, Labels], dict[str, float]]:
    """`labels` (the search's rows, of `problems` by id) with the solver's rows added to each critic
    present, and the rates their targets took (`search_rates` on the training split)."""
    train = {k: split_by_problem(labels[k], val_fraction, split_seed)[0] for k in ("value", "prm")}
    rates = search_rates(train, problems)
    out = {}
    for kind, paths in _solved(cfg, seed, difficulty, set(exclude)).items():
        if kind not in labels:
            continue
        rows = labels[kind].subset(range(len(labels[kind])))
        for r in paths:
            key = content_key(r.problem.question, r.problem.meta)
            prompt = CountdownTask().prompt(r.problem)
            if kind == "value":
                rows.add_solved(
                    r.problem.id, key, prompt, r.steps, [rates["value"] * r.reachable[-1]], r.reachable[-1:]
                )
            elif kind == "prm":
                target = r.problem.meta["target"]
                soft = [
                    1.0 if ok and _makes(s, target) else rates["prm"] * ok
                    for s, ok in zip(r.steps, r.reachable, strict=True)
                ]
                rows.add_solved(r.problem.id, key, prompt, r.steps, soft, r.reachable)
            else:
                rows.add_solved(
                    r.problem.id, key, prompt, r.steps, [float(r.reachable[-1])], r.reachable[-1:]
                )
        out[kind] = rows
    return {**labels, **out}, rates
