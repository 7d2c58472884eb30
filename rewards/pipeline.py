"""The job: a Hydra app around a plain `run(cfg)`.

    arborist search                                # built-in Countdown, embedded default models, local Ray
    arborist search out=data seed=3 ray.num_workers=4
    arborist search ray.address=auto              # join a running `ray start --head` cluster

Config groups (`conf/`): task, policy, critics, search, rewards, ray, and an optional experiment.
The dataclasses below are their schemas (registered in Hydra's ConfigStore), so a key that does not
exist or a value of the wrong type fails at composition; `check_config` then checks the numbers
(`__post_init__` of each schema) and the inputs: the problem file, the model directories and the
output directory. All of that happens before Ray starts or anything is written, so bad input ends
in one line and an untouched output directory (see `rewards.cli`).

Unit of work: a fixed batch of consecutive problems (`search.batch_problems`). Its search seed
comes from the base seed and its problem ids (`mcts.search.problem_seed`), and it becomes shard
`shard-<batch index>`. So the records depend neither on which worker ran a batch, nor on retries,
nor on how often the job was resumed: a batch is either named by the manifest (skipped) or redone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mcts.tasks.base import Problem, TaskInputError
from rewards.config import CONF_DIR, Config, TaskConf
from rewards.job import JobInputError, check_cluster_address, check_local_resources, problems_sha, shard_name

log = logging.getLogger("arborist")


# -- checking the inputs --------------------------------------------------------------------------------
@dataclass
class Job:
    """A checked config and what it resolves to; everything the driver needs before Ray starts."""

    conf: Config
    problems: list[Problem]
    batches: list[list[Problem]]
    config: dict  # plain JSON-able config, recorded in the manifest
    config_hash: str  # of everything that shapes the records (not out, progress or ray)
    out: Path


def to_schema(cfg: DictConfig | Config) -> Config:
    """The typed config; every group's `__post_init__` checks its numbers. Raises JobInputError."""
    if isinstance(cfg, Config):
        return cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:  # to_object would quietly fall back to the schema's default
        raise JobInputError(f"{missing[0]} is required: set {missing[0]}=...")
    try:
        conf = OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        raise JobInputError(str(e).splitlines()[0]) from None
    for name, seed in (
        ("seed", conf.seed),
        ("task.seed", getattr(conf.task, "seed", 0)),  # a problem file has none
        ("policy.bootstrap_seed", conf.policy.bootstrap_seed),
    ):
        if not 0 <= seed < 2**63:  # the trees' int64 columns hold it; a bigger one failed mid-job
            raise JobInputError(f"{name}={seed}: a seed must be in [0, 2**63)")
    extra = _unknown_keys(conf)
    if extra:  # Hydra's `+key=value` adds a key the schema lacks; nothing would read it
        raise JobInputError(
            f"unknown setting {extra[0]!r}: no such key (a misspelling, or added with +?); "
            "`arborist search --cfg job` lists every setting"
        )
    return conf


def _unknown_keys(node: object, prefix: str = "") -> list[str]:
    """Keys on a schema object that are not its fields (`to_object` keeps them as attributes)."""
    if not dataclasses.is_dataclass(node):
        return []
    fields = {f.name for f in dataclasses.fields(node)}
    out = [prefix + k for k in vars(node) if k not in fields]
    for name in sorted(fields):
        out += _unknown_keys(getattr(node, name), f"{prefix}{name}.")
    return out


def task_settings(task: TaskConf) -> dict:
    """The task group as keyword arguments of `mcts.tasks.make_task` / `load_problems`."""
    settings = dataclasses.asdict(task)
    settings.pop("name")
    settings["path"] = settings["path"] or None
    return settings


def _distinct(problems: list[Problem]) -> list[Problem]:
    """Each problem once by content (`content_key`): a duplicate would be searched twice and its
    records written twice under two ids. Later copies are dropped, with a note."""
    from mcts.tasks.base import content_key

    seen: set[str] = set()
    out = [p for p in problems if not ((k := content_key(p.question, p.meta)) in seen or seen.add(k))]
    if len(out) < len(problems):
        log.warning("dropped %d problems that repeat an earlier one's content", len(problems) - len(out))
    return out


