"""The `arborist` command.

    arborist search [hydra overrides]            the main job (rewards.pipeline); e.g. out=DIR seed=N
                                                 task=countdown|jsonl task.path=FILE task.num_problems=N
                                                 policy.path=DIR search.simulations=N ray.address=auto
                                                 ray.num_workers=N; `arborist search --help` lists all
    arborist bootstrap [--seed N] [--force]      train the embedded default policy (and critics) now
    arborist train DATASET_DIR... --out DIR [--recipe sft+dpo|sft|dpo] [--policy DIR]
                                                 train a policy with TRL on search output directories
    arborist improve --out DIR [--rounds 3] [--problems 10000] [--no-replay] [--recipe sft|...]
                                                 rounds of search -> train -> held-out evaluation
    arborist train-critics DATASET_DIR [--out DIR]   train the critics on a search output directory
    arborist show OUT [--problem ID]             draw a finished tree and the job's plots (OUT/show.html)

Bad input (a malformed problem file, an unknown task, a missing model directory, pickle weights,
an invalid number in an override) ends with one line `arborist: error: ...` on stderr, exit
status 2, no traceback, and nothing written: `search` composes and checks the whole config before
Hydra, Ray or the output directory are touched.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

EXIT_BAD_INPUT = 2


def _quiet_env() -> None:
    """Settings that must be in place before transformers or Ray are imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers 5 reads it at import time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _input_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from critics.models import CriticLoadError
    from mcts.hf import PolicyLoadError
    from mcts.tasks.base import TaskInputError
    from rewards.export import OutDirError
    from rewards.job import JobInputError

    return (
        JobInputError,
        OutDirError,
        TaskInputError,
        PolicyLoadError,
        CriticLoadError,
        HydraException,
        OmegaConfBaseException,
    )


def one_line(err: BaseException) -> str:
    """A user-facing one-line message for a config or input error."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError

    if isinstance(err, MissingConfigException):
        # "In 'config': Could not find 'task/nope'" + a list of options: name the group and its options.
        missing = (err.missing_cfg_file or "").split("/")
        group = missing[0] if len(missing) > 1 else None
        options = [o for o in (err.options or []) if not o.endswith("schema")]
        if group and options:
            return (
                f"unknown {group} {missing[-1]!r}: choose one of {', '.join(options)} ({group}={options[0]})"
            )
    cause = err.__cause__
    if isinstance(cause, ConfigAttributeError) and getattr(cause, "full_key", None):
        return (
            f"unknown setting {cause.full_key!r}: {str(cause).splitlines()[0]} "
            "(`arborist search --cfg job` lists every setting)"
        )
    head = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if cause is not None and str(cause).strip():
        detail = str(cause).strip().splitlines()[0]
        key = getattr(cause, "full_key", None)
        head = re.sub(r"^Error merging override ", "", head)
        if key and key not in head:
            head = f"{head} ({key})"
        return f"{head}: {detail}"
    return head


def _fail(err: BaseException) -> int:
    print(f"arborist: error: {one_line(err)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def search(overrides: list[str]) -> int:
    """`arborist search`: check the composed config, then hand over to the Hydra app."""
    from rewards import pipeline
    from rewards.config import compose

    # Hydra's own flags (--help, --cfg job, -m ...) are Hydra's business: pass them through.
    if not any(a.startswith("-") for a in overrides):
        bare = [a for a in overrides if "=" not in a and not a.startswith("~")]  # `~key` deletes
        if bare:
            return _fail(ValueError(f"override {bare[0]!r} has no value: write {bare[0]}=VALUE"))
        # Imported before the try: an except clause that imports while a Ctrl-C unwinds a half-done
        # import of torch would raise that import's error in place of the interrupt.
        input_errors = _input_errors()
        try:
            job = pipeline.check_config(compose(overrides))
        except input_errors as e:
            return _fail(e)
        try:  # Hydra writes its logs under out/ first: a directory it cannot write to is one line
            job.out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=job.out).close()  # made and gone: root passes mode bits, not this
        except OSError as e:
            return _fail(
                OSError(f"out={job.out} cannot be written ({e.strerror or e}): choose a writable out=DIR")
            )
    sys.argv = ["arborist search", *overrides]
    pipeline.main()  # exits 2 itself on input errors it finds later (an unreachable cluster)
    return 0


def bootstrap(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="arborist bootstrap", description="Train the embedded default policy (and critics) now."
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    from mcts.embedded import bootstrap_policy

    if args.force:
        bootstrap_policy(args.seed, force=True)
    try:
        from rewards.critic_bootstrap import ensure_default_critics
    except ImportError:
        print(f"arborist: default policy: {bootstrap_policy(args.seed)}")
        print("arborist: critics are not part of this build; the job values nodes by verified rollouts")
        return 0
    critics = ensure_default_critics(args.seed)  # trains the policy too where it is missing, beside the trunk
    print(f"arborist: default policy: {bootstrap_policy(args.seed)}")
    print(f"arborist: default critics: {critics}")
    return 0


def train_critics(argv: list[str]) -> int:
    """`arborist train-critics DATASET_DIR [--out DIR] ...`: the critics package's own command line."""
    try:
        from rewards.train_critics import main_train_critics
    except ImportError:
        print("arborist: error: critics are not part of this build", file=sys.stderr)
        return EXIT_BAD_INPUT
    return main_train_critics(argv)


