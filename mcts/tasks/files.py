"""Reading problem files (JSONL or parquet) row by row, with errors that name the file and line.

Both file tasks (Countdown, jsonl) share this reader so that every bad input is reported the same
way: one line, `<file> line <n>: <what is wrong and how to fix it>`. For parquet files the "line"
is the 1-based row number, which is what a user sees in `pandas.read_parquet(...)` + 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mcts.tasks.base import TaskInputError

# Rows are user data: quote them in errors only this far, so a huge bad cell stays one line.
_MAX_QUOTE = 60


def quote(value: object) -> str:
    """A short JSON-ish rendering of a bad value for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def row_error(path: Path, line: int, message: str) -> TaskInputError:
    """The one-line error for a bad row: `<file name> line <n>: <message>`."""
    return TaskInputError(f"{path.name} line {line}: {message}")


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, row)` for every row of a JSONL or parquet file.

    Parquet is chosen by the `.parquet` / `.pq` suffix, anything else is read as JSONL (one JSON
    object per line; blank lines are skipped but still counted, so numbers match an editor's).
    Raises TaskInputError for a missing file, an unreadable file, a line that is not a JSON object,
    or a file with no rows at all.
    """
    path = Path(path)
    if not path.exists():
        raise TaskInputError(f"problem file {str(path)!r} does not exist: check task.path")
    if not path.is_file():
        raise TaskInputError(
            f"problem file {str(path)!r} is not a file: point task.path at a .jsonl or .parquet file"
        )
    rows = _read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else _read_jsonl(path)
    seen_any = False
    for line, row in rows:
        seen_any = True
        yield line, row
    if not seen_any:
        raise TaskInputError(f"problem file {path.name} has no rows: add at least one problem")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise TaskInputError(f"cannot read problem file {path.name}: {exc.strerror}") from None
    with handle:
        try:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise row_error(
                        path, line_no, f"not valid JSON ({exc.msg}): each line must be one JSON object"
                    ) from None
                except (ValueError, RecursionError) as exc:  # a 5,000-digit number, deep nesting
                    what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
                    raise row_error(path, line_no, f"not a usable JSON object ({what})") from None
                if not isinstance(row, dict):
                    raise row_error(
                        path, line_no, f"expected a JSON object with named fields, got {quote(row)}"
                    )
                yield line_no, row
        except UnicodeDecodeError:
            raise TaskInputError(
                f"problem file {path.name} is not UTF-8 text: save it as UTF-8 JSONL"
            ) from None


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    # pyarrow is a declared dependency; imported here so text-only users never pay for it.
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise TaskInputError(f"cannot read parquet file {path.name}: {str(exc).splitlines()[0]}") from None
    yield from enumerate(table.to_pylist(), start=1)


def check_unique_id(path: Path, line: int, problem_id: str, seen: dict[str, int]) -> None:
    """Record `problem_id` in `seen` (id -> first line) or raise if it was used before."""
    first = seen.get(problem_id)
    if first is not None:
        raise row_error(
            path, line, f"duplicate id {quote(problem_id)} (first used on line {first}): ids must be unique"
        )
    seen[problem_id] = line


def row_id(path: Path, line: int, row: dict) -> str:
    """The problem id of a row: its `id` field (a non-empty string or an integer).

    A row without `id` gets `<file stem>-<line>`, so files such as GSM8K's (question/answer only)
    load as they are; an explicit but malformed id is an error.
    """
    if "id" not in row or row["id"] is None:
        return f"{path.stem}-{line}"
    value = row["id"]
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int))
        or (isinstance(value, str) and not value.strip())
    ):
        raise row_error(path, line, f"'id' must be a non-empty string or an integer, got {quote(value)}")
    return str(value)
