"""Shards, manifest, resume and crash safety of rewards.export; every kind loads with `datasets`."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, load_dataset

from mcts.finished import NODE_FIELDS
from rewards import records
from rewards.card import write_card
from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter, OutDirError, json_safe, load_manifest, read_trees, write_audit
from tests._trees import GOLDEN_PROMPT, T, build_tree, golden_tree

CFG = DeriveConfig(confidence=0.0)  # the golden tree's pairs rest on one sample a side
CONFIG = {"derive": {"min_visits": 2}, "seed": 0}
VERSIONS = {"arborist": "0.1.0"}


def _batch(*problem_ids: str, seed: int = 0) -> tuple[dict, list[str]]:
    trees = [golden_tree(pid, seed) for pid in problem_ids]
    return derive_all(trees, CFG), list(problem_ids)


def _load(out, kind, tmp_path):
    files = [str(out / f) for f in load_manifest(out)["files"][kind]]
    return load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_every_kind_loads_with_datasets(tmp_path):
    out = tmp_path / "out"
    w = DatasetWriter(out, CONFIG, VERSIONS)
    w.write_shard(*_batch("p1", "p2"), "shard-00000")
    unsolved = build_tree([T("1 + 1 = 2. Answer: 2", 3, 0)], prompt=GOLDEN_PROMPT, problem_id="p3")
    entry = w.write_shard(derive_all([unsolved], CFG), ["p3"], "shard-00001")
    assert entry["rows"]["sft"] == entry["rows"]["pairs"] == 0  # empty kinds still get a file
    manifest = load_manifest(out)
    for kind in records.KINDS:
        ds = _load(out, kind, tmp_path)
        assert ds.num_rows == manifest["rows"][kind], kind
        assert ds.column_names == records.SCHEMAS[kind].names, kind
    pairs = _load(out, "pairs", tmp_path)
    assert pairs.num_rows == 8 and pairs[0]["prompt"] == GOLDEN_PROMPT and pairs[0]["margin"] > 0
    steps = _load(out, "steps", tmp_path)
    assert steps.features["labels"].feature.dtype == "bool"
    assert steps[1]["labels"] == [True, True, False]
    kto = _load(out, "kto", tmp_path)
    assert set(kto["label"]) == {True, False}
    # a 0-row file is a valid parquet file with the schema; `datasets` skips it beside non-empty
    # shards (checked above: shard-00001 has no pairs or sft rows), though it refuses a split made
    # of 0-row files only ("corresponds to no data"): wrap the table yourself then
    empty = pq.read_table(out / "sft/shard-00001.parquet")
    assert empty.num_rows == 0 and empty.schema.equals(records.SFT_SCHEMA)
    assert Dataset(empty).column_names == records.SFT_SCHEMA.names
    assert manifest["finished_problem_ids"] == ["p1", "p2", "p3"]
    assert manifest["shards"]["shard-00000"]["rows"]["trees"] == 2
    assert manifest["seeds"] == [0] and manifest["config"] == CONFIG and manifest["versions"] == VERSIONS
    assert not list(out.rglob("*.tmp"))


def test_resume_sees_finished_ids(tmp_path):
    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    assert w.finished_ids() == set()
    w.write_shard(*_batch("p1", "p2"), "shard-00000")
    w.close()
    again = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    assert again.finished_ids() == {"p1", "p2"} and again.swept == []
    again.close()
    # another config refuses, naming what differs; append_run records it as a new run
    with pytest.raises(OutDirError, match=r"seed \(0 -> 1\).*append_run=true"):
        DatasetWriter(tmp_path, {"seed": 1}, VERSIONS)
    with pytest.raises(OutDirError, match="config hash"):
        DatasetWriter(tmp_path, CONFIG, VERSIONS, config_hash="other")
    changed = DatasetWriter(tmp_path, {"seed": 1}, VERSIONS, append_run=True)
    assert load_manifest(tmp_path)["config"] == CONFIG  # unchanged until the next shard
    changed.write_shard(*_batch("p3"), "shard-00001")
    assert load_manifest(tmp_path)["config_history"][0]["config"] == {"seed": 1}


def test_one_writer_per_directory(tmp_path):
    """A second writer refuses in one line naming the holder's pid; the lock goes with the writer,
    and with its process however it dies (SIGKILL included)."""
    import os
    import signal
    import subprocess
    import sys

    first = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    with pytest.raises(OutDirError, match=f"in use by another arborist job \\(pid {os.getpid()}\\)"):
        DatasetWriter(tmp_path, CONFIG, VERSIONS)
    first.write_shard(*_batch("p1"), "shard-00000")
    first.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rewards.export import DatasetWriter; "
         f"w = DatasetWriter(sys.argv[1], {CONFIG!r}, {{}}); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    before = (tmp_path / "manifest.json").read_bytes()  # the holder folded the shard log in
    with pytest.raises(OutDirError, match=f"pid {holder.pid}"):
        DatasetWriter(tmp_path, CONFIG, VERSIONS)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with DatasetWriter(tmp_path, CONFIG, VERSIONS) as w:  # the dead holder's lock is gone
        assert w.finished_ids() == {"p1"}
    assert (tmp_path / "manifest.json").read_bytes() == before  # the refused writers changed nothing


def test_crash_between_shard_and_manifest_leaves_ids_unfinished(tmp_path, monkeypatch):
    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    w.write_shard(*_batch("p1"), "shard-00000")

    def crash(self, entry):
        raise KeyboardInterrupt("killed before the shard log named the shard")

    monkeypatch.setattr(DatasetWriter, "_log_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        w.write_shard(*_batch("p2"), "shard-00001")
    monkeypatch.undo()
    assert (tmp_path / "pairs/shard-00001.parquet").exists()  # the shard files landed...
    assert w.finished_ids() == {"p1"}  # ...but p2 is not finished, in memory
    w.close()
    resumed = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    assert resumed.finished_ids() == {"p1"}  # nor on disk
    assert sorted(resumed.swept) == sorted(f"{k}/shard-00001.parquet" for k in records.KINDS)
    resumed.write_shard(*_batch("p2"), "shard-00002")  # redone under a new name: no duplicate rows
    files = sorted(p.name for p in (tmp_path / "pairs").iterdir())
    assert files == ["shard-00000.parquet", "shard-00002.parquet"]
    assert sorted(_load(tmp_path, "pairs", tmp_path)["problem_id"]) == ["p1"] * 4 + ["p2"] * 4


def test_a_shard_costs_one_log_line_not_a_manifest_rewrite(tmp_path):
    """Manifest bytes per shard stay O(1): the 60th shard appends as many bytes as the 1st, and
    manifest.json is rewritten only at the writer's start and by `compact` at the job's end."""
    from rewards.export import MANIFEST, SHARD_LOG

    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    start = (tmp_path / MANIFEST).read_bytes()
    sizes = []
    for i in range(60):
        before = (tmp_path / SHARD_LOG).stat().st_size if (tmp_path / SHARD_LOG).exists() else 0
        w.write_shard(*_batch(f"p{i:03d}"), f"shard-{i:05d}")
        sizes.append((tmp_path / SHARD_LOG).stat().st_size - before)
    assert (tmp_path / MANIFEST).read_bytes() == start, "a shard must not rewrite manifest.json"
    assert max(sizes) - min(sizes) <= 8 and max(sizes) < 1024, sizes
    mid_run = load_manifest(tmp_path)  # readers see the logged shards mid-run
    assert len(mid_run["shards"]) == 60 and mid_run["finished_problem_ids"][-1] == "p059"
    w.compact()
    assert not (tmp_path / SHARD_LOG).exists() and load_manifest(tmp_path) == mid_run
    assert json.loads((tmp_path / MANIFEST).read_text())["rows"] == mid_run["rows"]
    w.close()


def test_a_torn_log_line_names_nothing(tmp_path):
    """A crash mid-append leaves part of a line: that shard is not finished, its files are swept and
    the next writer starts the log afresh (no later line is glued to the torn one)."""
    from rewards.export import SHARD_LOG

    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    w.write_shard(*_batch("p1"), "shard-00000")
    w.write_shard(*_batch("p2"), "shard-00001")
    w.close()
    log = (tmp_path / SHARD_LOG).read_bytes()
    (tmp_path / SHARD_LOG).write_bytes(log[: len(log) - 40])  # the second line, torn
    assert sorted(load_manifest(tmp_path)["shards"]) == ["shard-00000"]
    with DatasetWriter(tmp_path, CONFIG, VERSIONS) as resumed:
        assert resumed.finished_ids() == {"p1"}
        assert sorted(resumed.swept) == sorted(f"{k}/shard-00001.parquet" for k in records.KINDS)
        resumed.write_shard(*_batch("p2"), "shard-00001")
    assert sorted(load_manifest(tmp_path)["finished_problem_ids"]) == ["p1", "p2"]


def test_a_short_write_to_the_log_is_finished_or_undone(tmp_path, monkeypatch):
    """A full disk can take part of a log line: the writer goes on writing the rest, and where the
    disk then refuses, it cuts the torn part off, so that no later line is logged behind it."""
    import errno
    import os

    from rewards.export import SHARD_LOG

    write = os.write  # the real one (os.write itself is what is patched)

    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    w.write_shard(*_batch("p1"), "shard-00000")
    calls = []

    def short(fd, data):  # 10 bytes at a time, then (on the third call) a full disk
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, bytes(data[:10]))

    before = (tmp_path / SHARD_LOG).read_bytes()
    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError, match="No space"):
        w.write_shard(*_batch("p2"), "shard-00001")
    assert (tmp_path / SHARD_LOG).read_bytes() == before  # the 20 bytes that landed were cut off
    calls.clear()
    monkeypatch.setattr(os, "write", lambda fd, data: write(fd, bytes(data[:10])))
    w.write_shard(*_batch("p3"), "shard-00002")  # short writes only: the whole line, in pieces
    monkeypatch.undo()
    w.close()
    assert sorted(load_manifest(tmp_path)["shards"]) == ["shard-00000", "shard-00002"]


def test_the_sweep_touches_only_this_job_familys_files(tmp_path):
    DatasetWriter(tmp_path, CONFIG, VERSIONS).write_shard(*_batch("p1"), "shard-00000")
    own = [
        tmp_path / "pairs/.shard-00001.parquet.123.0a1b2c3d.tmp",
        tmp_path / ".manifest.json.9.00ff00ff.tmp",
    ]
    foreign = [tmp_path / "notes.tmp", tmp_path / "pairs/mine.parquet", tmp_path / "pairs/x.parquet.tmp"]
    for p in own + foreign:
        p.write_bytes(b"torn")
    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    assert sorted(w.swept) == [".manifest.json.9.00ff00ff.tmp", "pairs/.shard-00001.parquet.123.0a1b2c3d.tmp"]
    assert all(p.exists() for p in foreign) and not any(p.exists() for p in own)
    assert w.finished_ids() == {"p1"}


def test_a_directory_without_a_manifest_loses_nothing(tmp_path):
    """`out=.` on a directory of the user's: nothing there is swept, whatever its name."""
    (tmp_path / "pairs").mkdir()
    keep = [
        tmp_path / "pairs/shard-00003.parquet",
        tmp_path / "draft.tmp",
        tmp_path / ".a.json.1.0a1b2c3d.tmp",
    ]
    for p in keep:
        p.write_bytes(b"mine")
    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    assert w.swept == [] and all(p.read_bytes() == b"mine" for p in keep)


