"""Countdown: reach a target from a few numbers with + - * /, one operation per step.

Formats (other modules and trained models depend on these; do not change them lightly):

| what            | format                                | example            |
|-----------------|---------------------------------------|--------------------|
| prompt          | `"<n1> <n2> ... -> <target>\\n"`       | `"3 7 9 4 -> 24\\n"` |
| Problem.question| the prompt without its newline        | `"3 7 9 4 -> 24"`  |
| Problem.answer  | `str(target)`                         | `"24"`             |
| Problem.meta    | `{"numbers": [ints], "target": int}`  |                    |
| step (canonical)| `"<a><op><b>=<c>"`, op in `+ - * /`   | `"7*4=28"`         |

Rules checked by `CountdownTask.check` (exact, integer-only):
- the pool starts as the multiset of numbers; a step takes two operands out of the pool and puts
  its result back, so each number (and each intermediate result) is used at most once;
- division only when exact and the divisor is not 0; every result must be non-negative
  (`a-b` needs `a >= b`), so intermediate values are always natural numbers;
- the written result `c` must equal the computed one;
- success as soon as a step's result equals the target (remaining numbers need not be used);
  failure on any invalid or empty step, or when a single number that is not the target is left.

The parser accepts spaces around tokens (`"7 * 4 = 28"`) but nothing else: no other symbols, no
trailing text. It never evaluates text; steps longer than MAX_STEP_CHARS are rejected before
the regex runs and every number is at most MAX_DIGITS digits, so any string is checked in
bounded time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mcts.tasks.base import Problem, StepCheck, TaskInputError, content_key
from mcts.tasks.files import check_unique_id, quote, read_rows, row_error, row_id

MAX_STEP_CHARS = 64  # longest step the parser looks at (three 18-digit numbers fit)
MAX_DIGITS = 18  # digits per number: keeps int() and the arithmetic cheap
MIN_NUMBERS, MAX_NUMBERS = 2, 6  # how many starting numbers a problem may have
MAX_VALUE = 10**6  # largest starting number or target a problem file may hold

# Disjoint token classes (\s, \d, operator, "=") make this linear: no nested quantifiers.
# re.ASCII: without it \d matches other scripts' digits ("٣+٤=٧"), which int() would accept.
_STEP_RE = re.compile(
    rf"\s*(\d{{1,{MAX_DIGITS}}})\s*([-+*/])\s*(\d{{1,{MAX_DIGITS}}})\s*=\s*(\d{{1,{MAX_DIGITS}}})\s*",
    re.ASCII,
)
_COMMUTATIVE = frozenset("+*")
_OPS = ("+", "-", "*", "/")  # fixed order: the solver's tie-breaking is deterministic

_SUCCESS = StepCheck(terminal=True, success=True)
_FAIL = StepCheck(terminal=True, success=False)
_GOING = StepCheck(terminal=False, success=None)


def parse_step(step: str) -> tuple[int, str, int, int] | None:
    """`(a, op, b, c)` of a step like `"7*4=28"` / `" 7 * 4 = 28"`, or None if it does not parse."""
    if len(step) > MAX_STEP_CHARS:
        return None
    match = _STEP_RE.fullmatch(step)
    if match is None:
        return None
    a, op, b, c = match.groups()
    return int(a), op, int(b), int(c)


def apply_op(a: int, op: str, b: int) -> int | None:
    """Exact result of `a op b`, or None when the rules forbid it (negative, inexact or /0)."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a >= b else None
    if b == 0 or a % b:
        return None
    return a // b


def format_step(a: int, op: str, b: int, c: int) -> str:
    """Canonical text of a step: no spaces, larger operand first for + and *."""
    if op in _COMMUTATIVE and b > a:
        a, b = b, a
    return f"{a}{op}{b}={c}"


def make_problem(problem_id: str, numbers: list[int], target: int) -> Problem:
    """A Countdown Problem in the exact format described in the module docstring."""
    numbers = [int(n) for n in numbers]
    question = f"{' '.join(map(str, numbers))} -> {int(target)}"
    return Problem(
        id=problem_id,
        question=question,
        answer=str(int(target)),
        meta={"numbers": numbers, "target": int(target)},
    )


def _numbers_and_target(problem: Problem) -> tuple[list[int], int]:
    try:
        return list(problem.meta["numbers"]), int(problem.meta["target"])
    except (KeyError, TypeError, ValueError):
        raise TaskInputError(
            f"problem {problem.id!r} is not a Countdown problem: meta needs 'numbers' and 'target' "
            "(build it with mcts.tasks.countdown.make_problem)"
        ) from None