def check_config(cfg: DictConfig | Config) -> Job:
    """Check everything that can be checked without training or loading a model.

    Raises JobInputError, TaskInputError or PolicyLoadError with a one-line message.
    """
    from mcts.tasks.registry import load_problems, make_task

    conf = to_schema(cfg)
    settings = task_settings(conf.task)
    make_task(conf.task.name, **settings)  # its own settings checked; the problem list's ignored
    problems = _distinct(load_problems(conf.task.name, **settings))
    if not problems:
        raise TaskInputError(f"task {conf.task.name!r} has no problems: check task.path / task.num_problems")
    _check_model_dirs(conf)
    check_cluster_address(conf.ray.address)
    check_local_resources(conf.ray)
    size = conf.search.batch_problems
    batches = [problems[i : i + size] for i in range(0, len(problems), size)]
    if not conf.out.strip():
        raise JobInputError("out is empty: name the output directory, e.g. out=arborist-out")
    out = Path(conf.out).expanduser().resolve()
    plain = OmegaConf.to_container(OmegaConf.structured(conf), resolve=True)
    plain["inputs"] = input_hashes(conf, problems)
    shaping = {k: v for k, v in plain.items() if k not in ("out", "progress", "ray", "append_run")}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    _check_out(out, batches, plain, digest, conf.append_run)
    return Job(conf, problems, batches, plain, digest, out)