def test_a_job_that_finished_nothing_binds_nothing_and_one_that_did_is_kept(tmp_path):
    """A job whose model failed to load wrote its manifest (under that model's weights hash) and no
    shard: the rerun with the model fixed starts afresh. Once a shard is in, another config refuses."""
    DatasetWriter(tmp_path, {**CONFIG, "model": "broken"}, VERSIONS, "hash-a").close()
    w = DatasetWriter(tmp_path, {**CONFIG, "model": "fixed"}, VERSIONS, "hash-b")
    assert w.manifest["config"]["model"] == "fixed" and w.manifest["config_history"] == []
    w.write_shard(*_batch("p1"), "shard-00000")
    w.close()
    with pytest.raises(OutDirError, match="another config"):
        DatasetWriter(tmp_path, {**CONFIG, "model": "other"}, VERSIONS, "hash-c")


def test_rewrite_is_idempotent_or_refused(tmp_path):
    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    first = w.write_shard(*_batch("p1", "p2"), "shard-00000")
    before = (tmp_path / "manifest.json").read_text()
    assert w.write_shard(*_batch("p2", "p1"), "shard-00000") == first  # a retried task: no-op
    assert (tmp_path / "manifest.json").read_text() == before
    with pytest.raises(ValueError, match="pick a new shard name"):
        w.write_shard(*_batch("p3"), "shard-00000")
    with pytest.raises(ValueError, match="already finished"):
        w.write_shard(*_batch("p2", "p3"), "shard-00001")
    with pytest.raises(ValueError, match="shard name"):
        w.write_shard(*_batch("p3"), "../evil")
    with pytest.raises(ValueError, match="unknown record kinds"):
        w.write_shard({"pears": []}, ["p3"], "shard-00001")
    assert load_manifest(tmp_path)["rows"]["pairs"] == 8


