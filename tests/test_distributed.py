"""Failures: a worker SIGKILLed mid-batch, the driver SIGKILLed mid-job, and a real cluster.

Each run must end with every problem in the dataset exactly once and the same records as the
uninterrupted `reference_run`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NUM_PROBLEMS

from rewards.config import compose
from rewards.export import load_manifest
from rewards.pipeline import run


def _tree_ids(out: Path) -> list[str]:
    import pyarrow.parquet as pq

    manifest = load_manifest(out)
    return sorted(
        r["problem_id"] for f in manifest["files"]["trees"] for r in pq.read_table(out / f).to_pylist()
    )


def _same_records_to_rounding(out: Path, reference: Path, tol: float = 1e-5) -> None:
    """Every record of `out` is one of `reference`'s with every column but the float ones equal, and
    those within `tol` (batches searched side by side share forward passes: float rounding moves)."""
    import numpy as np
    import pyarrow.parquet as pq

    def rows(where: Path) -> dict[str, list[dict]]:
        files = load_manifest(where)["files"]
        return {
            kind: [r for f in fs for r in pq.read_table(where / f).to_pylist()] for kind, fs in files.items()
        }

    got, want = rows(out), rows(reference)
    assert got.keys() == want.keys()
    for kind, rs in want.items():
        floats = {k for r in rs for k, v in r.items() if isinstance(v, float) or (
            isinstance(v, list) and v and isinstance(v[0], float))}  # fmt: skip

        def key(r: dict, floats: set = floats) -> str:
            return json.dumps({k: v for k, v in r.items() if k not in floats}, sort_keys=True, default=str)

        a, b = sorted(got[kind], key=key), sorted(rs, key=key)
        assert [key(r) for r in a] == [key(r) for r in b], kind
        for x, y in zip(a, b, strict=True):
            for k in floats:
                u, v = np.asarray(x[k], dtype=float), np.asarray(y[k], dtype=float)
                assert np.allclose(u, v, rtol=0, atol=tol, equal_nan=True), (kind, k, x[k], y[k])


@pytest.mark.parametrize("side_by_side", [1, 2])
def test_sigkill_a_worker_mid_batch(reference_run, job_overrides, records, tmp_path, side_by_side):
    """With 2 batches in flight per worker (searched side by side), the kill takes both: both are
    resubmitted, and the records are the reference's to float rounding."""
    from rewards.launcher import Hooks

    killed: list[int] = []

    def kill_worker(n: int, worker: int, pool) -> None:
        if n == 3:  # batch 3 was just handed to `worker`: it is in flight (queued or running) now
            pid = pool.pids()[worker]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "out"
    overrides = job_overrides(out, f"ray.batches_per_worker={side_by_side}")
    metrics = run(compose(overrides), hooks=Hooks(on_submit=kill_worker))
    assert killed and metrics["retries"] >= 1, "the killed worker's batches were resubmitted"
    assert _tree_ids(out) == sorted(f"w{i}" for i in range(NUM_PROBLEMS)), "every problem exactly once"
    if side_by_side == 1:
        assert records(out) == records(reference_run)
    else:
        _same_records_to_rounding(out, reference_run)


def test_one_worker_searching_batches_side_by_side(reference_run, job_overrides, tmp_path):
    """One worker with 3 batches in flight: rounds of different batches share the policy's calls,
    and every record is the 2-worker reference's (floats to rounding)."""
    out = tmp_path / "out"
    metrics = run(compose(job_overrides(out, "ray.num_workers=1", "ray.batches_per_worker=3")))
    assert metrics["batches_side_by_side"] == 3
    _same_records_to_rounding(out, reference_run)


def test_the_audit_is_the_same_on_one_worker_and_two(ray_session, job_overrides, tiny_critics, tmp_path):
    """The critics' unsteered search of the audit runs in batches of `search.batch_problems` spread
    over the workers: one worker and two write the same audit.json. (The re-rollouts' chunks:
    `test_a_solving_policy_writes_the_same_records_with_one_worker_or_two`.)"""
    extra = [*tiny_critics, "rewards.audit_critic_problems=5"]
    audits = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run(compose(job_overrides(out, f"ray.num_workers={workers}", *extra)))
        audits.append(json.loads((out / "audit.json").read_text()))
    assert audits[0] == audits[1]
    assert audits[0]["critics"]["value"]["n"] > 0, "the critics were audited on searched nodes"
    assert len(audits[0]["critic_problems"]) == 5


def _arborist(*args: str) -> list[str]:
    return [sys.executable, "-m", "rewards.cli", *args]  # the `arborist` console script's entry


