"""`arborist improve`'s parts: fresh round problems kept apart from the held-out pool by content,
the held-out evaluation on a real (tiny) model, and the outcome-level pairs of the benchmark."""

from __future__ import annotations

from mcts.embedded import EVAL_EXCLUDE, EVAL_SEED, default_difficulty, evaluation_problems
from mcts.tasks.base import content_key
from mcts.tasks.countdown import generate_problems
from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter
from rewards.improve import evaluate, round_problems
from tests._tiny_models import save_tiny_llama
from tests._trees import golden_tree, rich_tree


def test_round_problems_are_fresh_distinct_and_never_held_out():
    pool = {
        content_key(p.question, p.meta)
        for p in generate_problems(EVAL_EXCLUDE, EVAL_SEED, default_difficulty())
    }
    one, two = round_problems(1, 200, 0), round_problems(2, 200, 0)
    for problems in (one, two):
        keys = [content_key(p.question, p.meta) for p in problems]
        assert len(set(keys)) == 200 and not set(keys) & pool
    assert [p.id for p in one] != [p.id for p in two] and round_problems(1, 200, 0) == one
    # the evaluation slices are disjoint by content, and inside the pool
    slices = {
        s: {content_key(p.question, p.meta) for p in evaluation_problems(s)}
        for s in ("tune", "audit", "test")
    }
    assert not slices["tune"] & slices["test"] and not slices["audit"] & slices["test"]
    assert slices["test"] <= pool and len(slices["test"]) > 400


def test_evaluate_reports_rates_with_standard_errors(tmp_path):
    policy = save_tiny_llama(tmp_path / "policy")
    r = evaluate(policy, evaluation_problems("test", 6), pass_k=2, sample_seed=0)
    assert r["problems"] == 6 and 0 <= r["greedy"] <= 1 and 0 <= r["pass2"] <= 1
    assert r["distinct"] <= 2 and r["greedy_se"] >= 0


def test_outcome_pairs_are_whole_verified_paths(tmp_path):
    from benchmarks.improve import outcome_pairs

    out = tmp_path / "out"
    trees = [golden_tree("p1"), rich_tree("p2")]
    DatasetWriter(out, {"test": True}, {}).write_shard(derive_all(trees, DeriveConfig()), ["p1", "p2"], "s0")
    rows = outcome_pairs(out)
    assert [r["prompt"] for r in rows] == [trees[0].prompt, trees[1].prompt]
    assert rows[0]["chosen"] == "3 + 2 = 5\n5 + 5 = 10. Answer: 10\n"
    assert rows[0]["rejected"] == "3 * 2 = 6\n6 + 5 = 11\n11 + 0 = 11. Answer: 11\n"  # most visited wrong end


def test_a_round_searches_every_problem_of_its_file(tmp_path):
    """The round's job takes the whole problem file (the task group's default would keep 256)."""
    from rewards.config import compose
    from rewards.improve import ImproveConfig, round_overrides
    from rewards.pipeline import check_config

    policy = save_tiny_llama(tmp_path / "policy")
    cfg = ImproveConfig(problems_per_round=300)
    job = check_config(compose(round_overrides(tmp_path / "round-1", str(policy), cfg, 1)))
    assert len(job.problems) == 300
    assert {p.id for p in job.problems} == {p.id for p in round_problems(1, 300, 0)}


