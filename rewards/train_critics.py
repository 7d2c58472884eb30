"""`arborist train-critics DATASET_DIR [--out DIR] [--base DIR]`: critics from a search's trees.

Reads `DATASET_DIR/trees/*.parquet` (one `FinishedTree.to_row()` per row; only the files the
manifest lists as finished when there is a manifest), builds the critics' rows
(`rewards.critic_data`) and trains them (`critics.train`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from critics.base import KINDS
from critics.labels import Labels
from critics.metrics import json_safe
from critics.train import TrainCriticsConfig, train_critics
from mcts.finished import FinishedTree
from rewards.critic_data import all_labels
from rewards.export import read_trees
from rewards.train import training_device


def train_critics_on_trees(
    trees: list[FinishedTree],
    out_dir: str | Path,
    policy_dir: str | Path,
    cfg: TrainCriticsConfig | None = None,
    meta: dict | None = None,
    side_by_side: bool = False,
    labels: dict[str, Labels] | None = None,
    extra_train: dict[str, Labels] | None = None,
) -> dict:
    """`critics.train.train_critics` on the rows of `trees` (labels with `cfg.min_verified`, or
    `labels` already made from them), their steps joined by the trees' own separator (the one the
    critics are scored with); `extra_train` as `train_critics` takes it."""
    cfg = cfg or TrainCriticsConfig()
    separators = {t.separator for t in trees}
    if len(separators) > 1:
        raise ValueError(
            f"trees with different step separators {sorted(separators)}: train on one task's trees"
        )
    labels = labels if labels is not None else all_labels(trees, cfg.min_verified)
    tasks = sorted({t.task for t in trees})
    meta = {"trees": len(trees), **({"task": tasks[0]} if len(tasks) == 1 else {}), **(meta or {})}
    sep = separators.pop() if separators else "\n"
    return train_critics(
        labels,
        out_dir,
        policy_dir,
        cfg,
        sep=sep,
        meta=meta,
        side_by_side=side_by_side,
        extra_train=extra_train,
    )


def read_tree_dir(dataset_dir: str | Path) -> list[FinishedTree]:
    """Trees of a dataset directory in shard-name order: its finished shards (a killed job's
    too: `rewards.export.read_trees`), else `trees/*.parquet` of a directory without a manifest."""
    import pyarrow.parquet as pq

    root = Path(dataset_dir)
    if (root / "manifest.json").is_file():
        try:
            trees = read_trees(root)
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"{root / 'manifest.json'} is not an arborist manifest ({e!r}): rerun `arborist search`"
            ) from None
    else:
        files = sorted((root / "trees").glob("*.parquet"))
        trees = [FinishedTree.from_row(r) for f in files for r in pq.read_table(f).to_pylist()]
    if not trees:
        raise ValueError(
            f"{root} has no finished trees: point train-critics at the output directory of `arborist "
            "search` (a job killed before its first batch finished has none yet: rerun it)"
        )
    return trees


def train_critics_from_dir(
    dataset_dir: str | Path,
    out_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
    cfg: TrainCriticsConfig | None = None,
) -> dict:
    """`arborist train-critics`: trees of `dataset_dir` -> critics in `out_dir` (default
    `dataset_dir/critics`), fine-tuned from `base_dir` (default: the embedded policy)."""
    trees = read_tree_dir(dataset_dir)
    if base_dir is None:
        from mcts.embedded import bootstrap_policy

        base_dir = bootstrap_policy((cfg or TrainCriticsConfig()).seed)
    out = Path(out_dir) if out_dir is not None else Path(dataset_dir) / "critics"
    return train_critics_on_trees(trees, out, base_dir, cfg, meta={"dataset": str(dataset_dir)})


def main_train_critics(argv: list[str] | None = None) -> int:
    """Command line of `arborist train-critics`; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="arborist train-critics",
        description="Train the value function, PRM and ORM on the trees of an `arborist search` output.",
    )
    ap.add_argument("dataset_dir", help="output directory of `arborist search` (reads trees/*.parquet)")
    ap.add_argument("--out", default=None, help="where the critics go (default: DATASET_DIR/critics)")
    ap.add_argument("--base", default=None, help="checkpoint to start from (default: the embedded policy)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of value,prm,orm")
    ap.add_argument("--steps", type=int, default=TrainCriticsConfig.steps)
    ap.add_argument(
        "--value-steps", type=int, default=None, help="the value function's steps (default: --steps)"
    )
    ap.add_argument("--orm-steps", type=int, default=None, help="the ORM's steps (default: --steps)")
    ap.add_argument(
        "--value-members",
        type=int,
        default=TrainCriticsConfig.value_members,
        help="value heads trained with seeds SEED, SEED+1, ... and averaged (one trunk pass scores them all)",
    )
    ap.add_argument(
        "--train-layers",
        type=int,
        default=TrainCriticsConfig.train_layers,
        help="top transformer blocks trained with the head (-1: the whole model, 0: the head only)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        print(
            f"arborist: error: train-critics: --kinds={args.kinds}: use a subset of value,prm,orm",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = TrainCriticsConfig(
            kinds=kinds,
            steps=args.steps,
            value_steps=args.value_steps,
            orm_steps=args.orm_steps,
            value_members=args.value_members,
            train_layers=args.train_layers,
            seed=args.seed,
            device=args.device,
        )
        training_device(args.device)  # a TrainInputError is a ValueError: one line below
        reports = train_critics_from_dir(args.dataset_dir, args.out, args.base, cfg)
    except (ValueError, OSError) as e:
        print(f"arborist: error: train-critics: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(reports), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main_train_critics())
