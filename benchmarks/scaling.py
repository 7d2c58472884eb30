"""Ray scaling of the search job: 1 worker against 2 on the same problems, same seed, same records.

    python -m benchmarks.scaling                              # 128 problems, 1 then 2 workers
    python -m benchmarks.scaling --problems 256 --json out/benchmarks/scaling.json

Each run is a fresh `arborist search` process (its own local Ray) on the default settings, with the
audit's model work off (`rewards.audit_pairs=0`, no critic audit, no greedy baseline) so that what is
timed is the search phase: `search_seconds` from the job's metrics.json (from the first batch
submitted to the last shard written). Reported: `speedup_2_workers` = search seconds with 1 worker /
with 2, the workers' busy seconds summed over batches (equal in both runs when two workers do not
slow each other), whether the two runs wrote identical records (they must), and the machine's
load average before each run (how idle it was). On 2 cores the ceiling is 2x.

`--two-node` adds a third run on a two-node Ray cluster started with `ray start` on this machine: a
head and a second node, each offering one CPU, joined as cluster nodes are, and the job with `ray=cluster`
(one whole CPU per worker, so Ray must place one worker on each node). Reported as
`speedup_two_nodes` (1 local worker / 2 workers on two nodes) and whether its records are identical
too. The cluster is stopped by killing its own processes (everything started under its private
temp dir): `ray stop` would kill every Ray process on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks._report import environment, format_table, write_json


def _token_env() -> dict[str, str]:
    """A `ray start` cluster has token authentication on: a joining node, `ray status` and the job
    must be told to send the token."""
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def run_job(out: Path, problems: int, workers: int, seed: int, cluster: str = "") -> dict:
    load = os.getloadavg()[0]
    cmd = [
        sys.executable, "-c", "import sys; from rewards.cli import main; sys.exit(main(sys.argv[1:]))",
        "search", f"out={out}", f"task.num_problems={problems}", f"seed={seed}", f"ray.num_workers={workers}",
        "rewards.audit_pairs=0", "rewards.audit_critic_problems=0", "rewards.greedy_baseline=false", "progress=false",
    ]  # fmt: skip
    if cluster:
        cmd += ["ray=cluster", f"ray.address={cluster}"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=_token_env() if cluster else None
    )
    if done.returncode != 0:
        raise RuntimeError(f"arborist search failed ({done.returncode}): {done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "workers": workers,
        "ray": "two nodes (ray start)" if cluster else "local",
        "search_seconds": metrics["search_seconds"],
        "wall_seconds": metrics["wall_seconds"],
        "nodes_per_s": metrics["nodes_per_s"],
        "worker_batch_seconds": metrics["worker_batch_seconds"],
        "load_average_before": round(load, 2),
        "batches_by_worker": metrics.get("batches_by_worker"),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_under(marker: str) -> list[int]:
    """Pids whose command line names `marker`, or that hold a file under it open: every process of
    a Ray node names its temp dir or logs there, but its agents and client server rename their
    command line (`ray::DashboardAgent`), and were left running by a match on command lines alone."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") or any(
                    os.readlink(fd).startswith(marker) for fd in (entry / "fd").iterdir()
                ):
                    pids.append(int(entry.name))
            except OSError:  # the process ended meanwhile, or is not ours to read
                continue
    return pids


def active_nodes(address: str) -> int:
    """How many nodes `ray status` lists as active in the cluster at `address`."""
    done = subprocess.run(
        ["ray", "status", f"--address={address}"], capture_output=True, text=True, env=_token_env()
    )
    text = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in text.splitlines() if line.strip().startswith("1 node_"))


def _wait_for_nodes(address: str, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while active_nodes(address) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the cluster at {address} did not reach {n} active nodes in {timeout_s:.0f} s"
            )
        time.sleep(1.0)


