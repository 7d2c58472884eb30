"""Tasks by name: the one place the job (`task=countdown|jsonl`) turns a config into a task.

`make_task(name, **settings)` builds the Task; `load_problems(name, ...)` builds its problem list.
Both raise TaskInputError with a one-line message for an unknown name or a bad setting, so the
job can print it and exit without a traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mcts.tasks.base import Problem, Task, TaskInputError
from mcts.tasks.countdown import CountdownDifficulty, CountdownTask, distinct_problems, load_countdown_file
from mcts.tasks.jsonl import JsonlTask, load_jsonl_file

# name -> Task class. A task class is a dataclass whose fields are its settings.
TASKS: dict[str, type] = {"countdown": CountdownTask, "jsonl": JsonlTask}

# name -> loader of a problem file (JSONL or parquet).
FILE_LOADERS: dict[str, Callable[[str | Path], list[Problem]]] = {
    "countdown": load_countdown_file,
    "jsonl": load_jsonl_file,
}

_DIFFICULTY_FIELDS = tuple(f.name for f in dataclasses.fields(CountdownDifficulty))
# Settings of any task (name, max_steps, ...): load_problems accepts and ignores them.
_TASK_FIELDS = frozenset(f.name for cls in TASKS.values() for f in dataclasses.fields(cls))


def _check_name(name: str) -> None:
    if name not in TASKS:
        raise TaskInputError(f"unknown task {name!r}: choose one of {', '.join(TASKS)} (task=countdown)")


def make_task(name: str, /, **settings) -> Task:
    """The task called `name`, with `settings` for its dataclass fields (e.g. `max_steps=12`).

    Settings the task does not have raise TaskInputError naming the ones it does. Settings that
    only `load_problems` uses (path, num_problems, seed, difficulty) are ignored here, so a whole
    `task` config group can be passed to both.
    """
    _check_name(name)
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"name"}  # the registry key is the name
    ignored = {"name", "path", "num_problems", "seed", "difficulty", *_DIFFICULTY_FIELDS}
    unknown = sorted(k for k in settings if k not in fields and k not in ignored)
    if unknown:
        raise TaskInputError(
            f"task {name!r} has no setting {', '.join(unknown)}: its settings are {', '.join(sorted(fields))}"
        )
    return cls(**{k: v for k, v in settings.items() if k in fields})


GENERATED_PROBLEMS = 256
"""Countdown problems generated when no count is given: 16 batches of the default job, a few minutes."""


def load_problems(
    name: str,
    /,
    *,
    path: str | Path | None = None,
    num_problems: int | None = None,
    seed: int = 0,
    difficulty: CountdownDifficulty | dict | None = None,
    **difficulty_settings,
) -> list[Problem]:
    """The problems for task `name`.

    - countdown: read from `path` when given, else `num_problems` (default `GENERATED_PROBLEMS`) distinct problems
      generated with `seed` and the difficulty (a CountdownDifficulty, a dict of its fields, or its fields as
      keyword arguments, e.g. `max_numbers=5`);
    - jsonl: read from `path` (required).

    With a path, `num_problems` keeps the first N problems of the file (None: all of them). Task settings such as
    `max_steps` may be passed too and are ignored, so a whole `task` config group fits.
    """
    _check_name(name)
    if num_problems is not None and num_problems < 0:
        raise TaskInputError(f"task.num_problems must be >= 0, got {num_problems}")
    if path is not None and str(path).strip():
        problems = FILE_LOADERS[name](path)
        return problems if num_problems is None else problems[:num_problems]
    if name != "countdown":
        raise TaskInputError(
            f"task {name!r} reads its problems from a file: set task.path=FILE "
            "(JSONL or parquet rows with id, question, answer)"
        )
    known = {k: v for k, v in difficulty_settings.items() if k in _DIFFICULTY_FIELDS}
    unknown = sorted(set(difficulty_settings) - set(known) - _TASK_FIELDS)
    if unknown:
        raise TaskInputError(
            f"countdown has no setting {', '.join(unknown)}: difficulty settings are {', '.join(_DIFFICULTY_FIELDS)}"
        )
    difficulty = _difficulty(difficulty, known)
    return distinct_problems(
        GENERATED_PROBLEMS if num_problems is None else num_problems, seed=seed, difficulty=difficulty
    )


def _difficulty(base: CountdownDifficulty | dict | None, overrides: dict) -> CountdownDifficulty:
    if isinstance(base, CountdownDifficulty):
        return dataclasses.replace(base, **overrides)
    merged = {**dict(base or {}), **overrides}  # dict(): Hydra passes a DictConfig
    unknown = sorted(set(merged) - set(_DIFFICULTY_FIELDS))
    if unknown:
        raise TaskInputError(
            f"countdown difficulty has no setting {', '.join(unknown)}: choose from {', '.join(_DIFFICULTY_FIELDS)}"
        )
    return CountdownDifficulty(**merged)
