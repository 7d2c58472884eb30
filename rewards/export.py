"""Records -> parquet shards + manifest + dataset card + audit report (pyarrow + stdlib only).

Layout of an output directory (see rewards/records.py for the columns):

    out/manifest.json        config, versions, seeds, finished problem ids, shards with row counts
    out/shards.jsonl         the shards finished since manifest.json was last written, one line each
    out/<kind>/<shard>.parquet   one file per kind per shard: pairs, steps, kto, sft, values, trees
    out/audit.json           `write_audit`
    out/README.md            `rewards.card.write_card`

Crash safety. Every file is written to a temporary name of its own (`.<name>.<pid>.<random>.tmp`)
in its own directory, fsynced, and moved into place with `os.replace` (atomic on POSIX). A shard's
parquet files are all in place *before* the manifest names the shard, and a problem id counts as
finished only once the manifest says so. A crash between the two leaves files the manifest does not
know; the next `DatasetWriter` on that directory deletes them, so re-running those problems never
duplicates a row. The sweep touches only what this job family writes (shard files `shard-*.parquet`
in the record directories, its own temporary names), and only in a directory that already held its
manifest (the writer writes an empty one before its first shard, so what a crash leaves after that
is swept on the next start). `arborist search` refuses a directory without a manifest that holds
files under the job's own names (README.md, audit.json, metrics.json, a record directory).

One writer per directory: `DatasetWriter` holds an exclusive lock (`flock` on `.arborist.lock`,
released when the writer is closed or its process dies, however it dies; or the caller's, taken
earlier, which the caller closes), and a second writer refuses in one line naming the holder's
pid. A resume must be the same job: the manifest records the config hash, and a writer with
another refuses, naming the keys that differ, unless told to append a run under its own config
(`append_run`). `lock_out_dir` takes that lock and writes the holder's pid into it; `check_resume`
compares a manifest's config and config hash with a new job's, leaving out where and how the job
runs (`RUN_ONLY`). Both refuse with `OutDirError`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from critics.metrics import json_safe
from mcts.finished import FinishedTree
from rewards import records
from rewards.records import KINDS

MANIFEST = "manifest.json"
SHARD_LOG = "shards.jsonl"
FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OWN_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # temp_path's names
_OWN_SHARD = re.compile(r"^shard-\d+\.parquet$")  # rewards.job.shard_name's files


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses (pid and random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# -- atomic files -----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_synced(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)  # make the rename itself durable


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        _replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_table(path: Path | str, table: pa.Table) -> None:
    """Parquet counterpart of `atomic_write_text`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if table.num_rows:
            pq.write_table(table, tmp)
        else:
            # No row group at all: `datasets` reads a file's batch size from its first row group and
            # fails on an empty one ("BatchSize must be greater than 0"), but skips a file with none.
            pq.ParquetWriter(tmp, table.schema).close()
        _replace_synced(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dumps(obj) -> str:
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def load_manifest(out_dir: Path | str) -> dict | None:
    """The manifest of an output directory with the shard log folded in (see the module docstring),
    or None if nothing was started there yet. A file that is not an arborist manifest is returned as
    it is, for the caller to refuse."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        return manifest
    logged = _logged_shards(Path(out_dir))
    for entry in logged:
        name = entry.pop("shard")
        if name not in manifest["shards"]:  # a log compacted but not yet removed repeats shards
            _add_shard(manifest, name, entry)
    if logged:
        manifest["finished_problem_ids"] = sorted(set(manifest["finished_problem_ids"]))
        manifest["seeds"] = sorted(set(manifest["seeds"]))
    return manifest


def _logged_shards(out_dir: Path) -> list[dict]:
    """The complete lines of the shard log (a torn last line, from a crash mid-append, is skipped)."""
    path = out_dir / SHARD_LOG
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]  # lines[-1]: "" or torn


def _add_shard(manifest: dict, name: str, entry: dict) -> None:
    """Name a finished shard in `manifest` (ids and seeds appended: sort them before writing)."""
    manifest["shards"][name] = entry
    manifest["finished_problem_ids"].extend(entry["problem_ids"])
    manifest["seeds"].extend(entry["seeds"])
    for kind in KINDS:
        manifest["rows"][kind] += entry["rows"][kind]
        manifest["files"][kind].append(entry["files"][kind])


# -- who may write an output directory -------------------------------------------------------------
LOCK = ".arborist.lock"


class OutDirError(ValueError):
    """An output directory this writer may not use (locked, or holding another job); one line."""


def lock_out_dir(out_dir: Path) -> int:
    """An exclusive, non-blocking lock on `out_dir` (its fd); OutDirError naming the holder if taken."""
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutDirError(
            f"out={out_dir} is in use by another arborist job (pid {holder}): wait for it to finish, "
            "or choose another out=DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


RUN_ONLY = ("out", "progress", "ray", "append_run")  # settings that do not shape the records


def differing_keys(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys of two (flattened) configs whose values differ, but for those under `ignore`."""
    return sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k.split(".")[0] not in ignore
    )


