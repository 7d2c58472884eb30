"""Value rows the Countdown solver labels, trained beside the search's (`critics.train`'s `extra`).

Whether a state can still reach its target ranks the bootstrap's value labels at AUROC 0.92, and
no unreachable state was ever solved; a value function learns that from ~26k search rows only in
part. So the embedded value function also trains on states the solver labels
(`mcts.tasks.countdown_states.solver_states`): a reachable state takes the search rows' own
positive rate among their reachable states (the policy solves about half of them), an
unreachable one 0. The rate is read on the value function's training split only. Those targets
lift the rows' mean, so the critic's logit offset is fitted after training to give the search rows'
mean back (`critics.train.train_one`).

The problems the rows come from are drawn with seed `SOLVER_SEED_BASE + seed`; the held-out
evaluation pool and the bootstrap search's own problems (its validation split among them) are left
out by content, and only problems the critics' trunk already trained on are kept (`within`): the
rows add no problem to what the critics saw, so a job's audit keeps its problems unseen in training.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from critics.labels import Labels, split_by_problem
from mcts.tasks.base import Problem, content_key
from mcts.tasks.countdown import CountdownDifficulty, CountdownTask
from mcts.tasks.countdown_states import reachable, solver_states

SOLVER_SEED_BASE = 3_000_000  # problems of the solver's value rows: seed SOLVER_SEED_BASE + seed


def reachable_rate(value: Labels, problems: dict[str, Problem]) -> float:
    """Share of `value`'s rows (of `problems`, by id) at a reachable state whose hard label is set."""
    hits = [
        h[-1]
        for pid, steps, h in zip(value.problem_ids, value.steps, value.hard, strict=True)
        if reachable(problems[pid], steps)
    ]
    return float(np.mean(hits)) if hits else 0.0


def solver_value_rows(
    value: Labels,
    problems: Iterable[Problem],
    draws: int,
    seed: int,
    difficulty: CountdownDifficulty | None,
    exclude: Iterable[str],
    val_fraction: float,
    split_seed: int,
    within: set[str] | None = None,
) -> tuple[Labels, float]:
    """(value rows of solver states from `draws` generated problems, none of `exclude` (content
    keys) or of `problems` (the search's, by content), all in `within` where given, and the target
    a reachable one takes:
    `reachable_rate` over `value`'s training split (`split_by_problem(value, val_fraction, split_seed)`,
    as `critics.train` splits it))."""
    by_id = {p.id: p for p in problems}
    train = split_by_problem(value, val_fraction, split_seed)[0]
    rate = reachable_rate(train, by_id)
    held = set(exclude) | {content_key(p.question, p.meta) for p in by_id.values()}
    task, rows = CountdownTask(), Labels("value")
    for r in solver_states(draws, SOLVER_SEED_BASE + seed, difficulty, held, within=within):
        ok = r.reachable
        key = content_key(r.problem.question, r.problem.meta)
        rows.add_solved(r.problem.id, key, task.prompt(r.problem), r.steps, [rate * ok], [ok])
    return rows, rate