@dataclass
class CountdownTask:
    """The Countdown task (see the module docstring for the exact formats and rules)."""

    name: str = "countdown"
    step_separator: str = "\n"

    def prompt(self, problem: Problem) -> str:
        numbers, target = _numbers_and_target(problem)
        return f"{' '.join(map(str, numbers))} -> {target}\n"

    def check(self, problem: Problem, steps: list[str]) -> StepCheck:
        """Walk the steps over the pool of numbers; stop at the first terminal step.

        Steps after a terminal one are not looked at (the search never generates them).
        """
        numbers, target = _numbers_and_target(problem)
        pool: dict[int, int] = {}  # a plain dict: Counter() costs ~7 us to build, and this runs per node
        for n in numbers:
            pool[n] = pool.get(n, 0) + 1
        remaining = len(numbers)
        for step in steps:
            parsed = parse_step(step)
            if parsed is None:
                return _FAIL
            a, op, b, c = parsed
            pool[a] = pool.get(a, 0) - 1  # take both operands out first so "3+3" needs two 3s
            pool[b] = pool.get(b, 0) - 1
            if pool[a] < 0 or pool[b] < 0:
                return _FAIL
            if apply_op(a, op, b) != c:
                return _FAIL
            if c == target:
                return _SUCCESS
            pool[c] = pool.get(c, 0) + 1
            remaining -= 1
            if remaining <= 1:
                return _FAIL
        return _GOING

    def normalize_step(self, step: str) -> str:
        """Canonical form for state merge: `"4 + 3 = 7"` -> `"4+3=7"`; unparsable text loses its spaces."""
        parsed = parse_step(step)
        if parsed is None:
            return "".join(step.split())
        return format_step(*parsed)

    def verify(self, problem: Problem, steps: list[str]) -> bool:
        """True iff the steps reach the target by the rules."""
        return self.check(problem, steps).success is True


# ----------------------------------------------------------------------------------------------
# Exact solver. `_reach(pool)` maps every value obtainable from a sorted pool to one shortest step
# list producing it (starting numbers map to no steps). It is memoized on the sorted pool, and
# sub-pools are shared between problems, so generating many problems costs little after warm-up.


