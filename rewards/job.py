"""What the job's modules share below them: its input error, its shard names, its version record."""

from __future__ import annotations

import re
import socket
import sys
from importlib import metadata


class JobInputError(ValueError):
    """A bad setting or input of the job; the message is one line saying what to change."""


def check_cluster_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a `host:port` Ray address nothing answers on, in seconds and one line (Ray's own
    client retries for ~20 s and logs a line a second). `local`, `auto` and anything else that is
    not host:port are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)", address.strip())
    if not match:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as e:
        raise JobInputError(
            f"ray.address={address}: no Ray cluster reachable ({e.strerror or e}): start one with "
            "`ray start --head`, or run locally with ray.address=local"
        ) from None


def problems_sha(problems) -> str:
    """A batch's problems by content (`content_key`), in id order: kept with its shard, so that a
    resume whose problems changed content under the same ids is refused, not skipped."""
    import hashlib

    from mcts.tasks.base import content_key

    keys = [f"{p.id}\t{content_key(p.question, p.meta)}" for p in sorted(problems, key=lambda p: p.id)]
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    """Batch `index` is written as shard `shard-<index>`: a redone batch lands under the same name."""
    return f"shard-{index:05d}"


def versions() -> dict:
    """Package versions recorded in the manifest (metadata only: nothing heavy is imported)."""
    out = {"python": sys.version.split()[0]}
    for pkg in ("arborist", "numpy", "numba", "torch", "transformers", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out
