"""What the job's modules share below them: its input error, its shard names, its version record."""

from __future__ import annotations

import sys
from importlib import metadata


class JobInputError(ValueError):
    """A bad setting or input of the job; the message is one line saying what to change."""


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
