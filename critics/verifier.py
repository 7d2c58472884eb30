"""The verifier critic: the task's exact checker behind the critic interface.

It is the external anchor the learned critics are measured against (and what decides terminals
in the search when `critics.verifier_at_terminals`): 1.0 for a verified correct finished
solution, 0.0 for a verified wrong one, NaN for a partial solution it cannot judge yet.
"""

from __future__ import annotations

import numpy as np

from mcts.tasks.base import Problem, Task


class VerifierCritic:
    """`critics.base.Critic` over `task.check`; pure Python, no model."""

    kind = "verifier"

    def __init__(self, task: Task):
        self.task = task

    def score(self, problems: list[Problem], steps: list[list[str]]) -> np.ndarray:
        """[n]: 1.0 / 0.0 where the steps end the solution (verified), NaN where they do not."""
        assert len(problems) == len(steps), f"{len(problems)} problems but {len(steps)} step lists"
        out = np.full(len(problems), np.nan)
        for i, (problem, row) in enumerate(zip(problems, steps, strict=True)):
            check = self.task.check(problem, list(row))
            if check.terminal and check.success is not None:
                out[i] = float(check.success)
        return out
