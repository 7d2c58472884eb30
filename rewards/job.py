"""What the job's modules share below them: its input error, its shard names, its version record."""

from __future__ import annotations

import os
import re
import socket
import sys
from importlib import metadata


class JobInputError(ValueError):
    """A bad setting or input of the job; the message is one line saying what to change."""


def check_local_resources(ray) -> None:
    """Refuse workers the local Ray (`ray.address=local`) could never place: a worker asking for
    more CPUs than it has, or for a GPU where torch sees none, would wait `ray.start_timeout_s`."""
    if ray.address != "local":
        return
    cpus = ray.num_cpus or os.cpu_count() or 1
    if ray.cpus_per_worker > cpus:
        raise JobInputError(
            f"ray.cpus_per_worker={ray.cpus_per_worker}, but the local Ray has {cpus} CPUs: no worker could "
            "start; lower it, or join a cluster (ray.address=auto)"
        )
    if ray.gpus_per_worker > 0:
        import torch

        if ray.gpus_per_worker > torch.cuda.device_count():
            raise JobInputError(
                f"ray.gpus_per_worker={ray.gpus_per_worker}, but torch sees {torch.cuda.device_count()} GPUs "
                "here: set ray.gpus_per_worker=0, or join a cluster that has them (ray.address=auto)"
            )


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
    """The problems' content (id, question, answer, meta, in order): the job's inputs in its config
    hash, and each shard's batch, so that a resume whose problems changed under the same ids is
    refused, not skipped."""
    import hashlib
    import json

    rows = [[p.id, p.question, p.answer, p.meta] for p in problems]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