def test_a_failed_round_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """A round's job that dies while running (here: its workers lost beyond the retries, as when
    something kills the job's Ray) ends `arborist improve` with one line naming the resume."""
    import rewards.improve
    from rewards.cli import main
    from rewards.launcher import JobError

    def lost(*args, **kwargs):
        raise JobError("batch 128 lost its worker 4 times (ray.max_retries=3)")

    monkeypatch.setattr(rewards.improve, "run_improve", lost)
    policy = save_tiny_llama(tmp_path / "policy")
    capsys.readouterr()  # saving the model printed its progress
    assert main(["improve", "--out", str(tmp_path / "out"), "--policy", str(policy)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "arborist: error: batch 128 lost its worker 4 times (ray.max_retries=3); "
        "rerunning with the same --out resumes from the last finished shard"
    ]


def test_bad_input_leaves_out_untouched(tmp_path, capsys):
    """A base policy that is not there, or an --out that is a file: one line, exit 2, and no
    improve.json recorded (it would pin the settings of a run that never started)."""
    from rewards.cli import main

    out = tmp_path / "out"
    argv = ["improve", "--out", str(out), "--rounds", "1", "--problems", "10"]
    assert main([*argv, "--policy", str(tmp_path / "nonexistent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    policy = save_tiny_llama(tmp_path / "policy")
    capsys.readouterr()
    assert main(["improve", "--out", str(afile), "--policy", str(policy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"arborist: error: --out {afile} is a file: choose a directory"]
    job = tmp_path / "job"  # a search's output: improve.json and round-k/ would land among its shards
    job.mkdir()
    (job / "manifest.json").write_text("{}")
    for bad in (["--out", str(job)], ["--out", str(out), "--eval-problems", "-1"]):
        assert main(["improve", *bad, "--policy", str(policy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("arborist: error: "), err
    assert sorted(p.name for p in job.iterdir()) == ["manifest.json"] and not out.exists()


def test_round_k_trains_on_rounds_1_to_k_unless_no_replay(tmp_path):
    """The loop end to end on rounds whose search already finished (the resume path): with replay,
    round 2's policy is trained on both rounds' rows; without it, on round 2's alone."""
    import json

    from rewards.improve import ImproveConfig, run_improve
    from rewards.train import TrainPolicyConfig, read_kind

    policy = save_tiny_llama(tmp_path / "policy")
    trees = {1: [golden_tree("p1"), rich_tree("p2")], 2: [rich_tree("p3")]}
    train = TrainPolicyConfig(sft_epochs=1, batch_size=4, device="cpu")
    for replay in (True, False):
        out = tmp_path / f"replay-{replay}"
        for k, ts in trees.items():
            data = out / f"round-{k}" / "data"
            DatasetWriter(data, {"test": True}, {}).write_shard(
                derive_all(ts, DeriveConfig()), [t.problem_id for t in ts], "s0"
            )
            (data / "audit.json").write_text(json.dumps({"search_success": 0.5}))
            (data / "metrics.json").write_text(json.dumps({"status": "finished"}))  # the job's last file
        cfg = ImproveConfig(rounds=2, replay=replay, eval_problems=3, pass_k=2, train=train)
        summary = run_improve(out, cfg, policy, progress=False)
        rows = [len(read_kind(out / f"round-{k}" / "data", "sft")) for k in (1, 2)]
        trained = json.loads((out / "round-2" / "policy" / "arborist_train.json").read_text())
        assert trained["sft_rows"] == (rows[0] + rows[1] if replay else rows[1]) and rows[0] > 0
        assert trained["base"] == str(out / "round-1" / "policy")  # on-policy: round 1's model goes on
        assert len(summary["rounds"]) == 3 and summary["config"]["replay"] is replay
        assert summary["rounds"][2]["trained_rows"] == trained["sft_rows"]


def test_a_rerun_with_other_settings_or_lost_replay_data_is_refused(tmp_path, capsys):
    """The same --out with other settings would mix rounds made two ways under one summary: one line,
    exit 2. More rounds extend a run. A replayed round's data that is gone is named, with the way out."""
    import json
    import shutil

    import pytest

    from rewards.cli import main
    from rewards.improve import ImproveConfig, check_settings, run_improve
    from rewards.train import TrainInputError, TrainPolicyConfig

    out = tmp_path / "out"
    out.mkdir()
    check_settings(out, ImproveConfig())
    check_settings(out, ImproveConfig(rounds=5, num_workers=1))  # extending is fine
    with pytest.raises(TrainInputError, match=r"started with problems_per_round=10000, replay=True"):
        check_settings(out, ImproveConfig(problems_per_round=600, replay=False))
    policy = save_tiny_llama(tmp_path / "policy")
    capsys.readouterr()
    argv = ["improve", "--out", str(out), "--policy", str(policy), "--problems", "600"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rerun with those settings, or choose a new --out" in err[0]

    run = tmp_path / "run"  # round 1 finished (its model and eval kept), round 2's search finished
    for k in (1, 2):
        data = run / f"round-{k}" / "data"
        trees = derive_all([golden_tree(f"p{k}")], DeriveConfig())
        DatasetWriter(data, {"test": True}, {}).write_shard(trees, [f"p{k}"], "s0")
        (data / "audit.json").write_text(json.dumps({"search_success": 1.0}))
        (data / "metrics.json").write_text(json.dumps({"status": "finished"}))
    shutil.copytree(policy, run / "round-1" / "policy")
    (run / "round-1" / "eval.json").write_text(json.dumps({"greedy": 0.0}))
    shutil.rmtree(run / "round-1" / "data")  # say, deleted to save space after round 1 finished
    train = TrainPolicyConfig(sft_epochs=1, device="cpu")
    cfg = ImproveConfig(rounds=2, problems_per_round=8, eval_problems=2, pass_k=2, train=train)
    with pytest.raises(TrainInputError, match=r"round-1/data is gone, and round 2 trains on every earlier"):
        run_improve(run, cfg, policy, progress=False)
    assert not (run / "round-2" / "policy").exists()


def test_a_paired_difference_needs_the_same_problems():
    import math

    import pytest

    from benchmarks.improve import paired

    d, se = paired([1, 0, 1, 1], [0, 0, 1, 0])
    assert d == 0.5 and 0 < se < 0.5
    assert paired([1], [0])[0] == 1 and math.isnan(paired([1], [0])[1])
    with pytest.raises(ValueError, match="same problems"):
        paired([1, 0, 1], [0])  # numpy would broadcast this silently


def test_a_round_counts_as_searched_only_once_its_job_wrote_finished(tmp_path):
    """The job writes its audit, then the dataset card, then metrics.json with status "finished": a
    round killed between them is searched again (the job resumes), not trained on as it is."""
    import json

    from rewards.improve import _job_finished

    data = tmp_path / "data"
    data.mkdir()
    (data / "audit.json").write_text(json.dumps({"search_success": 0.5}))
    assert not _job_finished(data)
    (data / "metrics.json").write_text(json.dumps({"status": "running"}))
    assert not _job_finished(data)
    (data / "metrics.json").write_text("{torn")
    assert not _job_finished(data)
    (data / "metrics.json").write_text(json.dumps({"status": "finished"}))
    assert _job_finished(data)
