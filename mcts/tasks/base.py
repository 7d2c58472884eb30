"""The task boundary: what a problem is, how its steps look, and how an answer is checked.

A task is pure Python (no torch, no numpy needed). The search and the policy only ever see
`Problem`s and lists of step strings; each step is one line of text *without* its newline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class TaskInputError(ValueError):
    """Bad user input (a malformed problem file, an unknown task): the message is one line saying
    what is wrong and how to fix it. The job prints it and exits non-zero without a traceback."""


@dataclass(frozen=True)
class Problem:
    """One problem. `question` is the human-readable statement; `answer` the reference answer as
    text (for Countdown, the target); `meta` holds task-specific fields (Countdown: numbers, target)."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class StepCheck:
    """What the task says about a partial solution after its last step.

    terminal: no further step should be generated (an answer was given, or no move is left).
    success:  True/False for a terminal whose answer the verifier checked; None if not terminal.
    """

    terminal: bool
    success: bool | None


@runtime_checkable
class Task(Protocol):
    name: str
    step_separator: str  # the policy stops an option at this string ("\n")

    def prompt(self, problem: Problem) -> str:
        """The text the policy conditions on; steps follow it, each ended by `step_separator`."""

    def check(self, problem: Problem, steps: list[str]) -> StepCheck:
        """Terminal / verified status of the partial solution `steps` (bounded time on any input)."""

    def normalize_step(self, step: str) -> str:
        """Canonical form of one step, used by state merge to detect identical options."""


def content_key(question: str, meta: dict) -> str:
    """What a problem *is*, independent of its id: for Countdown the sorted numbers and the target
    (the order the numbers are listed in does not make another problem), else the whitespace-
    normalised question. Held-out sets, training sets and the job's problem list are compared by it."""
    if "numbers" in meta and "target" in meta:
        return f"{sorted(int(x) for x in meta['numbers'])}->{int(meta['target'])}"
    return " ".join(question.split())
