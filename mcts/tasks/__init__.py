"""Tasks: problem sources, step formats and exact verifiers (pure Python, no torch or numpy).

`make_task(name)` / `load_problems(name, ...)` in `mcts.tasks.registry` are the entry points the
job uses; the task modules can also be used directly.
"""

from mcts.tasks.base import Problem, StepCheck, Task, TaskInputError
from mcts.tasks.countdown import (
    CountdownDifficulty,
    CountdownTask,
    generate_problems,
    load_countdown_file,
    make_problem,
    solve,
)

__all__ = [
    "CountdownDifficulty",
    "CountdownTask",
    "Problem",
    "StepCheck",
    "Task",
    "TaskInputError",
    "generate_problems",
    "load_countdown_file",
    "make_problem",
    "solve",
]