def test_sigkill_the_driver_then_resume(ray_session, reference_run, job_overrides, records, tmp_path):
    """Kill the driver process after its first shard; a rerun finishes the same dataset.

    The driver joins the tests' Ray session by address (what `ray.address=auto` does on a cluster),
    so Ray itself survives the kill, as a cluster would; the dead driver's actors go with it."""
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    cmd = _arborist("search", *job_overrides(out, f"ray.address={address}", "ray.num_workers=1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180

    def shards() -> int:  # the writer writes an empty manifest first: wait until a shard is logged
        try:
            return len((load_manifest(out) or {"shards": {}})["shards"])
        except (OSError, ValueError, KeyError):
            return 0

    while not shards() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    out_text, err = proc.communicate(timeout=30)
    assert shards(), f"no shard landed before the driver exited: {err[-2000:]}"
    landed = shards()
    assert landed < NUM_PROBLEMS // 2, "the driver must die mid-job, not after it"
    # no orphan: the dead driver's workers (pids from its log) go with it
    workers = [int(p) for m in re.findall(r"pids \[([\d, ]+)\]", out_text + err) for p in m.split(",")]
    assert workers, f"the driver did not log its workers' pids: {err[-1000:]}"
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), f"workers {workers} outlived their driver"

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"dataset written to {out}" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["problems_resumed"] == 2 * landed
    assert _tree_ids(out) == sorted(f"w{i}" for i in range(NUM_PROBLEMS))
    assert records(out) == records(reference_run)


def test_a_runtime_failure_is_one_line_and_exit_1(ray_session, job_overrides, tmp_path):
    """Workers that cannot start in time end the job with one `arborist: error:` line, exit 1 (a
    runtime failure, not bad input), and nothing recorded as finished."""
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    cmd = _arborist("search", *job_overrides(out, f"ray.address={address}", "ray.start_timeout_s=0.01"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("arborist: error:")]
    assert len(errors) == 1 and "ray.start_timeout_s" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    manifest = load_manifest(out)
    assert manifest is None or manifest["finished_problem_ids"] == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.cluster
@pytest.mark.skipif(
    not os.environ.get("ARBORIST_RAY_CLUSTER"),
    reason="needs a running `ray start --head` cluster: set ARBORIST_RAY_CLUSTER=auto (CI's .ci/run does)",
)
def test_job_on_a_ray_start_cluster(reference_run, job_overrides, records, tmp_path):
    """`arborist search ray.address=auto` against the cluster CI started; same records."""
    out = tmp_path / "out"
    address = os.environ["ARBORIST_RAY_CLUSTER"]
    cmd = _arborist("search", *job_overrides(out, f"ray.address={address}"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"dataset written to {out}" in done.stdout
    assert records(out) == records(reference_run)


_LISTENERS = r"""
import json, socket, struct, sys
import ray
from rewards.launcher import connect

def listening():
    found = set()
    for path, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(path).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            addr, port = local.split(":")
            raw = b"".join(struct.pack("<I", int(addr[i : i + 8], 16)) for i in range(0, len(addr), 8))
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found

before = listening()
with connect("local", 2, False):
    @ray.remote(num_cpus=0.5)
    class Probe:
        def ok(self):
            return True
    assert all(ray.get([Probe.remote().ok.remote() for _ in range(2)]))
    new = sorted(listening() - before)
json.dump([list(x) for x in new], sys.stdout)
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_a_local_ray_listens_on_loopback_only():
    """GCS, raylet, workers and agents of `ray.address=local`: no port reachable from elsewhere."""
    out = subprocess.run([sys.executable, "-c", _LISTENERS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ports = json.loads(out.stdout)
    assert len(ports) >= 4, f"expected Ray's GCS, raylet and workers to listen: {ports}"
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    wide = [p for p in ports if p[0] not in loopback]
    assert not wide, f"Ray ports bound beyond loopback: {wide}"


def test_what_ray_logs_while_joining_is_held_and_passed_on_only_if_it_joined(capfd):
    """Where an address answers but is no Ray cluster, Ray's client logs a retry a second before it
    fails; the job's one line replaces them. A join that succeeds loses nothing it wrote."""
    from rewards.launcher import _held_stderr

    with pytest.raises(ConnectionError), _held_stderr():
        os.write(2, b"gcs_client.cc:210: Failed to get cluster ID\n")
        raise ConnectionError("no cluster")
    with _held_stderr():
        os.write(2, b"joined, with a note\n")
    err = capfd.readouterr().err
    assert "gcs_client" not in err and "joined, with a note" in err


def test_ctrl_c_is_one_line_and_metrics_say_interrupted(ray_session, job_overrides, tmp_path):
    """SIGINT mid-job: one line, exit 130, no traceback; metrics.json says "interrupted", not
    "running"; the shards written stay finished (a rerun resumes from them)."""
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    cmd = _arborist("search", *job_overrides(out, f"ray.address={address}", "ray.num_workers=1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if (load_manifest(out) or {"shards": {}})["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("arborist:")] == [
        "arborist: interrupted: rerun the same command to resume"
    ], err[-2000:]
    assert "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["batches_run"] >= 1
    assert load_manifest(out)["finished_problem_ids"]
