"""The job end to end, in-process on the shared Ray session: output layout, determinism across
worker counts, resume after a crash between shards, and the tiny experiment on Countdown."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import NUM_PROBLEMS

from rewards.config import compose
from rewards.export import load_manifest
from rewards.job import JobInputError
from rewards.pipeline import check_config, run

LAYOUT = ("pairs", "steps", "kto", "sft", "values", "trees")


def test_run_writes_every_file_of_the_layout(reference_run, job_overrides):
    out = reference_run
    manifest = json.loads((out / "manifest.json").read_text())
    ids = [f"w{i}" for i in range(NUM_PROBLEMS)]
    assert manifest["finished_problem_ids"] == sorted(ids)
    assert sorted(manifest["shards"]) == [f"shard-{i:05d}" for i in range(NUM_PROBLEMS // 2)]
    for kind in LAYOUT:
        files = sorted(p.name for p in (out / kind).iterdir())
        assert files == [f"shard-{i:05d}.parquet" for i in range(NUM_PROBLEMS // 2)], kind
        rows = sum(pq.read_metadata(out / kind / f).num_rows for f in files)
        assert rows == manifest["rows"][kind], (
            f"{kind}: {rows} rows on disk, manifest says {manifest['rows'][kind]}"
        )
    trees = [r["problem_id"] for f in manifest["files"]["trees"] for r in pq.read_table(out / f).to_pylist()]
    assert sorted(trees) == sorted(ids), "every problem exactly once"
    assert manifest["rows"]["steps"] > 0 and manifest["rows"]["values"] > NUM_PROBLEMS

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["problems_done"] == metrics["problems_total"] == NUM_PROBLEMS
    assert metrics["nodes"] > 2 * NUM_PROBLEMS and metrics["nodes_per_s"] > 0
    assert metrics["rows"] == manifest["rows"] and metrics["retries"] == 0
    assert sum(metrics["batches_by_worker"].values()) == NUM_PROBLEMS // 2
    audit = json.loads((out / "audit.json").read_text())
    assert audit["num_trees"] == NUM_PROBLEMS and audit["greedy_success"] is not None
    card = (out / "README.md").read_text()
    assert "config_name: trees" in card and f"Finished problems: {NUM_PROBLEMS}" in card
    assert not list(out.rglob("*.tmp"))


def test_records_rederive_from_the_trees(reference_run, job_overrides, records):
    """out/trees holds enough to re-derive every other kind exactly."""
    from conftest import canonical_rows

    from rewards.derive import derive_all
    from rewards.export import read_trees
    from rewards.pipeline import to_schema
    from rewards.records import to_table

    conf = to_schema(compose(job_overrides(reference_run)))
    rows = derive_all(read_trees(reference_run), conf.rewards.for_job(_config_hash(reference_run)))
    on_disk = records(reference_run)
    for kind in LAYOUT:
        assert canonical_rows(to_table(kind, rows[kind]).to_pylist()) == on_disk[kind], kind


def _config_hash(out: Path) -> str:
    return json.loads((out / "metrics.json").read_text())["config_hash"]


def test_one_worker_writes_the_same_records_as_two(reference_run, job_overrides, records, tmp_path):
    run(compose(job_overrides(tmp_path / "out", "ray.num_workers=1")))
    assert records(tmp_path / "out") == records(reference_run)
    assert _config_hash(tmp_path / "out") == _config_hash(reference_run), "ray settings shape no record"


def test_crash_between_shards_resumes_to_the_same_dataset(
    reference_run, job_overrides, records, tmp_path, capsys
):
    from rewards.launcher import Hooks

    class Crash(RuntimeError):
        pass

    def crash(name: str) -> None:
        raise Crash(name)

    out = tmp_path / "out"
    with pytest.raises(Crash):
        run(compose(job_overrides(out)), hooks=Hooks(on_shard=crash))
    assert json.loads((out / "manifest.json").read_text())["shards"] == {}, "no shard rewrites manifest.json"
    manifest = load_manifest(out)  # the shard log names the finished one
    assert len(manifest["shards"]) == 1 and len(manifest["finished_problem_ids"]) == 2
    assert not (out / "audit.json").exists(), "an interrupted job writes no audit"

    metrics = run(compose(job_overrides(out)))
    assert metrics["problems_resumed"] == 2 and metrics["batches_run"] == NUM_PROBLEMS // 2 - 1
    assert records(out) == records(reference_run)
    assert json.loads((out / "audit.json").read_text()) == json.loads(
        (reference_run / "audit.json").read_text()
    )

    capsys.readouterr()
    again = run(compose(job_overrides(out)))  # everything done: nothing is searched or written twice
    assert again["batches_run"] == 0 and records(out) == records(reference_run)
    assert again["success_rate"] is None, "this run searched no tree: no rate, not 0.0"
    assert "every problem was already searched" in capsys.readouterr().out


def test_resume_refuses_another_batch_layout(reference_run, job_overrides):
    with pytest.raises(JobInputError, match="search.batch_problems"):
        check_config(compose(job_overrides(reference_run, "search.batch_problems=3")))


def test_resume_refuses_another_config_unless_appending(reference_run, job_overrides, tmp_path):
    """A finished directory rerun with another seed refuses, naming the key, before anything starts;
    the manifest is untouched. A changed problem file (same path) or retrained weights are named too."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(JobInputError, match=r"seed \(0 -> 5\).*append_run=true"):
        check_config(compose(job_overrides(out, "seed=5")))
    assert (out / "manifest.json").read_bytes() == before
    job = check_config(compose(job_overrides(out, "seed=5", "append_run=true")))  # accepted
    assert job.config["seed"] == 5
    same = check_config(compose(job_overrides(out)))
    assert same.config_hash == json.loads(before)["config_hash"]  # the same job resumes
    # the inputs are in the hash: the problem file's content, the policy's weights
    assert set(same.config["inputs"]) == {"problems_sha", "policy_weights_sha"}