def train(argv: list[str]) -> int:
    """`arborist train DATASET_DIR... --out DIR`: rewards.train, with one-line errors."""
    from rewards.train import RECIPES, TrainInputError, TrainPolicyConfig, search_settings, train_policy

    parser = argparse.ArgumentParser(
        prog="arborist train", description="Train a policy with TRL on an arborist dataset as it is."
    )
    parser.add_argument(
        "dataset", nargs="+", help="the out= directory of `arborist search` (several: all their rows)"
    )
    parser.add_argument("--out", required=True, help="where the trained model directory goes")
    parser.add_argument(
        "--policy",
        default="",
        help="model to start from (default: the policy that searched the first dataset)",
    )
    parser.add_argument("--recipe", default=TrainPolicyConfig.recipe, choices=RECIPES)
    parser.add_argument("--sft-epochs", type=float, default=TrainPolicyConfig.sft_epochs)
    parser.add_argument("--sft-lr", type=float, default=TrainPolicyConfig.sft_lr)
    parser.add_argument("--dpo-epochs", type=float, default=TrainPolicyConfig.dpo_epochs)
    parser.add_argument("--dpo-lr", type=float, default=TrainPolicyConfig.dpo_lr)
    parser.add_argument("--beta", type=float, default=TrainPolicyConfig.beta)
    parser.add_argument("--nll-weight", type=float, default=TrainPolicyConfig.nll_weight)
    parser.add_argument("--batch-size", type=int, default=TrainPolicyConfig.batch_size)
    parser.add_argument(
        "--max-length", type=int, default=TrainPolicyConfig.max_length, help="tokens a row may hold"
    )
    parser.add_argument("--seed", type=int, default=TrainPolicyConfig.seed)
    parser.add_argument("--device", default=TrainPolicyConfig.device)
    args = parser.parse_args(argv)
    from mcts.hf import PolicyLoadError

    try:
        cfg = TrainPolicyConfig(
            recipe=args.recipe,
            sft_epochs=args.sft_epochs,
            sft_lr=args.sft_lr,
            dpo_epochs=args.dpo_epochs,
            dpo_lr=args.dpo_lr,
            beta=args.beta,
            nll_weight=args.nll_weight,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            device=args.device,
        )
        policy = args.policy
        if not policy:  # the searching policy: the embedded Countdown model would not read a jsonl task
            _, policy, seed = search_settings([Path(d) for d in args.dataset])
            if not policy:
                from mcts.embedded import bootstrap_policy

                policy = str(bootstrap_policy(seed))
            print(
                f"arborist: starting from {policy}, the policy that searched {args.dataset[0]}",
                file=sys.stderr,
            )
        report = train_policy(args.dataset, args.out, policy, cfg)
    except (TrainInputError, PolicyLoadError) as e:
        return _fail(e)
    rows = {k: report[k] for k in ("sft_rows", "dpo_rows") if k in report}
    print(
        f"arborist: trained {args.recipe} on {rows} in {report['seconds']} s -> {args.out} (policy.path={args.out})"
    )
    return 0


