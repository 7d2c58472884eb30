"""Word problems with a numeric answer (GSM8K style), read from a JSONL or parquet file.

File columns (one problem per row):

| column   | type                                                   | example                       |
|----------|--------------------------------------------------------|-------------------------------|
| id       | string or int, unique (optional: `<file stem>-<line>`) | `"gsm-17"`                    |
| question | non-empty string                                       | `"Ann has 3 apples and ..."`  |
| answer   | number, or text whose final answer follows `####`      | `42`, `"3 + 4 = 7\\n#### 7"`  |

Formats:
- prompt: `"Question: <question>\\nAnswer:\\n"`; a step ends at `step_separator`: one line each by
  default, paragraphs with `"\\n\\n"` (the step layout of OpenR or PRM800K-style data);
- a step line that starts with `####` (after leading spaces) is the final answer, e.g.
  `"#### 1,234"`; it succeeds iff its number equals the reference exactly;
- a partial solution with `max_steps` steps and no answer is a terminal failure.

Numbers are compared exactly as fractions: `,` `$` and spaces are removed, an optional sign, then
an integer, a decimal (`0.75`, `.5`) or a fraction (`3/4`); a final `.` (end of sentence) is
ignored. Anything else after `####` (units, words) does not count as an answer. Text longer than
MAX_NUMBER_CHARS is never parsed, so checking is bounded in time on any input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from mcts.tasks.base import Problem, StepCheck, TaskInputError
from mcts.tasks.files import check_unique_id, quote, read_rows, row_error, row_id

ANSWER_MARK = "####"
MAX_NUMBER_CHARS = 64  # longer "numbers" are not answers (and Fraction on huge text is slow)

# ASCII only: int()/Fraction() accept other scripts' digits, a verifier should not.
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+|\d+/\d+)", re.ASCII)
_STRIP = str.maketrans("", "", ",$ \t")

_FAIL = StepCheck(terminal=True, success=False)
_SUCCESS = StepCheck(terminal=True, success=True)
_GOING = StepCheck(terminal=False, success=None)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a written number (`"1,234"`, `"$5.50"`, `"-3/4"`, `"7."`), or None."""
    if len(text) > 4 * MAX_NUMBER_CHARS:  # before cleaning: bounds the translate/strip work too
        return None
    cleaned = text.translate(_STRIP).strip()
    if cleaned.endswith(".") and not cleaned.endswith(".."):
        cleaned = cleaned[:-1]
    if not cleaned or len(cleaned) > MAX_NUMBER_CHARS or _NUMBER_RE.fullmatch(cleaned) is None:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):  # "3/0"
        return None


def final_answer(step: str) -> str | None:
    """The text after `####` of the first answer line of `step` (a one-line step is its own line),
    else None."""
    for line in step.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith(ANSWER_MARK):
            return stripped[len(ANSWER_MARK) :]
    return None


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` read as a newline, a tab and a backslash: a command line
    (`task.step_separator='\\n\\n'`) passes them as two characters each."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _reference(problem: Problem) -> Fraction:
    value = problem.meta.get("answer_value")
    parsed = parse_number(value if isinstance(value, str) else problem.answer)
    if parsed is None:
        raise TaskInputError(
            f"problem {problem.id!r}: reference answer {quote(problem.answer)} is not a number "
            "(build problems with mcts.tasks.jsonl.make_problem or load_jsonl_file)"
        )
    return parsed


def make_problem(problem_id: str, question: str, answer: str | int | float) -> Problem:
    """A jsonl-task Problem; `answer` is a number or GSM8K text ending in `#### <number>`.

    Problem.answer holds the final answer text (after `####`), meta holds `answer_value` (the exact
    value as `"p/q"` or `"n"`) and `solution` (the worked solution before `####`, may be empty).
    Raises TaskInputError when no number can be read from `answer`.
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TaskInputError(f"answer must be a number or a string, got {quote(answer)}")
    text = _float_text(answer) if isinstance(answer, float) else str(answer)
    solution, mark, final = text.rpartition(ANSWER_MARK)
    final = final.strip()
    value = parse_number(final)
    if value is None:
        where = "the text after '####'" if mark else "it"
        raise TaskInputError(
            f"answer {quote(text)} has no number to check against: {where} must be a number like 42, 3.5 or 3/4"
        )
    return Problem(
        id=problem_id,
        question=question,
        answer=final,
        meta={"answer_value": str(value), "solution": solution.strip() if mark else ""},
    )


def _float_text(value: float) -> str:
    # repr is the shortest decimal that round-trips (0.1 -> "0.1", read back as exactly 1/10);
    # exponent forms ("1e+20") are written out as an exact integer or fraction instead.
    text = repr(value)
    if "e" in text:  # "nan" and "inf" have no "e": they stay as they are and fail to parse
        text = str(Fraction(text))
    return text


@dataclass
class JsonlTask:
    """Step-by-step reasoning (a line a step by default) ending in a `#### <number>` line (see the
    module docstring)."""

    name: str = "jsonl"
    step_separator: str = "\n"  # the job's config reads backslash escapes in it (`unescape`)
    max_steps: int = 16  # steps before a solution without an answer counts as failed

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise TaskInputError(f"jsonl task: max_steps must be >= 1, got {self.max_steps}")
        if (
            not isinstance(self.step_separator, str)
            or not self.step_separator
            or ANSWER_MARK in self.step_separator
        ):
            raise TaskInputError(
                f"jsonl task: step_separator={self.step_separator!r} must be non-empty text without "
                f"{ANSWER_MARK!r}, e.g. task.step_separator='\\n' (one line a step) or '\\n\\n' (paragraphs)"
            )

    def prompt(self, problem: Problem) -> str:
        return f"Question: {problem.question}\nAnswer:\n"

    def check(self, problem: Problem, steps: list[str]) -> StepCheck:
        """Terminal at the first `####` line (success iff its number matches) or after max_steps steps."""
        for step in steps[: self.max_steps]:
            answer = final_answer(step)
            if answer is not None:
                value = parse_number(answer)
                return _SUCCESS if value is not None and value == _reference(problem) else _FAIL
        return _FAIL if len(steps) >= self.max_steps else _GOING

    def normalize_step(self, step: str) -> str:
        """Whitespace collapsed and lowercased: `"So  X = 4"` and `"so x = 4"` merge."""
        return " ".join(step.split()).lower()

    def verify(self, problem: Problem, steps: list[str]) -> bool:
        """True iff the steps end in a correct `####` answer."""
        return self.check(problem, steps).success is True


def load_jsonl_file(path: str | Path) -> list[Problem]:
    """Problems from a JSONL or parquet file with `id`, `question`, `answer` (see the table above).

    Any bad row raises TaskInputError naming the file, the line and what to fix.
    """
    path = Path(path)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, row in read_rows(path):
        problem_id = row_id(path, line, row)
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise row_error(path, line, f"'question' must be a non-empty string, got {quote(question)}")
        if "answer" not in row or row["answer"] is None:
            raise row_error(
                path, line, "'answer' is missing: give the final number, e.g. 42 or \"... #### 42\""
            )
        try:
            problem = make_problem(problem_id, question, row["answer"])
        except TaskInputError as exc:
            raise row_error(path, line, f"'answer': {exc}") from None
        check_unique_id(path, line, problem_id, seen)
        problems.append(problem)
    return problems
