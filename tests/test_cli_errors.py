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
        (["ray.batches_per_worker=0"], ["ray.batches_per_worker must be >= 1"]),
        (["policy.temperature=-1"], ["policy.temperature"]),
        (["rewards.min_margin=2"], ["rewards.min_margin"]),
        (["search.batch_problems=0"], ["search.batch_problems"]),
        (["task=nope"], ["unknown task 'nope'", "countdown", "jsonl"]),
        (["search.nope=1"], ["search.nope"]),
        (["search.simulations"], ["override 'search.simulations' has no value", "search.simulations=VALUE"]),
        (["+nope=1"], ["unknown setting 'nope'"]),  # Hydra's `+` adds keys; the schema has none
        (["+search.simulatons=8"], ["unknown setting 'search.simulatons'"]),
        (["task=jsonl"], ["task.path"]),
        (["task=jsonl", "task.path=/nonexistent/problems.jsonl"], ["/nonexistent/problems.jsonl"]),
        (["task=jsonl", "task.path=p.jsonl", "task.step_separator=''"], ["step_separator=''", "'\\n\\n'"]),
        (["policy.path=/nonexistent/model"], ["policy.path=/nonexistent/model", "does not exist"]),
        (["policy=hf"], ["policy.path"]),
        (["critics.value_path=/nonexistent/critic"], ["critics.value_path"]),
        (["ray.address=127.0.0.1:1"], ["ray.address=127.0.0.1:1", "no Ray cluster reachable"]),
    ],
)
def test_bad_input_is_one_line(overrides, needles, out, capsys):
    assert main(["search", *overrides, f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, *needles)
    _nothing_written(out)


def test_an_out_dir_with_files_of_its_own_names_and_no_manifest(tmp_path, capsys):
    """`out=.` in a project: its README.md would be replaced by the dataset card. Refused, untouched."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert main(["search", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, "README.md", "no arborist manifest")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]
    (out / "README.md").unlink()  # other files of the user's are fine: nothing of the job's is named so
    from rewards.config import compose
    from rewards.pipeline import check_config

    assert check_config(compose([f"out={out}"])).out == out.resolve()


def test_a_policy_path_that_is_a_file(tmp_path, out, capsys):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    assert main(["search", f"policy.path={model}", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, "is a file", "directory")
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


def test_a_second_job_on_an_out_dir_is_refused_before_ray_and_the_models_start(tmp_path, monkeypatch):
    """The out dir's lock is taken right after the settings are checked: a second job must not
    first start Ray or build the embedded models (~25 minutes from an empty cache) to learn it."""
    import os

    from rewards import launcher, pipeline
    from rewards.config import compose
    from rewards.export import OutDirError, lock_out_dir

    out = tmp_path / "out"
    out.mkdir()
    held = lock_out_dir(out)

    def too_late(*args, **kwargs):
        raise AssertionError("Ray started before the lock was checked")

    monkeypatch.setattr(launcher, "connect", too_late)
    try:
        with pytest.raises(OutDirError, match=f"in use by another arborist job \\(pid {os.getpid()}\\)"):
            pipeline.run(compose([f"out={out}", "experiment=tiny"]))
    finally:
        os.close(held)


def test_an_out_dir_written_between_the_check_and_the_lock_is_checked_again(tmp_path, monkeypatch):
    """Another job may finish shards in the out dir after this one checked it and before it holds
    the lock: what the directory holds is checked again under the lock."""
    from rewards import export, launcher, pipeline
    from rewards.config import compose

    out = tmp_path / "out"
    lock = export.lock_out_dir

    def meanwhile(path):
        manifest = {"shards": {"shard-00000": {"problem_ids": ["other"]}}, "finished_problem_ids": ["other"]}
        (path / "manifest.json").write_text(json.dumps(manifest))
        return lock(path)

    def too_late(*args, **kwargs):
        raise AssertionError("Ray started on a directory another job had written")

    monkeypatch.setattr(export, "lock_out_dir", meanwhile)
    monkeypatch.setattr(launcher, "connect", too_late)
    with pytest.raises(pipeline.JobInputError, match="other problems than this job's batch 0"):
        pipeline.run(compose([f"out={out}", "experiment=tiny"]))


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """An existing directory the job may not write to (root ignores mode bits, so the test makes
    the probe file's creation fail as a read-only or immutable directory makes it fail)."""
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    assert main(["search", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, f"out={out} cannot be written", "Permission denied", "writable")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("meta", ['{"kind": "prm", "logit_offset": NaN}', '["prm"]', "{broken"])
def test_a_critic_json_that_would_switch_the_critic_off_is_one_line(tmp_path, out, capsys, meta):
    """A NaN logit offset scored every node NaN and the search dropped the critic without a word."""
    from _tiny_models import save_tiny_llama

    from critics.models import init_from_policy, save_critic

    model, tok = init_from_policy(save_tiny_llama(tmp_path / "lm"), "prm")
    critic = save_critic(model, tok, "prm", tmp_path / "prm", {})
    (critic / "critic.json").write_text(meta)
    capsys.readouterr()
    assert main(["search", f"critics.prm_path={critic}", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, str(critic / "critic.json"))
    _nothing_written(out)


@pytest.mark.parametrize("head", ["LlamaForSequenceClassification", "LlamaModel"])
def test_a_checkpoint_without_a_language_model_head_is_refused_as_policy(tmp_path, out, capsys, head):
    """A critic (or a bare trunk) loads as a causal LM with a random LM head and writes noise."""
    from _tiny_models import save_tiny_llama
    from transformers import AutoModelForSequenceClassification, LlamaModel

    lm = save_tiny_llama(tmp_path / "lm")
    model = (
        AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
        if head.endswith("Classification")
        else LlamaModel.from_pretrained(lm)
    )
    model.save_pretrained(tmp_path / "other")
    for f in lm.glob("tok*"):
        (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    capsys.readouterr()  # the saving's progress bars
    assert main(["search", f"policy.path={tmp_path / 'other'}", f"out={out}"]) == 2
    _check_one_line(capsys.readouterr().err, head, "no language-model head", "ForCausalLM")
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


NL = "\n"


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _corpus_files(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Bad inputs that need files: (overrides, words the one line must hold)."""
    listed = tmp / "listed"
    _write(listed / "manifest.json", "[]")
    broken_critic = tmp / "critic"
    _write(broken_critic / "config.json", "{broken")
    (broken_critic / "model.safetensors").write_bytes(b"x")
    broken_policy = tmp / "policy"
    _write(broken_policy / "config.json", "{broken")
    (broken_policy / "model.safetensors").write_bytes(b"x")
    _write(broken_policy / "tokenizer.json", "{}")
    row = '{"id": "a", "question": "q", "answer": '
    return {
        "jsonl: a 5,000-digit number": (
            ["task=jsonl", "task.path=" + _write(tmp / "big.jsonl", row + "9" * 5000 + "}" + NL)],
            ["big.jsonl line 1", "not a usable JSON object"],
        ),
        "jsonl: nesting 5,000 deep": (
            [
                "task=jsonl",
                "task.path=" + _write(tmp / "deep.jsonl", row + "[" * 5000 + "]" * 5000 + "}" + NL),
            ],
            ["deep.jsonl line 1", "nested too deeply"],
        ),
        "jsonl: a row that is a list": (
            ["task=jsonl", "task.path=" + _write(tmp / "arr.jsonl", "[1, 2]" + NL)],
            ["arr.jsonl line 1", "JSON object"],
        ),
        "jsonl: a duplicate id": (
            ["task=jsonl", "task.path=" + _write(tmp / "dup.jsonl", (row + "1}" + NL) * 2)],
            ["duplicate id"],
        ),
        "jsonl: binary bytes": (
            ["task=jsonl", "task.path=" + _write(tmp / "bin.jsonl", "\0" * 10)],
            ["bin.jsonl line 1"],
        ),
        "countdown: numbers not a list": (
            ["task.path=" + _write(tmp / "cd.jsonl", '{"id": "a", "numbers": "x", "target": 3}' + NL)],
            ["'numbers' must be a list"],
        ),
        "countdown: an empty file": (["task.path=" + _write(tmp / "empty.jsonl", "")], ["has no rows"]),
        "out: a manifest that is a list": ([f"out={listed}"], ["not an arborist manifest"]),
        "out: a file": ([f"out={_write(tmp / 'afile', 'x')}"], ["is a file"]),
        "model: an empty directory": ([f"policy.path={tmp / 'bins'}"], ["does not exist"]),
        "model: a broken config.json": ([f"policy.path={broken_policy}"], ["config.json is not valid JSON"]),
        "critic: a broken config.json": (
            [f"critics.value_path={broken_critic}"],
            ["config.json cannot be read"],
        ),
    }


SETTINGS = {
    "search.max_nodes=1": ["search.max_nodes must be in [2,"],
    "search.max_nodes=100000000000": ["search.max_nodes must be in [2,"],
    "search.keep_rollouts=alll": ["search.keep_rollouts='alll'"],
    "search.c_min=0": ["c_min <= c_max"],
    "search.num_options=0": ["search.num_options"],
    "search.max_depth=0": ["search.max_depth"],
    "search.root_width=-1": ["search.root_width"],
    "search.merge_similarity=0": ["search.merge_similarity"],
    "policy.dtype=float8": ["policy.dtype='float8'"],
    "policy.device=tpu": ["policy.device='tpu'"],
    "policy.top_p=2": ["policy.top_p"],
    "policy.top_k=-1": ["policy.top_k"],
    "policy.max_step_tokens=0": ["policy.max_step_tokens"],
    "policy.max_batch=0": ["policy.max_batch"],
    "critics.dtype=x": ["critics.dtype='x'"],
    "critics.device=gpu0": ["critics.device='gpu0'"],
    "critics.rollouts=-1": ["critics.rollouts"],
    "critics.w_value=-1": ["critics.w_value"],
    "critics.batch_size=0": ["critics.batch_size"],
    "rewards.confidence=1.0": ["rewards.confidence"],
    "rewards.audit_pairs=-1": ["rewards.audit_pairs"],
    "rewards.sft_solutions=0": ["rewards.sft_solutions"],
    "rewards.value_target=x": ["rewards.value_target"],
    "rewards.min_visits=0": ["min_visits"],
    "ray.num_cpus=-1": ["ray.num_cpus must be >= 1"],
    "ray.start_timeout_s=0": ["ray.start_timeout_s"],
    "ray.max_retries=-1": ["ray.max_retries"],
    "ray.gpus_per_worker=-1": ["ray.gpus_per_worker"],
    "ray.torch_threads=0": ["ray.torch_threads"],
    "ray.address=": ["ray.address is empty"],
    "seed=abc": ["seed=abc"],
    "seed=99999999999999999999999": ["a seed must be in [0, 2**63)"],
    "search=null": ["search is a config group", "search=default"],
    "search.c_puct=nan": ["search.c_puct must be >= 0 and finite"],
    "search.alpha=-5": ["search.alpha must be >= 0"],
    "search.converged_share=5": ["search.converged_share must be in [0, 1]"],
    "search.max_tokens=-1": ["search.max_tokens must be >= 0"],
    "policy.temperature=inf": ["policy.temperature must be > 0 and finite"],
    "critics.w_prm=nan": ["critics.w_prm must be >= 0 and finite"],
    "ray.cpus_per_worker=0.00001": ["ray.cpus_per_worker must be >= 0 with at most 4 decimals"],
    "ray.cpus_per_worker=1000000": ["ray.cpus_per_worker=1000000", "the local Ray has", "CPUs"],
    "task.max_numbers=9": ["countdown difficulty"],
    "out=": ["out is empty"],
}


@pytest.mark.parametrize("override", sorted(SETTINGS))
def test_bad_setting_corpus(override, out, capsys):
    args = [override] if override.startswith("out=") else [override, f"out={out}"]
    assert main(["search", *args]) == 2
    _check_one_line(capsys.readouterr().err, *SETTINGS[override])
    _nothing_written(out)


FILE_CASES = sorted([
    "jsonl: a 5,000-digit number", "jsonl: nesting 5,000 deep", "jsonl: a row that is a list",
    "jsonl: a duplicate id", "jsonl: binary bytes", "countdown: numbers not a list",
    "countdown: an empty file", "out: a manifest that is a list", "out: a file",
    "model: an empty directory", "model: a broken config.json", "critic: a broken config.json",
])  # fmt: skip


@pytest.mark.parametrize("case", FILE_CASES)
def test_bad_file_corpus(case, tmp_path, out, capsys):
    overrides, needles = _corpus_files(tmp_path)[case]
    assert sorted(_corpus_files(tmp_path)) == FILE_CASES
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    own_out = not any(o.startswith("out=") for o in overrides)
    assert main(["search", *overrides, *([f"out={out}"] if own_out else [])]) == 2
    _check_one_line(capsys.readouterr().err, *needles)
    if own_out:
        _nothing_written(out)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing changed


def test_the_corpus_holds_forty_bad_inputs():
    """The README's reliability figure counts these two lists (test_bad_input_is_one_line adds more)."""
    assert len(SETTINGS) + len(FILE_CASES) >= 40
