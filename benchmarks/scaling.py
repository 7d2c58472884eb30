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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._report import environment, format_table, write_json


def run_job(out: Path, problems: int, workers: int, seed: int) -> dict:
    load = os.getloadavg()[0]
    cmd = [
        sys.executable, "-c", "import sys; from rewards.cli import main; sys.exit(main(sys.argv[1:]))",
        "search", f"out={out}", f"task.num_problems={problems}", f"seed={seed}", f"ray.num_workers={workers}",
        "rewards.audit_pairs=0", "rewards.audit_critic_problems=0", "rewards.greedy_baseline=false", "progress=false",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"arborist search failed ({done.returncode}): {done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "workers": workers,
        "search_seconds": metrics["search_seconds"],
        "wall_seconds": metrics["wall_seconds"],
        "nodes_per_s": metrics["nodes_per_s"],
        "worker_batch_seconds": metrics["worker_batch_seconds"],
        "load_average_before": round(load, 2),
        "batches_by_worker": metrics.get("batches_by_worker"),
    }


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for workers in (1, 2):
            outs[workers] = Path(tmp) / f"w{workers}"
            results.append(run_job(outs[workers], args.problems, workers, args.seed))
            print(f"{workers} worker(s): search {results[-1]['search_seconds']} s", file=sys.stderr)
        same = records(outs[1]) == records(outs[2])
    speedup = results[0]["search_seconds"] / results[1]["search_seconds"]
    columns = [
        ("workers", "workers", ","),
        ("search_seconds", "search s", ".1f"),
        ("wall_seconds", "job s", ".1f"),
        ("nodes_per_s", "nodes/s", ".1f"),
        ("worker_batch_seconds", "worker busy s", ".1f"),
        ("load_average_before", "load before", ".2f"),
    ]
    print(format_table(results, columns))
    print(f"speedup with 2 workers: {speedup:.2f}x; identical records: {same}")
    if args.json:
        write_json(
            args.json,
            {
                "environment": environment(),
                "problems": args.problems,
                "speedup_2_workers": round(speedup, 3),
                "identical_records": same,
                "runs": results,
            },
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