def check_resume(manifest: dict, config: dict, config_hash: str, append_run: bool, out: Path) -> None:
    """Refuse to add records to `out` under another config than its manifest's, unless `append_run`:
    one line naming the keys that differ (where and how the job runs may change: `RUN_ONLY`)."""
    if append_run:
        return
    old, new = _flat(manifest.get("config", {})), _flat(json_safe(config))
    keys = differing_keys(old, new, RUN_ONLY)
    if not keys and config_hash == manifest.get("config_hash", ""):
        return
    shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys[:4]) or "config hash"
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    raise OutDirError(
        f"out={out} holds a job with another config: {shown}{more} differ: resume with the same "
        "settings, choose another out=DIR, or add append_run=true to add a run under this config"
    )


# -- the writer -------------------------------------------------------------------------------------
class DatasetWriter:
    """Writes shards into `out_dir` and keeps `manifest.json` in step with them.

    config:   the job's configuration (plain JSON-able dict), recorded in the manifest. A resume
              under another config (or `config_hash`) refuses (`check_resume`) unless
              `append_run`: then the new config goes to `config_history`, and every record
              carries its own `config_hash`.
    versions: package versions etc., recorded as given.
    """

    def __init__(
        self,
        out_dir: Path | str,
        config: dict,
        versions: dict,
        config_hash: str = "",
        append_run: bool = False,
        lock: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = None
        # `lock`: the caller's fd of `lock_out_dir`, held since before the models were loaded (it
        # stays the caller's to close); else this writer takes the lock and releases it on close.
        self._lock = lock_out_dir(self.out_dir) if lock is None else None
        try:
            manifest = load_manifest(self.out_dir)
            ours = manifest is not None  # only a directory this job family wrote is swept
            if manifest is None or not manifest["shards"]:  # a job that finished nothing binds nothing
                manifest = {
                    "format": FORMAT_VERSION,
                    "config": config,
                    "config_hash": config_hash,
                    "config_history": [],
                    "versions": versions,
                    "seeds": [],
                    "finished_problem_ids": [],
                    "shards": {},
                    "rows": {k: 0 for k in KINDS},
                    "files": {k: [] for k in KINDS},
                }
            elif json_safe(config) != manifest["config"] or config_hash != manifest.get("config_hash", ""):
                check_resume(manifest, config, config_hash, append_run, self.out_dir)
                manifest["config_history"].append(
                    {"config": config, "config_hash": config_hash, "versions": versions, "at": time.time()}
                )
            self.manifest = json_safe(manifest)
            self._finished = set(self.manifest["finished_problem_ids"])
            # Written now: a new directory's manifest is the sweep's mark (this directory is ours, and
            # a stray log names nothing of ours); a resumed one folds its log in, a torn line dropped.
            self.compact()
            self.swept = self._sweep_unfinished() if ours else []
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory's lock (also released when the process ends)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sweep_unfinished(self) -> list[str]:
        """Delete this job family's files the manifest does not name (left by a crash): shard files in
        the record directories and temporary files of its own naming. Nothing else is touched."""
        known = {f for files in self.manifest["files"].values() for f in files}
        removed = []
        for kind in KINDS:
            kind_dir = self.out_dir / kind
            if not kind_dir.is_dir():
                continue
            for p in sorted(kind_dir.iterdir()):
                rel = f"{kind}/{p.name}"
                if _OWN_TEMP.match(p.name) or (_OWN_SHARD.match(p.name) and rel not in known):
                    p.unlink()
                    removed.append(rel)
        for p in sorted(self.out_dir.iterdir()):
            if _OWN_TEMP.match(p.name):
                p.unlink()
                removed.append(p.name)
        return removed

    def finished_ids(self) -> set[str]:
        """Problem ids whose records are on disk and named by the manifest: skip these on resume."""
        return set(self._finished)

    def write_shard(
        self,
        kind_rows: dict[str, list[dict]],
        problem_ids: list[str],
        shard_name: str,
        problems_sha: str | None = None,
    ) -> dict:
        """Write one shard: `<kind>/<shard_name>.parquet` for every kind (0-row files for missing or
        empty kinds), then the manifest. Returns the shard's manifest entry; `problems_sha` (the
        batch's content, `rewards.job.problems_sha`) is kept in it.

        Writing a shard name again with the same problem ids is a no-op (a retried task); with other
        ids, or ids that another shard already finished, it raises ValueError: either would duplicate
        or silently replace records.
        """
        if not _SHARD_NAME.match(shard_name):
            raise ValueError(
                f"shard name {shard_name!r}: use letters, digits, '.', '_' or '-' (e.g. 'shard-00012')"
            )
        unknown = set(kind_rows) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown record kinds {sorted(unknown)}; expected a subset of {list(KINDS)}")
        ids = sorted(set(map(str, problem_ids)))
        shards = self.manifest["shards"]
        if shard_name in shards:
            if shards[shard_name]["problem_ids"] == ids:
                return shards[shard_name]
            raise ValueError(
                f"shard {shard_name!r} already holds problems {shards[shard_name]['problem_ids'][:5]}..., "
                f"not {ids[:5]}...: pick a new shard name"
            )
        done = self._finished.intersection(ids)
        if done:
            raise ValueError(
                f"problems {sorted(done)[:5]} are already finished in {self.out_dir}: "
                "drop DatasetWriter.finished_ids() from the work before writing"
            )
        tables = {
            kind: records.to_table(kind, kind_rows.get(kind, [])) for kind in KINDS
        }  # validate all first
        files: dict[str, str] = {}
        for kind, table in tables.items():
            (self.out_dir / kind).mkdir(exist_ok=True)
            files[kind] = f"{kind}/{shard_name}.parquet"
            atomic_write_table(self.out_dir / files[kind], table)
        seeds = sorted({int(r["seed"]) for r in kind_rows.get("trees", [])})
        entry = {
            "problem_ids": ids,
            "files": files,
            "rows": {kind: t.num_rows for kind, t in tables.items()},
            "seeds": seeds,
            "written_at": time.time(),
            **({"problems_sha": problems_sha} if problems_sha else {}),
        }
        self._log_shard({"shard": shard_name, **entry})  # memory follows disk, not ahead of it
        _add_shard(self.manifest, shard_name, entry)
        self._finished.update(ids)
        return entry

    def _log_shard(self, entry: dict) -> None:
        """Append one finished shard to the log: one line, written and fsynced before it counts."""
        line = (json.dumps(json_safe(entry), sort_keys=True, allow_nan=False) + "\n").encode()
        fd = os.open(self.out_dir / SHARD_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(line):  # a full disk may take part of it and fail the rest
                done += os.write(fd, line[done:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # a torn line must not stay for the next entry to bury mid-file
            raise
        finally:
            os.close(fd)

    def compact(self) -> None:
        """Rewrite `manifest.json` with every shard (sorted ids and seeds) and remove the log: at a
        writer's start and at the job's end, never per shard."""
        self.manifest["finished_problem_ids"] = sorted(self._finished)
        self.manifest["seeds"] = sorted(set(self.manifest["seeds"]))
        self._write_manifest(self.manifest)
        (self.out_dir / SHARD_LOG).unlink(missing_ok=True)

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_text(self.out_dir / MANIFEST, _dumps(manifest))


def read_rows(out_dir: Path | str, manifest: dict, kind: str) -> list[dict]:
    """Rows of one kind from the files `manifest` names, in shard-name order (not completion order),
    so that what is computed from them does not depend on which batch finished first."""
    return [row for shard in iter_shards(out_dir, manifest, (kind,)) for row in shard[kind]]


def iter_shards(
    out_dir: Path | str, manifest: dict, kinds: tuple[str, ...]
) -> Iterator[dict[str, list[dict]]]:
    """Each shard's rows of `kinds` ({kind: rows}), one shard at a time, in shard-name order: a
    reader of a large dataset holds one shard."""
    for name in sorted(manifest["shards"]):
        files = manifest["shards"][name]["files"]
        yield {kind: pq.read_table(Path(out_dir) / files[kind]).to_pylist() for kind in kinds}


def read_trees(out_dir: Path | str) -> list[FinishedTree]:
    """Every finished tree of an output directory, a killed job's finished shards included, in
    shard-name order (what is trained on them must not depend on which batch finished first)."""
    manifest = load_manifest(out_dir) or {"shards": {}}
    return [FinishedTree.from_row(r) for r in read_rows(out_dir, manifest, "trees")]


def write_audit(out_dir: Path | str, audit: dict) -> Path:
    """`out/audit.json`, atomically, strict JSON (NaN written as null)."""
    path = Path(out_dir) / "audit.json"
    atomic_write_text(path, _dumps(audit))
    return path