def test_appending_refuses_problems_that_changed_under_their_ids(
    reference_run, job_overrides, word_problems, tmp_path
):
    """append_run accepts another config, but a finished shard's problems with other content under the
    same ids would be skipped as done while the run's records belong to the old ones: refused."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    rows = [json.loads(line) for line in Path(word_problems).read_text().splitlines() if line.strip()]
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps({**r, "question": r["question"] + " Twice."}) + "\n" for r in rows))
    with pytest.raises(JobInputError, match="other problems under them"):
        check_config(compose(job_overrides(out, f"task.path={changed}", "append_run=true")))
    check_config(compose(job_overrides(out, "seed=5", "append_run=true")))  # same problems: accepted


def test_tiny_experiment_on_countdown(ray_session, tiny_policy, tmp_path):
    """The default task at tiny size, one worker."""
    out = tmp_path / "out"
    metrics = run(
        compose(["experiment=tiny", f"policy.path={tiny_policy}", f"out={out}", "ray.num_workers=1"])
    )
    assert metrics["status"] == "finished" and metrics["problems_done"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["finished_problem_ids"]) == 6 and manifest["rows"]["trees"] == 6


def test_a_solving_policy_writes_the_same_records_with_one_worker_or_two(
    ray_session, countdown_job, records, tmp_path, monkeypatch
):
    """The equality checks above compare a workload that never solves a problem; this one does:
    the records compared hold pairs and SFT rows (counted), and they are the same for 1 and 2
    workers and after a crash between shards and a resume. So is audit.json, whose re-rollouts run
    in chunks over the workers."""
    import rewards.driver
    from rewards.launcher import Hooks

    monkeypatch.setattr(rewards.driver, "REROLLOUT_CHUNK", 3)  # several chunks from this small job
    rerolled = ("rewards.audit_pairs=64", "rewards.audit_rollouts=8")  # enough draws to tell seeds apart
    run(compose(countdown_job(tmp_path / "two", "ray.num_workers=2", *rerolled)))
    two = records(tmp_path / "two")
    assert len(two["pairs"]) >= 3 and len(two["sft"]) >= 3, {k: len(v) for k, v in two.items()}
    run(compose(countdown_job(tmp_path / "one", "ray.num_workers=1", *rerolled)))
    assert records(tmp_path / "one") == two
    audit = json.loads((tmp_path / "two" / "audit.json").read_text())
    assert audit["pair_rerollout_gap"] is not None and audit["pairs_sampled"] > 3, "pairs were re-rolled"
    assert json.loads((tmp_path / "one" / "audit.json").read_text()) == audit

    class Crash(RuntimeError):
        pass

    def crash(name: str) -> None:
        if name == "shard-00001":
            raise Crash(name)

    with pytest.raises(Crash):
        run(
            compose(countdown_job(tmp_path / "resumed", "ray.num_workers=2", *rerolled)),
            hooks=Hooks(on_shard=crash),
        )
    run(compose(countdown_job(tmp_path / "resumed", "ray.num_workers=2", *rerolled)))
    assert records(tmp_path / "resumed") == two


def test_the_critics_are_inputs_of_the_config_hash(job_overrides, tiny_policy, tmp_path):
    """A resume across a critic rebuild would mix records scored by two sets of critics: a critic
    directory's weights (an ensemble's members included) and the embedded critics' recipe are in the
    hash, so it is refused like any other change."""
    from critics.models import init_from_policy, save_critic

    default = check_config(compose([f"out={tmp_path / 'default'}"]))
    assert set(default.config["inputs"]) == {"problems_sha", "default_critics_recipe_sha"}

    critic = tmp_path / "value"
    model, tok = init_from_policy(tiny_policy, "value", seed=1)
    save_critic(model, tok, "value", critic, {})
    first = check_config(compose(job_overrides(tmp_path / "out", f"critics.value_path={critic}")))
    assert "value_critic_weights_sha" in first.config["inputs"]
    model, _ = init_from_policy(tiny_policy, "value", seed=2)
    save_critic(model, tok, "value", critic / "member-1", {})  # a head added: another critic
    (critic / "critic.json").write_text(json.dumps({"kind": "value", "members": ["member-1"]}))
    second = check_config(compose(job_overrides(tmp_path / "out", f"critics.value_path={critic}")))
    assert (
        second.config["inputs"]["value_critic_weights_sha"]
        != first.config["inputs"]["value_critic_weights_sha"]
    )
    assert second.config_hash != first.config_hash