def input_hashes(conf: Config, problems: list[Problem]) -> dict:
    """What shapes the records beyond the settings: the problems' content, the policy's and the
    critics' weights (local directories, an ensemble's members included), and the embedded critics'
    recipe (their weights follow from it; the embedded policy is fixed by its seed and recipe
    version). A resume across a critic rebuild would mix records scored by two sets of critics."""
    out = {"problems_sha": problems_sha(problems)}
    for key, path in (
        ("policy_weights_sha", conf.policy.path),
        ("rollout_weights_sha", conf.policy.rollout_path),
    ):
        if path:
            out[key] = weights_fingerprint(Path(path))
    for kind, path in conf.critics.paths().items():
        if path and path != "default":
            out[f"{kind}_critic_weights_sha"] = weights_fingerprint(Path(path), "**/*.safetensors")
    if builds_default_critics(conf):
        from rewards.critic_bootstrap import recipe

        text = json.dumps(recipe(), sort_keys=True)
        out["default_critics_recipe_sha"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def weights_fingerprint(path: Path, pattern: str = "*.safetensors", chunk: int = 64 << 20) -> str:
    """sha256 of each safetensors file's size and its first and last `chunk` bytes: cheap for a
    multi-GB model, and any retraining changes the first tensors' bytes. `pattern`: which files
    ("**/*.safetensors" takes a critic ensemble's members too)."""
    h = hashlib.sha256()
    for f in sorted(path.glob(pattern)):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}|{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > 2 * chunk:
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def _check_model_dirs(conf: Config) -> None:
    from mcts.hf import check_policy_dir

    if conf.policy.path:
        check_policy_dir(conf.policy.path)
    if conf.policy.rollout_path:
        check_policy_dir(conf.policy.rollout_path)
    for kind, path in conf.critics.paths().items():
        if path and path != "default":
            from critics.models import check_critic_dir

            try:
                check_critic_dir(path, kind, conf.task.name)
            except ValueError as e:
                raise JobInputError(str(e).splitlines()[0]) from None


def warn_unreadable_prompts(job: Job) -> None:
    """`_check_policy_reads` on the prompts of the job's first 64 problems."""
    from mcts.tasks.registry import make_task

    task = make_task(job.conf.task.name, **task_settings(job.conf.task))
    _check_policy_reads(job.conf, [task.prompt(p) for p in job.problems[:64]])


def _check_policy_reads(conf: Config, prompts: list[str]) -> None:
    """Warn where the policy's tokenizer has no tokens for the task's text (the embedded Countdown
    model on word problems reads every letter as its unknown token, and searches on noise). A
    warning, not a refusal: a tokenizer without byte fallback may lack a rare character or two."""
    from mcts.charlm import build_char_tokenizer
    from mcts.hf import load_policy_tokenizer

    for name, path in (("policy.path", conf.policy.path), ("policy.rollout_path", conf.policy.rollout_path)):
        if not path and name == "policy.rollout_path":
            continue
        tok = (
            load_policy_tokenizer(path, conf.policy.trust_remote_code, name)
            if path
            else build_char_tokenizer()
        )
        unk = tok.unk_token_id
        text = "".join(dict.fromkeys("".join(prompts)))  # each character once
        lost = [c for c in text if unk is not None and unk in tok(c, add_special_tokens=False)["input_ids"]]
        if lost:
            who = f"{name}={path}" if path else "the embedded policy (a Countdown model)"
            log.warning(
                "%s has no token for %d characters of the task's prompts (%r): it reads them as its unknown "
                "token. Is it the model of this task? (policy=hf policy.path=DIR)",
                who, len(lost), "".join(lost[:16]),
            )  # fmt: skip


def _check_out(out: Path, batches: list[list[Problem]], config: dict, config_hash: str, append: bool) -> None:
    """Refuse an output directory written under another config (`rewards.export.check_resume`), or
    whose finished shards do not match this job's batches (resuming with another task, problem count
    or batch size would mix two layouts and duplicate problems)."""
    from rewards.export import OutDirError, check_resume, load_manifest

    if out.exists() and not out.is_dir():
        raise JobInputError(f"out={out} is a file: choose a directory")
    try:
        manifest = load_manifest(out) if out.is_dir() else None
    except (OSError, ValueError) as e:
        raise JobInputError(f"{out}/manifest.json is unreadable ({e}): choose a new out=DIR") from None
    if manifest is None:
        _check_no_output_of_ours(out)
        return
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", {}), dict):
        raise JobInputError(f"{out}/manifest.json is not an arborist manifest: choose a new out=DIR")
    shards = manifest.get("shards", {})
    if not shards:  # a job that failed before its first shard (a model that did not load) binds nothing
        return
    for i, batch in enumerate(batches):
        entry = shards.get(shard_name(i))
        ids = sorted(p.id for p in batch)
        if entry is not None and entry["problem_ids"] != ids:
            raise JobInputError(
                f"out={out} holds {shard_name(i)} with other problems than this job's batch {i}: resume "
                "with the same task and search.batch_problems, or choose a new out=DIR"
            )
        if entry is not None and entry.get("problems_sha", problems_sha(batch)) != problems_sha(batch):
            raise JobInputError(
                f"out={out} holds {shard_name(i)} with this job's problem ids but other problems under "
                f"them (a changed task setting?): resume with the task it was written with, or choose a "
                "new out=DIR"
            )
    done = set(manifest.get("finished_problem_ids", []))
    layout = {p.id for i, b in enumerate(batches) if shard_name(i) in shards for p in b}
    clash = sorted(done.intersection(p.id for b in batches for p in b) - layout)
    if clash:
        raise JobInputError(
            f"out={out} already finished problems {clash[:3]} in another batch layout: resume with the "
            "same task and search.batch_problems, or choose a new out=DIR"
        )
    try:
        check_resume(manifest, config, config_hash, append, out)
    except OutDirError as e:
        raise JobInputError(str(e)) from None


def _check_no_output_of_ours(out: Path) -> None:
    """A directory without a manifest may be anything (`out=.`): refuse it where the job would replace
    a file of the user's (its dataset card is README.md) or later sweep one (`*/shard-*.parquet`)."""
    from rewards.records import KINDS

    if not out.is_dir():
        return
    taken = [name for name in ("README.md", "audit.json", "metrics.json") if (out / name).exists()]
    taken += [f"{kind}/" for kind in KINDS if (out / kind).is_dir() and any((out / kind).iterdir())]
    if taken:
        raise JobInputError(
            f"out={out} holds {', '.join(taken[:3])} but no arborist manifest: the job would replace or "
            "remove them; choose an empty or new out=DIR"
        )


# -- the job ---------------------------------------------------------------------------------------------
def builds_default_critics(conf) -> bool:
    """Whether the job runs on the embedded critics (the embedded policy on Countdown, critics at
    their "default")."""
    return (
        not conf.policy.path and conf.task.name == "countdown" and "default" in conf.critics.paths().values()
    )


def embedded_models_missing(conf) -> list[str]:
    """The embedded models the job is about to train because they are not cached (the first run):
    "policy", "critic-trunk", "critics". (A cached model whose recipe changed is rebuilt and says so
    itself.)"""
    from mcts.embedded import default_policy_dir

    if conf.policy.path:
        return []
    root = default_policy_dir(conf.policy.bootstrap_seed).parent
    needed = ["policy", "critic-trunk", "critics"] if builds_default_critics(conf) else ["policy"]
    return [name for name in needed if not (root / name).is_dir()]


def resolve_models(job: Job) -> dict[str, Any]:
    """Model directories for the workers; trains the embedded defaults first when they are needed."""
    from mcts.embedded import bootstrap_policy, default_policy_dir

    conf = job.conf
    t0 = time.perf_counter()
    missing = embedded_models_missing(conf)
    if conf.progress and missing:
        from rewards.critic_bootstrap import build_minutes

        minutes = build_minutes(missing)
        print(
            f"arborist: training the embedded {', '.join(missing)} into "
            f"{default_policy_dir(conf.policy.bootstrap_seed).parent} once (~{minutes:.0f} min on 2 CPU "
            "cores; later runs start in seconds)",
            file=sys.stderr,
        )
    critics_dir = None
    if builds_default_critics(conf):  # the embedded policy too: built beside the critics' trunk
        from rewards.critic_bootstrap import ensure_default_critics

        critics_dir = str(ensure_default_critics(conf.policy.bootstrap_seed, progress=conf.progress))
    # absolute: a Ray worker's working directory is not the driver's, and `arborist train` reads it back
    policy = str(Path(conf.policy.path).expanduser().resolve()) if conf.policy.path else None
    policy = policy or str(bootstrap_policy(conf.policy.bootstrap_seed, progress=conf.progress))
    return {"policy": policy, "critics_dir": critics_dir, "bootstrap_s": time.perf_counter() - t0}


def run(cfg: DictConfig | Config, hooks: Any = None) -> dict:
    """Run the job described by `cfg`; returns the metrics (also written to `out/metrics.json`).

    `hooks` (a `rewards.launcher.Hooks`) lets tests act at points of the job (kill a worker).
    Raises JobInputError / TaskInputError / PolicyLoadError on bad input, before writing anything
    (then OutDirError where another job holds `out`, before Ray starts: only its lock file is made).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rewards import driver, launcher
    from rewards.export import lock_out_dir

    started = time.perf_counter()
    job = check_config(cfg)
    warn_unreadable_prompts(job)  # here, not in check_config: `arborist search` checks twice
    ray_conf = job.conf.ray
    job.out.mkdir(parents=True, exist_ok=True)
    lock = lock_out_dir(job.out)  # now: a second job on this out= is refused before Ray and models start
    try:  # and what the directory holds is checked again: another job may have written it meanwhile
        _check_out(job.out, job.batches, job.config, job.config_hash, job.conf.append_run)
        with launcher.connect(ray_conf.address, ray_conf.num_cpus, ray_conf.log_to_driver):
            models = resolve_models(job)  # after Ray is up: a bad ray.address fails before a bootstrap
            metrics = driver.run_job(job, models, hooks=hooks, started=started, lock=lock)
    finally:
        os.close(lock)
    report_done(metrics)
    return metrics


def report_done(metrics: dict) -> None:
    """Tell the user where the dataset went (stdout, so scripts can capture it)."""
    from rewards.records import KINDS

    rows = {k: metrics["rows"][k] for k in KINDS}
    audit = metrics.get("audit", {})
    print(f"arborist: dataset written to {metrics['out']}")
    print(
        f"  problems {metrics['problems_done']}/{metrics['problems_total']} "
        f"({metrics['problems_resumed']} resumed); " + ", ".join(f"{k} {v}" for k, v in rows.items())
    )
    print(
        f"  search success {audit.get('search_success')}, greedy {audit.get('greedy_success')}, "
        f"pair precision {audit.get('pair_precision')}; "
        + (
            f"{metrics['nodes_per_s']} nodes/s"
            if metrics["batches_run"]
            else "every problem was already searched"
        )
        + "; details in metrics.json, audit.json, README.md"
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """`arborist search`: Hydra composes the config, `run` does the work; bad input is one line."""
    from mcts.hf import PolicyLoadError
    from rewards.export import OutDirError
    from rewards.launcher import error_line, runtime_errors

    try:
        run(cfg)
    except (JobInputError, TaskInputError, PolicyLoadError, OutDirError) as e:
        print(f"arborist: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    except runtime_errors() as e:  # a failure of the running job, not of its input: exit 1
        print(f"arborist: error: {error_line(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
