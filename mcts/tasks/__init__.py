"""Tasks: problem sources, step formats and exact verifiers (pure Python, no torch or numpy).

`make_task(name, **settings)` and `load_problems(name, ...)` (from `mcts.tasks.registry`) are the
entry points the job uses; the task modules can also be used directly.
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
from mcts.tasks.jsonl import JsonlTask, load_jsonl_file, parse_number
from mcts.tasks.registry import TASKS, load_problems, make_task

__all__ = [
    "TASKS",
    "CountdownDifficulty",
    "CountdownTask",
    "JsonlTask",
    "Problem",
    "StepCheck",
    "Task",
    "TaskInputError",
    "generate_problems",
    "load_countdown_file",
    "load_jsonl_file",
    "load_problems",
    "make_problem",
    "make_task",
    "parse_number",
    "solve",
]