def improve(argv: list[str]) -> int:
    """`arborist improve --out DIR`: rewards.improve, with one-line errors."""
    from dataclasses import replace

    from rewards.improve import ImproveConfig, run_improve, table
    from rewards.train import RECIPES, TrainInputError

    d = ImproveConfig()
    parser = argparse.ArgumentParser(
        prog="arborist improve", description="Rounds of search -> train -> evaluate."
    )
    parser.add_argument("--out", required=True, help="directory of the rounds (resumed when it exists)")
    parser.add_argument("--policy", default="", help="base policy (default: the embedded policy)")
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument(
        "--problems", type=int, default=d.problems_per_round, help="training problems per round"
    )
    parser.add_argument("--simulations", type=int, default=d.simulations)
    parser.add_argument("--rollouts", type=int, default=d.rollouts, help="verified rollouts per new node")
    parser.add_argument("--recipe", default=d.train.recipe, choices=RECIPES)
    parser.add_argument(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=d.replay,
        help="round k trains on rounds 1..k's data (--no-replay: on round k's alone)",
    )
    parser.add_argument("--eval-problems", type=int, default=d.eval_problems, help="0: the whole test slice")
    parser.add_argument("--seed", type=int, default=d.seed)
    args = parser.parse_args(argv)
    from mcts.hf import PolicyLoadError
    from rewards.launcher import error_line, runtime_errors

    input_errors, failures = (
        (TrainInputError, PolicyLoadError, *_input_errors()),
        runtime_errors(),
    )  # see search
    try:
        cfg = ImproveConfig(
            rounds=args.rounds,
            problems_per_round=args.problems,
            simulations=args.simulations,
            rollouts=args.rollouts,
            replay=args.replay,
            eval_problems=args.eval_problems,
            seed=args.seed,
            train=replace(d.train, recipe=args.recipe, seed=args.seed),
        )
    except ValueError as e:  # a bad number: ImproveConfig / TrainPolicyConfig say which
        return _fail(e)
    try:
        policy = args.policy
        if not policy:
            from mcts.embedded import bootstrap_policy

            policy = str(bootstrap_policy(0))
        summary = run_improve(args.out, cfg, policy)
    except input_errors as e:
        return _fail(e)
    except failures as e:  # a round's job failed while running (a lost worker, a full disk)
        print(f"arborist: error: {error_line(e, out_flag='--out').splitlines()[0]}", file=sys.stderr)
        return 1
    print(table(summary))
    return 0


def show(argv: list[str]) -> int:
    """`arborist show OUT [--problem ID] [--html PATH]`: one self-contained HTML page of a tree."""
    from rewards.show import main as show_main

    return show_main(argv)


COMMANDS = {
    "search": search,
    "bootstrap": bootstrap,
    "train": train,
    "improve": improve,
    "train-critics": train_critics,
    "show": show,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_env()
    from rewards.interrupts import terminate_as_interrupt

    terminate_as_interrupt()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_BAD_INPUT
    command = COMMANDS.get(argv[0])
    if command is None:
        print(
            f"arborist: error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)} "
            "(arborist search runs the job)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        return command(argv[1:])
    except KeyboardInterrupt:  # what was finished is on disk (a job's shards, a round's files)
        print("arborist: interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