@contextlib.contextmanager
def two_node_cluster() -> Iterator[str]:
    """A head and a second Ray node on this machine (`ray start`, one CPU each, as on a real cluster);
    yields the head's address, then kills the processes of this cluster and no other."""
    temp = tempfile.mkdtemp(prefix="arb-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    node = ["--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats"]

    def ray_start(*args: str) -> str:
        done = subprocess.run(
            ["ray", "start", *args, *node], capture_output=True, text=True, env=_token_env()
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray start {args[0]} failed: {(done.stderr or done.stdout)[-1500:]}")
        return done.stdout + done.stderr

    try:
        said = ray_start("--head", f"--port={port}", "--include-dashboard=false")
        # the address Ray names this machine by (it would rewrite 127.0.0.1 to it anyway)
        ip = re.search(r"Local node IP: ([0-9.]+)", re.sub(r"\x1b\[[0-9;]*m", "", said))
        if ip is None:
            raise RuntimeError(f"ray start --head did not say its node IP: {said[-800:]}")
        address = f"{ip.group(1)}:{port}"
        ray_start(f"--address={address}")
        _wait_for_nodes(address, 2, timeout_s=120.0)
        yield address
    finally:
        for _ in range(3):
            pids = _processes_under(temp)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(1.0)
        shutil.rmtree(temp, ignore_errors=True)


def records(out: Path) -> dict[str, list[str]]:
    """Every record per kind as sorted canonical JSON (the shards' order does not matter)."""
    import pyarrow.parquet as pq

    from rewards.export import load_manifest

    manifest = load_manifest(out)
    return {
        kind: sorted(
            json.dumps(r, sort_keys=True, default=str)
            for f in files
            for r in pq.read_table(out / f).to_pylist()
        )
        for kind, files in manifest["files"].items()
    }


def plot(report: dict, path) -> Path:
    """Search and job seconds of each run, the speedup over one worker above it."""
    from benchmarks._report import bar_plot

    runs = report["runs"]
    labels = [f"{r['workers']} worker(s), {r['ray']}" for r in runs]
    series = {"search s": [r["search_seconds"] for r in runs], "job s": [r["wall_seconds"] for r in runs]}
    speedups = [""] + [f"{runs[0]['search_seconds'] / r['search_seconds']:.2f}x" for r in runs[1:]]
    title = f"Ray scaling, {report['problems']} problems"
    return bar_plot(path, labels, series, "seconds", title, log=False, annotate=speedups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--two-node", action="store_true", help="add a run on a two-node `ray start` cluster")
    ap.add_argument("--json", default="")
    ap.add_argument("--plot", default="", help="PNG: seconds of each run, speedups above")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for workers in (1, 2):
            outs[workers] = Path(tmp) / f"w{workers}"
            results.append(run_job(outs[workers], args.problems, workers, args.seed))
            print(f"{workers} worker(s): search {results[-1]['search_seconds']} s", file=sys.stderr)
        want = records(outs[1])
        same = want == records(outs[2])
        if args.two_node:
            with two_node_cluster() as address:
                nodes = active_nodes(address)
                results.append(run_job(Path(tmp) / "nodes2", args.problems, 2, args.seed, cluster=address))
                results[-1]["active_nodes"] = nodes
            print(f"2 workers on two nodes: search {results[-1]['search_seconds']} s", file=sys.stderr)
            same_nodes = want == records(Path(tmp) / "nodes2")
    speedup = results[0]["search_seconds"] / results[1]["search_seconds"]
    columns = [
        ("workers", "workers", ","),
        ("ray", "ray", ""),
        ("search_seconds", "search s", ".1f"),
        ("wall_seconds", "job s", ".1f"),
        ("nodes_per_s", "nodes/s", ".1f"),
        ("worker_batch_seconds", "worker busy s", ".1f"),
        ("load_average_before", "load before", ".2f"),
    ]
    print(format_table(results, columns))
    print(f"speedup with 2 workers: {speedup:.2f}x; identical records: {same}")
    report = {
        "environment": environment(),
        "problems": args.problems,
        "speedup_2_workers": round(speedup, 3),
        "identical_records": same,
        "runs": results,
    }
    if args.two_node:
        report["speedup_two_nodes"] = round(results[0]["search_seconds"] / results[2]["search_seconds"], 3)
        report["identical_records_two_nodes"] = same_nodes
        same = same and same_nodes
        print(f"speedup on two nodes: {report['speedup_two_nodes']:.2f}x; identical records: {same_nodes}")
    if args.json:
        write_json(args.json, report)
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