@lru_cache(maxsize=1 << 16)
def _reach(pool: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """Every value some step sequence from `pool` (sorted) produces -> a shortest such sequence.

    Only produced values are listed (a starting number appears only if a step can make it), so
    the sequence is never empty. A shortest sequence never makes its value earlier, which is what
    `check` needs: it stops at the first step whose result is the target.
    """
    best: dict[int, tuple[str, ...]] = {}
    seen: set[tuple[int, int]] = set()
    for i in range(len(pool)):
        for j in range(i):
            a, b = pool[i], pool[j]  # sorted pool: a >= b, the only order "-" and "/" allow
            if (a, b) in seen:  # equal numbers in the pool give the same moves
                continue
            seen.add((a, b))
            rest = pool[:j] + pool[j + 1 : i] + pool[i + 1 :]
            for op in _OPS:
                c = apply_op(a, op, b)
                if c is None:
                    continue
                head = (format_step(a, op, b, c),)
                if c not in best:  # one step is as short as it gets; the first found wins
                    best[c] = head
                if not rest:
                    continue
                for value, tail in _reach(tuple(sorted((*rest, c)))).items():
                    known = best.get(value)
                    if known is None or len(known) > len(tail) + 1:
                        best[value] = head + tail
    return best


def solve(numbers: list[int], target: int) -> list[str] | None:
    """A shortest canonical step list that reaches `target` from `numbers`, or None if none exists.

    Deterministic (same input, same steps). The result always passes `CountdownTask.verify`.
    """
    steps = _reach(tuple(sorted(int(n) for n in numbers))).get(int(target))
    return None if steps is None else list(steps)


# ----------------------------------------------------------------------------------------------
# Problem generation.


@dataclass(frozen=True)
class CountdownDifficulty:
    """How hard generated Countdown problems are. The defaults are the built-in task's.

    The default (3-4 numbers from 1-9, targets 1-60) is what a sub-1M-parameter model can partly
    learn in minutes on CPU (see DESIGN.md); larger settings are allowed for real models.
    """

    min_numbers: int = 3  # fewest starting numbers in a problem (>= 2)
    max_numbers: int = 4  # most starting numbers in a problem (<= 6; 6 makes the solver ~0.5 s/pool)
    max_number: int = 9  # largest starting number (each is drawn uniformly from min_number..max_number)
    max_target: int = 60  # largest target
    min_target: int = 1  # smallest target
    min_number: int = 1  # smallest starting number (>= 1)

    def __post_init__(self) -> None:
        # Checked here so a bad Hydra override fails at startup with the field name in the message.
        if not MIN_NUMBERS <= self.min_numbers <= self.max_numbers <= MAX_NUMBERS:
            raise TaskInputError(
                f"countdown difficulty: need {MIN_NUMBERS} <= min_numbers <= max_numbers <= {MAX_NUMBERS}, "
                f"got min_numbers={self.min_numbers}, max_numbers={self.max_numbers}"
            )
        if not 1 <= self.min_number <= self.max_number <= MAX_VALUE:
            raise TaskInputError(
                f"countdown difficulty: need 1 <= min_number <= max_number <= {MAX_VALUE}, "
                f"got min_number={self.min_number}, max_number={self.max_number}"
            )
        if not 0 <= self.min_target <= self.max_target <= MAX_VALUE:
            raise TaskInputError(
                f"countdown difficulty: need 0 <= min_target <= max_target <= {MAX_VALUE}, "
                f"got min_target={self.min_target}, max_target={self.max_target}"
            )


# Draws that find no reachable target in range before giving up (a range no pool can reach).
_MAX_DRAWS_PER_PROBLEM = 1000


def generate_problems(n: int, seed: int = 0, difficulty: CountdownDifficulty | None = None) -> list[Problem]:
    """`n` solvable Countdown problems, ids `cd-<seed>-<i>`, the same list for the same arguments.

    Each problem draws its count of numbers and the numbers uniformly, then a target uniformly
    among the values in [min_target, max_target] that some step sequence produces and that are not
    already starting numbers. Drawing among reachable targets (rather than drawing a target and
    rejecting unsolvable ones) costs one memoized solver call per problem.
    """
    difficulty = difficulty or CountdownDifficulty()
    if n < 0:
        raise TaskInputError(f"countdown: num_problems must be >= 0, got {n}")
    rng = random.Random(seed)
    problems: list[Problem] = []
    for i in range(n):
        for _ in range(_MAX_DRAWS_PER_PROBLEM):
            count = rng.randint(difficulty.min_numbers, difficulty.max_numbers)
            numbers = [rng.randint(difficulty.min_number, difficulty.max_number) for _ in range(count)]
            reachable = _reach(tuple(sorted(numbers)))
            candidates = sorted(
                v
                for v in reachable
                if difficulty.min_target <= v <= difficulty.max_target and v not in numbers
            )
            if candidates:
                problems.append(make_problem(f"cd-{seed}-{i}", numbers, rng.choice(candidates)))
                break
        else:
            raise TaskInputError(
                f"countdown: no solvable problem found in {_MAX_DRAWS_PER_PROBLEM} draws with {difficulty}: "
                "widen the target range (min_target/max_target) or the numbers"
            )
    return problems


def distinct_problems(
    n: int, seed: int = 0, difficulty: CountdownDifficulty | None = None, exclude: Iterable[str] = ()
) -> list[Problem]:
    """The first `n` problems of `generate_problems(..., seed)` that are distinct by content
    (`content_key`: sorted numbers and target) and not in `exclude` (content keys): a problem drawn
    twice is searched once, a held-out one never. Ids keep their generator index, so a problem has
    the same id here and in `generate_problems`."""
    out: list[Problem] = []
    size = n
    while len(out) < n:
        size = 2 * size + 16  # the generator is prefix-stable: a longer list starts with the shorter one
        out, seen = [], set(exclude)
        for p in generate_problems(size, seed, difficulty):
            key = content_key(p.question, p.meta)
            if key not in seen and len(out) < n:
                seen.add(key)
                out.append(p)
        if size > 64 * n + 1024:
            raise TaskInputError(
                f"countdown: only {len(out)} distinct problems of {n} asked for exist at {difficulty}: "
                "ask for fewer (task.num_problems) or widen the difficulty"
            )
    return out


# ----------------------------------------------------------------------------------------------
# Problem files: JSONL or parquet rows with `id`, `numbers`, `target`.


def load_countdown_file(path: str | Path) -> list[Problem]:
    """Countdown problems from a JSONL or parquet file with columns `id`, `numbers`, `target`.

    | column  | type                                   |
    |---------|----------------------------------------|
    | id      | string or int, unique (optional: defaults to `<file stem>-<line>`) |
    | numbers | list of 2-6 positive integers          |
    | target  | positive integer                       |

    Any bad row raises TaskInputError naming the file, the line and what to fix. Solvability is
    not checked (a 6-number pool takes the solver ~0.5 s); unsolvable problems simply never succeed.
    """
    path = Path(path)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, row in read_rows(path):
        problem_id = row_id(path, line, row)
        numbers = row.get("numbers")
        if not (
            isinstance(numbers, list)
            and MIN_NUMBERS <= len(numbers) <= MAX_NUMBERS
            and all(_is_int(v) and 1 <= v <= MAX_VALUE for v in numbers)
        ):
            raise row_error(
                path,
                line,
                f"'numbers' must be a list of {MIN_NUMBERS}-{MAX_NUMBERS} positive integers "
                f"(each <= {MAX_VALUE}), got {quote(numbers)}",
            )
        target = row.get("target")
        if not (_is_int(target) and 1 <= target <= MAX_VALUE):
            raise row_error(
                path, line, f"'target' must be a positive integer <= {MAX_VALUE}, got {quote(target)}"
            )
        check_unique_id(path, line, problem_id, seen)
        problems.append(make_problem(problem_id, numbers, target))
    return problems


def _is_int(value: object) -> bool:
    # bool is an int subclass; `true` in a JSON file is a mistake, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)
