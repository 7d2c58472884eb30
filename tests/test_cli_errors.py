"""Bad input to `arborist search`: one line on stderr, exit status 2, no traceback, nothing written.

Two cases run the real command in a subprocess (what a user sees); the rest call `rewards.cli.main`
in-process, which is the same code path up to the point where a check fails (all of these fail in
the checks that run before Hydra, Ray or the output directory are touched). No test here needs Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.cli import main


def _check_one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("arborist: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.fixture(autouse=True)
def no_job(monkeypatch):
    """Input that wrongly passes the checks must fail the test, not start a whole job."""

    def started() -> None:
        raise AssertionError("the checks let bad input through to the job")

    monkeypatch.setattr("rewards.pipeline.main", started)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


def _nothing_written(out: Path) -> None:
    assert not out.exists(), f"bad input created {sorted(p.name for p in out.rglob('*'))}"


@pytest.fixture(scope="module")
def malformed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "problems.jsonl"
    path.write_text('{"id": "a", "question": "1 + 1?", "answer": 2}\n{"id": "b", "question": \n')
    return path


def test_malformed_problem_file_in_a_subprocess(malformed_file, out):
    cmd = [
        sys.executable,
        "-m",
        "rewards.cli",
        "search",
        "task=jsonl",
        f"task.path={malformed_file}",
        f"out={out}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    _check_one_line(done.stderr, "problems.jsonl line 2")
    _nothing_written(out)


def test_invalid_number_in_a_subprocess(out):
    cmd = [sys.executable, "-m", "rewards.cli", "search", "search.simulations=abc", f"out={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    _check_one_line(done.stderr, "search.simulations")
    _nothing_written(out)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["search.simulations=-3"], ["search.simulations must be >= 1, got -3"]),
        (["search.simulations=abc"], ["search.simulations", "'abc'"]),
        (["task.num_problems=0"], ["task.num_problems must be >= 1"]),
        (["task.num_problems=1.5"], ["task.num_problems"]),
        (["ray.num_workers=0"], ["ray.num_workers must be >= 1"]),
        (["policy.temperature=-1"], ["policy.temperature"]),
        (["rewards.min_margin=2"], ["rewards.min_margin"]),
        (["search.batch_problems=0"], ["search.batch_problems"]),
        (["task=nope"], ["unknown task 'nope'", "countdown", "jsonl"]),
        (["search.nope=1"], ["search.nope"]),
        (["task=jsonl"], ["task.path"]),
        (["task=jsonl", "task.path=/nonexistent/problems.jsonl"], ["/nonexistent/problems.jsonl"]),
        (["policy.path=/nonexistent/model"], ["policy.path=/nonexistent/model", "does not exist"]),
        (["policy=hf"], ["policy.path"]),
        (["critics.value_path=/nonexistent/critic"], ["critics.value_path"]),
    ],
)
def test_bad_input_is_one_line(overrides, needles, out, capsys):
    assert main(["search", *overrides, f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, *needles)
    _nothing_written(out)


def test_pickle_weights_are_refused(tmp_path, out, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    (model / "tokenizer.json").write_text("{}")
    assert main(["search", f"policy.path={model}", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, "pickle weights", "save_pretrained")
    _nothing_written(out)


def test_a_finished_problem_is_never_reported_twice_on_bad_input(tmp_path, capsys):
    """An existing output directory with another batch layout is refused, and left as it was."""
    from rewards.export import MANIFEST

    out = tmp_path / "out"
    out.mkdir()
    manifest = {"shards": {"shard-00000": {"problem_ids": ["cd-0-5"]}}, "finished_problem_ids": ["cd-0-5"]}
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert main(["search", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, "search.batch_problems")
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_unknown_command(capsys):
    assert main(["serch"]) == 2
    _check_one_line(capsys.readouterr().err, "serch", "search")
