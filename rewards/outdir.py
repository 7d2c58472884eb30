"""Who may write an output directory: one job at a time (an exclusive lock), and only the job that
started it, unless told to append a run under another config.

`lock_out_dir` takes a `flock` on `out/.arborist.lock` and writes the holder's pid into it; the
lock goes when its fd is closed or its process dies, however it dies. `check_resume` compares a
manifest's config and config hash with a new job's, leaving out where and how the job runs
(`RUN_ONLY`), and names the keys that differ.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path

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


def json_safe(obj):
    """NaN/inf -> None so the JSON is strict (json.dumps would write the non-standard `NaN`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars, without importing numpy
        return json_safe(obj.item())
    return obj