def test_trees_round_trip_and_rederive(tmp_path):
    trees = [golden_tree("p1"), golden_tree("p1", seed=5)]
    derived = derive_all(trees, CFG)
    DatasetWriter(tmp_path, CONFIG, VERSIONS).write_shard(derived, ["p1"], "shard-00000")
    back = read_trees(tmp_path)
    assert len(back) == 2
    for a, b in zip(trees, back, strict=True):
        assert (a.problem_id, a.prompt, a.steps, a.seed, a.meta) == (
            b.problem_id,
            b.prompt,
            b.steps,
            b.seed,
            b.meta,
        )
        for name, dtype in NODE_FIELDS.items():
            assert b.nodes[name].dtype == dtype
            np.testing.assert_array_equal(a.nodes[name], b.nodes[name], err_msg=name)
    # everything re-derives from the stored trees alone (NaN critic scores compared as null)
    same = lambda d: json.dumps(json_safe(d), sort_keys=True)  # noqa: E731
    assert same(derive_all(back, CFG)) == same(derived)


def test_trees_are_read_in_shard_name_order_and_a_killed_jobs_shards_count(tmp_path):
    """`read_trees` (and `train-critics`, which trains on what it returns) must not depend on which
    batch finished first, and a job killed mid-way has its finished shards in the shard log only."""
    from rewards.train_critics import read_tree_dir

    w = DatasetWriter(tmp_path, CONFIG, VERSIONS)
    w.write_shard(*_batch("p2"), "shard-00001")  # the second batch finished first
    w.write_shard(*_batch("p1"), "shard-00000")
    assert load_manifest(tmp_path)["files"]["trees"][0] == "trees/shard-00001.parquet"  # completion order
    # not closed: as a killed job leaves it, its manifest.json names no shard yet
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == {}
    for trees in (read_trees(tmp_path), read_tree_dir(tmp_path)):
        assert [t.problem_id for t in trees] == ["p1", "p2"]


