"""Countdown task: hand-made verifier cases, solver/generator properties, file errors, fuzzing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcts.tasks.base import StepCheck, Task, TaskInputError
from mcts.tasks.countdown import (
    CountdownDifficulty,
    CountdownTask,
    generate_problems,
    load_countdown_file,
    make_problem,
    solve,
)

TASK = CountdownTask()
P24 = make_problem("p", [3, 7, 9, 4], 24)
OK = StepCheck(terminal=True, success=True)
FAIL = StepCheck(terminal=True, success=False)
GOING = StepCheck(terminal=False, success=None)


def test_formats():
    assert isinstance(TASK, Task)
    assert (TASK.name, TASK.step_separator) == ("countdown", "\n")
    assert (P24.id, P24.question, P24.answer) == ("p", "3 7 9 4 -> 24", "24")
    assert P24.meta == {"numbers": [3, 7, 9, 4], "target": 24}
    assert TASK.prompt(P24) == "3 7 9 4 -> 24\n"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (["9-3=6", "6*4=24"], OK),  # a valid solution
        (["9 - 3 = 6", " 6 * 4 = 24 "], OK),  # spaces around tokens are fine
        (["9-3=6"], GOING),  # valid so far, not finished
        ([], GOING),
        (["7*3=21", "21+3=24"], FAIL),  # 3 used twice (only one 3 in the pool)
        (["9-3=6", "6*6=36"], FAIL),  # 6 made once, used twice
        (["8*3=24"], FAIL),  # 8 is not in the pool
        (["9-3=5"], FAIL),  # wrong arithmetic
        (["9/4=2"], FAIL),  # inexact division
        (["3-9=-6"], FAIL),  # negative intermediate results are not allowed
        (["3-9=6"], FAIL),  # ... nor written as a positive number
        (["4/0=0"], FAIL),
        ([""], FAIL),  # empty step
        (["   "], FAIL),
        (["9-3=6 and then"], FAIL),  # trailing junk
        (["9-3=6."], FAIL),
        (["9 x 3 = 27"], FAIL),  # unknown operator
        (["9-3=6", "7+4=11", "11+6=17"], FAIL),  # one number (17) left, not the target
        (["9-3=6", "6*4=24", "junk"], OK),  # steps after the first terminal are not read
        (["07*3=21", "21+3=24"], FAIL),  # 07 is 7, but 3 is still used twice
    ],
)
def test_check_hand_made(steps, expected):
    assert TASK.check(P24, steps) == expected
    assert TASK.verify(P24, steps) is (expected.success is True)


def test_check_duplicates_and_zero():
    p = make_problem("d", [3, 3, 5], 2)
    assert TASK.check(p, ["3+3=6"]) == GOING  # two 3s in the pool: both may be used
    assert TASK.check(p, ["3-3=0", "5-0=5"]) == FAIL  # 0 is a valid intermediate; one number left
    assert TASK.check(p, ["5-3=2"]) == OK


def test_normalize_step():
    assert TASK.normalize_step("3+4=7") == TASK.normalize_step("4 + 3 = 7") == "4+3=7"
    assert TASK.normalize_step("3 * 9 = 27") == "9*3=27"
    assert TASK.normalize_step("9-3=6") == "9-3=6"  # non-commutative: order kept
    assert TASK.normalize_step("3-9=6") == "3-9=6"
    assert TASK.normalize_step(" hello  world ") == "helloworld"


def test_solver_known_cases():
    assert solve([3, 7, 9, 4], 24) == ["9-3=6", "6*4=24"]
    assert solve([1, 1], 5) is None
    assert solve([2, 2], 4) == ["2+2=4"]
    assert solve([5, 2], 5) is None  # target among the numbers still needs a step producing it
    assert solve([5, 5, 1], 5) == ["5*1=5"]


@settings(max_examples=150, deadline=None)
@given(numbers=st.lists(st.integers(1, 12), min_size=2, max_size=4), target=st.integers(0, 100))
def test_solver_solutions_verify(numbers, target):
    steps = solve(numbers, target)
    if steps is not None:
        assert TASK.verify(make_problem("h", numbers, target), steps), (numbers, target, steps)
        assert len(steps) <= len(numbers) - 1
        assert steps == solve(list(reversed(numbers)), target)  # order of numbers does not matter
        assert all(TASK.normalize_step(s) == s for s in steps)  # solver writes canonical steps


def _brute_force_solvable(numbers: list[int], target: int) -> bool:
    # Reference: plain recursion over ordered pairs (no memo, no canonical ordering).
    for i, a in enumerate(numbers):
        for j, b in enumerate(numbers):
            if i == j:
                continue
            rest = [v for k, v in enumerate(numbers) if k not in (i, j)]
            for c in (a + b, a * b, a - b if a >= b else None, a // b if b and a % b == 0 else None):
                if c is not None and (c == target or (rest and _brute_force_solvable([*rest, c], target))):
                    return True
    return False


@settings(max_examples=100, deadline=None)
@given(numbers=st.lists(st.integers(1, 9), min_size=2, max_size=4), target=st.integers(1, 60))
def test_solver_matches_brute_force(numbers, target):
    assert (solve(numbers, target) is not None) == _brute_force_solvable(numbers, target)


def test_generator_deterministic_and_solvable():
    a = generate_problems(300, seed=7)
    assert a == generate_problems(300, seed=7)
    assert [p.meta for p in a] == [p.meta for p in generate_problems(300, seed=7)]
    assert [p.meta for p in a] != [p.meta for p in generate_problems(300, seed=8)]
    assert [p.id for p in a[:2]] == ["cd-7-0", "cd-7-1"]
    d = CountdownDifficulty()
    for p in a:
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert d.min_numbers <= len(numbers) <= d.max_numbers
        assert all(d.min_number <= v <= d.max_number for v in numbers)
        assert d.min_target <= target <= d.max_target and target not in numbers
        assert p.answer == str(target) and p.question == TASK.prompt(p)[:-1]
        assert TASK.verify(p, solve(numbers, target))


def test_generator_speed_and_settings():
    start = time.perf_counter()
    generate_problems(3000, seed=123)
    assert time.perf_counter() - start < 3.0  # thousands per second at the default difficulty
    hard = generate_problems(20, seed=1, difficulty=CountdownDifficulty(5, 5, max_number=20, max_target=100))
    assert all(
        len(p.meta["numbers"]) == 5 and TASK.verify(p, solve(p.meta["numbers"], p.meta["target"]))
        for p in hard
    )
    with pytest.raises(TaskInputError, match="max_numbers"):
        CountdownDifficulty(min_numbers=3, max_numbers=7)
    with pytest.raises(TaskInputError, match="min_target"):
        CountdownDifficulty(min_target=50, max_target=10)


# --- problem files ---------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_jsonl_and_parquet(tmp_path):
    rows = [{"id": "a", "numbers": [3, 7, 9, 4], "target": 24}, {"id": 2, "numbers": [2, 2], "target": 4}]
    problems = load_countdown_file(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert problems == [make_problem("a", [3, 7, 9, 4], 24), make_problem("2", [2, 2], 4)]
    assert problems[0].meta == {"numbers": [3, 7, 9, 4], "target": 24}

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:1] + [{**rows[1], "id": "2"}]), tmp_path / "p.parquet")
    assert load_countdown_file(tmp_path / "p.parquet") == problems


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"id": "x", "numbers": "abc", "target": 5}, "'numbers' must be a list of 2-6 positive integers"),
        ({"id": "x", "numbers": [1], "target": 5}, "'numbers' must be a list"),
        ({"id": "x", "numbers": [1, 2, 3, 4, 5, 6, 7], "target": 5}, "'numbers' must be a list"),
        ({"id": "x", "numbers": [1, 0], "target": 5}, "'numbers'"),
        ({"id": "x", "numbers": [1, True], "target": 5}, "'numbers'"),
        ({"id": "x", "numbers": [1, 2.5], "target": 5}, "'numbers'"),
        ({"id": "x", "numbers": [1, 2]}, "'target' must be a positive integer"),
        ({"id": "x", "numbers": [1, 2], "target": "3"}, "'target'"),
        ({"id": "", "numbers": [1, 2], "target": 3}, "'id' must be"),
        ({"id": "a", "numbers": [1, 2], "target": 3}, 'duplicate id "a" \\(first used on line 1\\)'),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path, bad_row, message):
    path = _write_jsonl(tmp_path / "problems.jsonl", [{"id": "a", "numbers": [1, 2], "target": 3}, bad_row])
    with pytest.raises(TaskInputError, match=message) as info:
        load_countdown_file(path)
    text = str(info.value)
    assert text.startswith("problems.jsonl line 2: ") and "\n" not in text


def test_load_file_level_errors(tmp_path):
    with pytest.raises(TaskInputError, match="does not exist"):
        load_countdown_file(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskInputError, match="has no rows"):
        load_countdown_file(tmp_path / "empty.jsonl")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TaskInputError, match="cannot read parquet file bad.parquet"):
        load_countdown_file(tmp_path / "bad.parquet")
    # Blank lines count, so the line number matches an editor's.
    _write_jsonl(tmp_path / "gap.jsonl", [{"id": "a", "numbers": [1, 2], "target": 3}, "", {"id": "b"}])
    with pytest.raises(TaskInputError, match="^gap.jsonl line 3: 'numbers'"):
        load_countdown_file(tmp_path / "gap.jsonl")


# --- robustness --------------------------------------------------------------------------------

HOSTILE = [
    "__import__('os').system('x')",
    "9" * 100000,
    "9" * 100000 + "+1=1",
    "1+" + "9" * 30 + "=" + "9" * 30,
    " " * 50000 + "9-3=6",
    "9-3=6" + " " * 50000,
    "1" + " " * 30000 + "+",
    "(9-3)*4=24",
    "9**9=387420489",
    "\x00\n\r\t",
    "٣+٤=٧",  # non-ASCII digits: int() reads them as 3+4=7, the parser must not
]


def _timed_check(steps: list[str]) -> StepCheck:
    start = time.perf_counter()
    result = TASK.check(P24, steps)
    assert time.perf_counter() - start < 0.05, steps[0][:40]
    TASK.normalize_step(steps[-1])
    assert time.perf_counter() - start < 0.05, steps[0][:40]
    return result


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_steps(text):
    assert _timed_check([text]) == FAIL
    assert _timed_check(["9-3=6", text]) == FAIL


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(max_size=80) | st.from_regex(r"\s*\d{1,25}\s*[-+*/]\s*\d{1,25}\s*=\s*\d{1,25}\s*"), max_size=5
    )
)
def test_check_fuzz(steps):
    result = _timed_check(steps or [""]) if steps else TASK.check(P24, steps)
    assert isinstance(result, StepCheck)
    assert result.terminal == (result.success is not None)


def test_no_eval_or_exec_in_tasks_package():
    package = Path(__file__).resolve().parents[1] / "mcts" / "tasks"
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "eval(" not in text and "exec(" not in text, source.name
