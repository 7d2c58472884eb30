"""The driver's memory and manifest writes against the size of the job: flat, not growing with it.

    python -m benchmarks.memory                          # 2,000 and 20,000 problems
    python -m benchmarks.memory --json out/benchmarks/memory.json

Each size runs in a fresh process: the driver's data path of `arborist search` for every batch
(search, `derive_all`, `DatasetWriter.write_shard`), then `compact` and the streaming audit
(`rewards.audit.audit_shards` over `rewards.export.iter_shards`). The model is a scripted stand-in
(no torch): on Countdown it offers the solver's next step and a few wrong ones, so the trees hold
verified successes and failures and the derivation writes real pairs. Reported per size: the
process's peak RSS, and the bytes the manifest took per shard (the shard log's lines) and in all.

What it does not measure: Ray (the workers hold the models; the driver only receives trees) and the
re-rollouts of the audit (a fixed-size sample, answered here by a stand-in too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import environment, format_table, write_json

SIZES = (2000, 20000)
BATCH = 16  # search.batch_problems


class ScriptedCountdown:
    """The expander of this benchmark, no model: at every state the solver's next step (from the
    root's solution, while on it) and other valid steps (the sums of the state's first numbers), each
    with the evidence of 4 scripted rollouts: a state the solver can finish from succeeds in all 4,
    any other fails all 4. The trees hold verified successes and failures, and real pairs."""

    def __init__(self, task):
        from mcts.tasks.countdown import _numbers_and_target, apply_op, format_step, parse_step, solve

        self.task, self.solve, self.numbers = task, solve, _numbers_and_target
        self.parse, self.apply, self.format = parse_step, apply_op, format_step

    def _state(self, numbers: list[int], steps) -> list[int]:
        pool = list(numbers)
        for step in steps:
            a, op, b, c = self.parse(step)
            pool.remove(a)
            pool.remove(b)
            pool.append(c)
        return pool

    def __call__(self, leaves, seed):
        from mcts.base import Child, Expansion

        out = []
        for leaf in leaves:
            numbers, target = self.numbers(leaf.problem)
            pool = self._state(numbers, leaf.steps)
            texts = []
            solution = self.solve(numbers, target) or []
            if list(leaf.steps) == solution[: len(leaf.steps)] and len(leaf.steps) < len(solution):
                texts.append(solution[len(leaf.steps)])
            for i in range(1, len(pool)):
                texts.append(self.format(pool[0], "+", pool[i], pool[0] + pool[i]))
            children = []
            for text in dict.fromkeys(texts[: leaf.num_options]):
                if text in leaf.existing:
                    continue
                steps = [*leaf.steps, text]
                check = self.task.check(leaf.problem, steps)
                solvable = check.success is True or (
                    not check.terminal and self.solve(self._state(numbers, steps), target) is not None
                )
                outcome = int(check.success is True) if check.terminal else -1
                children.append(
                    Child(text, 1.0 / len(texts), float(solvable), success=float(solvable), verified=True,
                          terminal=check.terminal, outcome=outcome, num_tokens=len(text),
                          rollout_trials=0 if check.terminal else 4,
                          rollout_successes=0 if check.terminal else 4 * int(solvable))
                )  # fmt: skip
            out.append(Expansion(children, sum(c.num_tokens for c in children)))
        return out


def run_size(n: int, out: Path, whole: bool = False) -> dict:
    """One job of `n` problems through the driver's data path, in this process."""
    from mcts.base import SearchConfig
    from mcts.search import run_search
    from mcts.tasks.countdown import CountdownTask, generate_problems
    from rewards.audit import Shard, audit_shards
    from rewards.derive import DeriveConfig, derive_all
    from rewards.export import SHARD_LOG, DatasetWriter, iter_shards
    from rewards.job import shard_name

    task = CountdownTask()
    problems = generate_problems(n, seed=0)
    expander = ScriptedCountdown(task)
    search = SearchConfig(simulations=16)
    derive = DeriveConfig()
    t0 = time.perf_counter()
    line_bytes: list[int] = []
    with DatasetWriter(out, {"benchmark": "memory", "problems": n}, {}) as writer:
        for i in range(0, n, BATCH):
            batch = problems[i : i + BATCH]
            trees = run_search(batch, task, expander, search, seed=i)
            before = (out / SHARD_LOG).stat().st_size if (out / SHARD_LOG).exists() else 0
            writer.write_shard(derive_all(trees, derive), [p.id for p in batch], shard_name(i // BATCH))
            line_bytes.append((out / SHARD_LOG).stat().st_size - before)
        rss_after_search = _peak_rss_mb()
        writer.compact()
        manifest = writer.manifest

    def rerollout(items, k):  # the audit's fresh rollouts: a stand-in rate per prefix
        return [0.5] * len(items)

    shards = (Shard.from_rows(rows) for rows in iter_shards(out, manifest, Shard.KINDS))
    if whole:  # the audit as it read the dataset before: every shard in memory at once
        every = list(shards)
        shards = [Shard([t for sh in every for t in sh.trees], [p for sh in every for p in sh.pairs])]
    report = audit_shards(
        shards, manifest["rows"]["pairs"], rerollout=rerollout, sample_pairs=256, greedy=None, sample_seed=0
    )
    return {
        "problems": n,
        "audit_reads": "whole dataset" if whole else "one shard at a time",
        "shards": len(line_bytes),
        "pairs": manifest["rows"]["pairs"],
        "search_success": report["search_success"],
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb_after_search": round(rss_after_search, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "manifest_bytes_per_shard": {"first": line_bytes[0], "last": line_bytes[-1], "max": max(line_bytes)},
        "manifest_bytes_total": sum(line_bytes),
        "manifest_json_bytes": (out / "manifest.json").stat().st_size,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def plot(report: dict, path) -> Path:
    """Driver peak RSS of each size (and of the audit that reads every shard at once, where run),
    the manifest's largest line per shard above."""
    from benchmarks._report import bar_plot

    sizes = report["sizes"]
    labels = [f"{s['problems']:,} problems\naudit: {s['audit_reads']}" for s in sizes]
    series = {
        "peak RSS after the search, MB": [s["peak_rss_mb_after_search"] for s in sizes],
        "peak RSS, MB": [s["peak_rss_mb"] for s in sizes],
    }
    per_shard = [f"{s['manifest_bytes_per_shard']['max']} B/shard" for s in sizes]
    return bar_plot(path, labels, series, "MB", "driver memory", log=False, annotate=per_shard)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--json", default="")
    ap.add_argument("--plot", default="", help="PNG: peak RSS of each size")
    ap.add_argument(
        "--whole", action="store_true", help="also audit the largest size reading every shard at once"
    )
    ap.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: one size, this process
    args = ap.parse_args(argv)
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run_size(args.one, Path(tmp) / "out", args.whole)))
        return 0
    results = []
    runs = [(n, []) for n in args.sizes] + ([(args.sizes[-1], ["--whole"])] if args.whole else [])
    for n, extra in runs:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory", "--one", str(n), *extra],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"{n} problems: peak RSS {results[-1]['peak_rss_mb']} MB ({results[-1]['seconds']} s)",
            file=sys.stderr,
        )
    small, large = results[0], results[len(args.sizes) - 1]
    summary = {
        "rss_growth_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
        "manifest_bytes_per_shard_growth": large["manifest_bytes_per_shard"]["last"]
        - small["manifest_bytes_per_shard"]["first"],
    }
    rows = [{**r, "bytes_per_shard": r["manifest_bytes_per_shard"]["max"]} for r in results]
    columns = [
        ("problems", "problems", ","),
        ("audit_reads", "audit reads", "s"),
        ("shards", "shards", ","),
        ("pairs", "pairs", ","),
        ("peak_rss_mb", "peak RSS MB", ".1f"),
        ("bytes_per_shard", "manifest B/shard (max)", ","),
        ("seconds", "s", ".1f"),
    ]
    print(format_table(rows, columns))
    print(
        f"RSS growth {summary['rss_growth_mb']} MB from {small['problems']} to {large['problems']} problems"
    )
    report = {"environment": environment(), "sizes": results, **summary}
    if args.json:
        write_json(args.json, report)
    if args.plot:
        print(f"wrote {plot(report, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