def test_card_and_audit(tmp_path):
    DatasetWriter(tmp_path, CONFIG, VERSIONS).write_shard(*_batch("p1"), "shard-00000")
    card = write_card(tmp_path).read_text()
    assert "| pairs | 1 | 4 |" in card and "| pairs/shard-00000.parquet | 4 |" in card
    assert 'load_dataset("parquet"' in card and "DPOTrainer" in card and "KTOTrainer" in card
    for kind, schema in records.SCHEMAS.items():
        assert f"- config_name: {kind}" in card
        assert all(name in card for name in schema.names)
    assert '"min_visits": 2' in card
    path = write_audit(
        tmp_path, {"pair_precision": float("nan"), "auroc": np.float64(0.75), "n": np.int64(3)}
    )
    audit = json.loads(path.read_text())  # strict JSON: NaN became null
    assert audit == {"pair_precision": None, "auroc": 0.75, "n": 3}
    assert not math.isnan(audit["auroc"])
    with pytest.raises(ValueError, match="write at least one shard"):
        write_card(tmp_path / "nothing")


def test_the_memory_benchmark_runs_the_drivers_data_path(tmp_path):
    """benchmarks.memory at a tiny size: the scripted search yields pairs, every shard is one log
    line of about the same size, and the streaming audit reads them all."""
    from benchmarks.memory import run_size

    r = run_size(48, tmp_path / "out")
    assert r["shards"] == 3 and r["pairs"] > 0 and 0 < r["search_success"] <= 1
    per_shard = r["manifest_bytes_per_shard"]
    assert per_shard["max"] - per_shard["first"] <= 16 and r["manifest_bytes_total"] <= 3 * per_shard["max"]
