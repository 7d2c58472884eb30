"""Train the value function, PRM and ORM on labelled rows (`critics.labels.Labels`).

The rows come from finished search trees (`rewards.critic_data`; `arborist train-critics` reads
a dataset directory in `rewards.train_critics`). Each critic is fine-tuned from a base
checkpoint, by default the policy that searched: its trunk already reads the task's text, so only
a one-logit head is new.

Losses (binary cross-entropy on the sigmoid of the logit):
- value: soft targets S / V at the last token;
- PRM: hard step labels at every step end (TRL stepwise layout), soft with `prm_soft`;
- ORM: verified outcomes at the last token, each class weighted to half the loss when
  `balance_orm` (a few wrong answers must not be drowned by many right ones, or vice versa);
  the shift this puts on the logit is taken back at scoring time (`logit_offset` in critic.json);
- rows from another source (`extra`, e.g. the embedded value function's solver-labelled states)
  train beside a critic's own, never in its validation; its logit offset is then fitted to give
  its own training rows' mean target back.

Problems are split train / validation by id; the validation AUROC and ECE of each critic go into
its `critic.json` and the returned report. The output directory appears atomically (built in a
temporary directory beside it, then moved into place).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from critics.base import KINDS
from critics.features import TopBlocks
from critics.labels import Labels, split_by_problem
from critics.metrics import json_safe
from critics.models import StepEncoder, init_from_policy, save_critic, step_logits
from critics.readout import Rows, evaluate, fit_offset, read_logits
from mcts.aside import Aside, usable_cores
from mcts.charlm import warmup_cosine
from mcts.hf import resolve_device


@dataclass
class TrainCriticsConfig:
    """How the critics are fine-tuned (the defaults are the embedded critics' recipe, but for
    `value_steps` and `orm_steps`, which `rewards.critic_bootstrap` sets to 3,000 and 2,000)."""

    kinds: tuple[str, ...] = KINDS
    """Which critics to train."""
    steps: int = 1000
    """Optimizer steps per critic (fixed, so the result does not depend on machine speed)."""
    value_steps: int | None = None
    """The value function's steps when they differ (None: `steps`). A value row labels one position
    where a PRM row labels every step, so the value function sees fewer labels per step; the
    embedded critics give it 3,000 (docs/critics-history.md: validation AUROC 0.777 at 2,000 steps,
    0.793 at 3,000; tune slice 0.729 -> 0.740)."""
    orm_steps: int | None = None
    """The ORM's steps when they differ (None: `steps`); the embedded critics give it 2,000
    (validation AUROC 0.909 at 1,000, 0.916 at 2,000; tune slice 0.934 -> 0.937)."""
    value_members: int = 1
    """Value heads trained on one split with seeds `seed`, `seed` + 1, ..., logits averaged (one
    trunk pass, a top block and head each: `train_layers` 0 or 1, a Llama-style base); a fitted
    logit offset (`extra` rows) is refitted on the mean. The embedded critics take 3 (held-out
    value AUROC, tune + audit: 0.781 one head, 0.790 two, 0.793 three; docs/measurements.md)."""
    train_layers: int = 1
    """Transformer blocks trained, counted from the top, with what follows them (the final norm)
    and the head; the embeddings and the blocks below keep the base checkpoint's weights.
    0: the head only; -1: the whole model. Fine-tuning the whole trunk on these noisy labels
    wears away what it already reads. Held-out AUROC value / PRM / ORM on the trees of
    `benchmarks.critics`, one run each, 1,000 steps unless said (PRM here counted per path
    position as `evaluate` does; the benchmark counts each node once, which put the shipped PRM
    at 0.832 against 0.779 per position). From the critics' own trunk (`rewards.critic_bootstrap`, 5,200
    steps), 3,200 bootstrap problems' trees: top block (this default) 0.732 / 0.766 / -, 2,000
    steps 0.740 / - / -; top two blocks 0.710 / 0.748 / 0.913, 2,000 steps 0.717 / 0.711 / -;
    whole model 0.667 / - / -; head only (500 steps) 0.584; 6,400 problems' trees, top block
    (the shipped recipe): 0.756 / 0.779 / 0.923. From the 650-step policy's own trunk: top two
    blocks 0.630 / - / 0.855 (benchmark: PRM 0.708), top block 0.659 / 0.691 / 0.830, whole
    model 0.602 / 0.668 / 0.793 (250 steps), head only (500 steps) 0.596 / 0.632 / -."""
    batch_size: int = 64
    """Rows per step."""
    feature_cache_mb: float = 4096.0
    """Memory for the frozen blocks' output of every training row (`critics.features`): the
    trunk below the trained blocks runs once per row, not once per step (0: every step runs the
    whole model). Skipped, with the same training otherwise, where the rows' cache would pass it."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warmup, cosine decay to 5 %)."""
    warmup: int = 10
    weight_decay: float = 0.01
    min_verified: int = 1
    """Value targets only for nodes with at least this many verified visits (1: a leaf's single
    verified rollout is a noisy but unbiased 0/1 target, and there are many of them)."""
    prm_soft: bool = False
    """Train the PRM on soft labels (S / V) instead of hard ones."""
    balance_orm: bool = True
    """Weight the ORM's two classes equally in the loss."""
    val_fraction: float = 0.1
    """Share of problems held out for the validation figures (0: none)."""
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    """torch threads while training (fixed where float reductions differ across thread counts;
    see `mcts.aside.threads_agree` and `train_critics(side_by_side=...)`)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.train_layers < -1:
            raise ValueError(
                f"train_layers={self.train_layers}: use -1 (whole model), 0 (head only) or a block count"
            )
        if not 0 <= self.seed < 2**32:  # torch and numpy take these; a negative one failed after the data
            raise ValueError(f"seed={self.seed}: use a seed in [0, 2**32)")
        if self.value_members < 1:
            raise ValueError(
                f"value_members={self.value_members}: the value function needs at least one head"
            )
        if self.value_members > 1 and self.train_layers not in (0, 1):
            raise ValueError(
                f"value_members={self.value_members} with train_layers={self.train_layers}: heads are "
                "scored from one trunk pass, so they may train the top block at most (train_layers 0 or 1)"
            )
        for name in ("steps", "value_steps", "orm_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: a critic needs at least one optimizer step")


CALIBRATION_ROWS = 8192  # training rows a fitted logit offset is read on (a sample: ~3 s, not ~10 s for all)


def _targets(kind: str, labels: Labels, cfg: TrainCriticsConfig):
    """(targets, loss weights, logit offset). A class-balanced loss trains the logit of odds in which
    both classes are equally likely: log(r / (1 - r)) added back at scoring time (the offset, kept
    in critic.json) restores the probability of the real positive rate r. A constant shift, so the
    ranking (AUROC) is the same; measured on the held-out ORM: ECE 0.263 -> 0.031."""
    if kind == "prm" and not cfg.prm_soft:
        targets = [[float(h) for h in row] for row in labels.hard]
    else:
        targets = labels.soft
    weights, offset = None, 0.0
    if kind == "orm" and cfg.balance_orm:
        rate = labels.positive_rate()
        if 0 < rate < 1:
            weights = [[0.5 / rate if h else 0.5 / (1 - rate) for h in row] for row in labels.hard]
            offset = math.log(rate / (1 - rate))
    return targets, weights, offset


def _blocks(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks: its longest ModuleList (`model.layers` in Llama,
    `transformer.h` in GPT-2, `encoder.layer` in BERT), found by shape rather than by name."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no stack of blocks: use train_layers=-1 to train all of it"
        )
    return max(lists, key=len)


def _train_top_layers(model, train_layers: int) -> list[torch.nn.Parameter]:
    """Freeze the trunk below its top `train_layers` blocks (everything the base model registers
    before its block stack, i.e. the token and position embeddings, and the lower blocks) and return
    the parameters left trainable: the top blocks, what follows them (final norm) and the head.
    -1: the whole model (TrainCriticsConfig refuses anything below)."""
    params = list(model.parameters())
    if train_layers == -1:
        return params
    blocks = _blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    frozen = {id(p) for b in blocks[: max(0, len(blocks) - train_layers)] for p in b.parameters()}
    for p in model.base_model.parameters():  # registration order: what precedes the blocks is input
        if id(p) in in_blocks:
            break
        frozen.add(id(p))
    for p in params:
        p.requires_grad_(id(p) not in frozen)
    return [p for p in params if p.requires_grad]


def steps_of(kind: str, cfg: TrainCriticsConfig) -> int:
    """Optimizer steps of one critic (`value_steps` / `orm_steps` where set, else `steps`)."""
    own = {"value": cfg.value_steps, "orm": cfg.orm_steps}.get(kind)
    return own if own is not None else cfg.steps


def train_one(
    kind: str,
    train: Labels,
    val: Labels,
    base_dir: str | Path,
    sep: str,
    cfg: TrainCriticsConfig,
    step_hook: Callable[[int], None] | None = None,
    extra: Labels | None = None,
    head: str = "",
    features: list | None = None,
) -> tuple[object, object, dict]:
    """Fine-tune one critic from `base_dir`; returns (model, tokenizer, report). `step_hook(step)`
    runs before each optimizer step; `head` names it on the progress bar (one of an ensemble's).
    `features`: a list an ensemble's heads share; the first head leaves its cache of the frozen
    blocks' outputs there (`critics.features`), and the heads after it reuse it (same rows, trunk).
    `extra`: rows trained on beside `train` (another source, such as a task's solver, whose targets
    need not share `train`'s mean); the critic's logit offset is then fitted after training to
    give back the mean target of up to CALIBRATION_ROWS of `train`."""
    t0 = time.perf_counter()
    cfg = replace(cfg, steps=steps_of(kind, cfg))
    assert len(train), f"no {kind} training rows: the trees hold nothing to label (search longer?)"
    device = resolve_device(cfg.device)
    model, tok = init_from_policy(base_dir, kind, cfg.seed)
    trainable = _train_top_layers(model, cfg.train_layers)
    model.to(device).train()
    enc = StepEncoder(tok, sep)
    rows_of = train.plus(extra) if extra is not None and len(extra) else train
    targets, weights, offset = _targets(kind, rows_of, cfg)
    rows = Rows(rows_of, enc, kind, targets, weights)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: warmup_cosine(i, cfg.steps, cfg.warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, cursor, losses = torch.randperm(len(rows_of), generator=gen), 0, []
    top = None
    if cfg.feature_cache_mb > 0:
        first = order[: cfg.batch_size].tolist()
        top = TopBlocks.build(
            model, kind, rows.ids, cfg.train_layers, tok.pad_token_id, device, cfg.feature_cache_mb,
            (first, *rows.batch(first, tok.pad_token_id, device)[:3]), (features or [None])[0],
        )  # fmt: skip
        if features is not None and not features and top is not None:
            features.append(top)
    from tqdm import tqdm

    bar = tqdm(
        range(cfg.steps), desc=f"training {kind} critic{head}", disable=not cfg.progress, file=sys.stderr
    )
    for step in bar:
        if step_hook is not None:
            step_hook(step)
        if cursor + cfg.batch_size > len(order):  # next epoch: a fresh permutation
            order, cursor = torch.randperm(len(rows_of), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size].tolist()
        cursor += cfg.batch_size
        x, mask, pos, tgt, w = rows.batch(idx, tok.pad_token_id, device)
        logits = top.logits(idx, mask, pos) if top is not None else step_logits(model, kind, x, mask, pos)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, tgt, reduction="none")
        loss = (bce * w).sum() / w.sum().clamp(min=1e-8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    calibrated = 0
    if rows_of is not train:
        sample = _calibration_rows(train, cfg)
        logits, soft, _ = read_logits(model, tok, kind, sample, sep, device)
        offset, calibrated = fit_offset(logits, soft), len(sample)
    report = {
        "train_rows": len(train),
        "extra_rows": len(rows_of) - len(train),
        "calibration_rows": calibrated,
        "train_positions": train.positions(),
        "train_positive_rate": train.positive_rate(),
        "steps": cfg.steps,
        "trained_parameters": sum(p.numel() for p in trainable),
        "feature_cache": top is not None,
        "first_loss": float(np.mean(losses[:10])) if losses else float("nan"),
        "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "logit_offset": offset,
        **evaluate(model, tok, kind, val, sep, device, logit_offset=offset),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return model, tok, report


def _calibration_rows(train: Labels, cfg: TrainCriticsConfig) -> Labels:
    keep = np.random.default_rng(cfg.seed).permutation(len(train))[:CALIBRATION_ROWS]
    return train.subset(sorted(keep.tolist()))


def _ensemble_report(kind, trained: list, train, val, sep, cfg) -> dict:
    """The report of the value function's heads, `trained` = [(model, tokenizer, report)] in seed
    order: validation figures of their averaged logits, the logit offset refitted on them where the
    heads fitted theirs; its other training fields are the first head's, `seconds` the heads' sum."""
    models, tok, reports = [m for m, _, _ in trained], trained[0][1], [r for _, _, r in trained]
    device, first = resolve_device(cfg.device), reports[0]
    offset = first["logit_offset"]  # the class-balanced loss's shift, the same for every head
    if first["calibration_rows"]:
        logits, soft, _ = read_logits(models, tok, kind, _calibration_rows(train, cfg), sep, device)
        offset = fit_offset(logits, soft)
    return {
        **first,
        "members": len(models),
        "member_val_auroc": [r["val_auroc"] for r in reports],
        "logit_offset": offset,
        **evaluate(models, tok, kind, val, sep, device, logit_offset=offset),
        "seconds": round(sum(r["seconds"] for r in reports), 1),
    }


def _train_kind(
    kind: str,
    labels: Labels,
    base_dir: str | Path,
    sep: str,
    cfg: TrainCriticsConfig,
    dest: Path,
    meta: dict | None,
    step_hook: Callable[[int], None] | None = None,
    quiet: bool = False,
    extra: Labels | None = None,
) -> dict:
    """Split, train and save one critic into `dest`; returns its report (`quiet`: no progress bar).
    `extra` rows train beside the split's training part, never in its validation."""
    train, val = split_by_problem(labels, cfg.val_fraction, cfg.seed)
    run = replace(cfg, progress=cfg.progress and not quiet)
    heads, trained, features = cfg.value_members if kind == "value" else 1, [], []
    for j in range(heads):  # the value function's heads: seeds seed, seed + 1, ... on one split
        if j == 1 and not (
            hasattr(trained[0][0], "score") and hasattr(getattr(trained[0][0], "model", None), "layers")
        ):
            raise ValueError(
                f"value_members={heads}: heads are scored from one trunk pass, which needs a Llama-style "
                f"base (model.model.layers, a final norm, a score head); {type(trained[0][0]).__name__} "
                "is not one: train with value_members=1"
            )
        label, seeded = f" (head {j + 1} of {heads})" if heads > 1 else "", replace(run, seed=cfg.seed + j)
        trained.append(train_one(kind, train, val, base_dir, sep, seeded, step_hook, extra, label, features))
    model, tok, report = trained[0]
    if heads > 1:
        report = _ensemble_report(kind, trained, train, val, sep, cfg)
    info = {
        "base": str(base_dir),
        "logit_offset": report["logit_offset"],  # read by critics.models.load_critic
        "train": report,
        "config": asdict(cfg),
    }
    names = [f"member-{j}" for j in range(1, heads)]
    save_critic(model, tok, kind, dest, {**info, **({"members": names} if names else {}), **(meta or {})})
    for j, (m, _, r) in enumerate(trained[1:], 1):  # each member loadable alone too, with its own seed
        own = {
            "logit_offset": r["logit_offset"],
            "train": r,
            "config": asdict(replace(cfg, seed=cfg.seed + j)),
        }
        save_critic(m, tok, kind, dest / names[j - 1], {**info, **own, **(meta or {})})
    return report


def _train_kind_quietly(kind, labels, base_dir, sep, cfg, dest, meta, extra=None, step_hook=None) -> None:
    """`_train_kind` without its progress bar: what the second process runs (`mcts.aside`)."""
    _train_kind(kind, labels, base_dir, sep, cfg, dest, meta, step_hook, quiet=True, extra=extra)


def _report_line(kind: str, report: dict) -> str:
    figures = {k: round(v, 3) for k, v in report.items() if k.startswith("val_a") or k == "final_loss"}
    return f"arborist: {kind} critic trained ({figures}, {report['seconds']} s)"


def train_critics(
    labels: dict[str, Labels],
    out_dir: str | Path,
    policy_dir: str | Path,
    cfg: TrainCriticsConfig | None = None,
    sep: str = "\n",
    meta: dict | None = None,
    side_by_side: bool = False,
    extra_train: dict[str, Labels] | None = None,
) -> dict:
    """Train `cfg.kinds` on `labels[kind]` into `out_dir/<kind>` (starting from `policy_dir`'s trunk);
    returns {kind: report}. `meta` is added to every critic.json (e.g. the policy's hash and the
    number of trees the rows came from). `extra_train[kind]`: rows trained beside a critic's own
    training split, never validated on, with its logit offset fitted after (`train_one`).

    `side_by_side` (with two usable cores): the critic with the most steps (a value function's
    heads counted) trains in a second process (`mcts.aside`) on one core while this process trains
    the others on the other; whichever is done first leaves the other `cfg.threads`. If the second
    fails, its critic is trained here after.
    Only for machines where the thread count leaves the floats as they are
    (`mcts.aside.threads_agree`): each critic's weights are then the same as one after another."""
    cfg = cfg or TrainCriticsConfig()
    out = Path(out_dir)
    threads = torch.get_num_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    reports: dict[str, dict] = {}
    aside, kinds, extra = None, list(cfg.kinds), extra_train or {}
    try:
        hook = None
        if side_by_side and len(kinds) > 1 and usable_cores() >= 2:
            first = max(kinds, key=lambda k: steps_of(k, cfg) * (cfg.value_members if k == "value" else 1))
            kinds.remove(first)
            args = (first, labels[first], policy_dir, sep, cfg, tmp / first, meta, extra.get(first))
            aside = Aside(_train_kind_quietly, args, f"arborist-{first}-critic", threads=cfg.threads)
            if cfg.progress:
                print(
                    f"arborist: training the {first} critic in a second process beside the others",
                    file=sys.stderr,
                )
            shared = [True]  # one core each until the second process is done

            def hook(step: int) -> None:
                if shared[0] and not aside.alive():
                    shared[0] = False
                    torch.set_num_threads(cfg.threads)

        torch.set_num_threads(1 if aside is not None else cfg.threads)
        for kind in kinds:
            reports[kind] = _train_kind(
                kind, labels[kind], policy_dir, sep, cfg, tmp / kind, meta, hook, extra=extra.get(kind)
            )
            if cfg.progress:
                print(_report_line(kind, reports[kind]), file=sys.stderr)
        if aside is not None:
            torch.set_num_threads(cfg.threads)
            aside.more_threads()  # this process is done: the other core is the second's
            if aside.wait():
                reports[first] = json.loads((tmp / first / "critic.json").read_text())["train"]
            else:
                print(
                    f"arborist: the {first} critic failed in its second process (exit code "
                    f"{aside.process.exitcode}; its error is above): training it here",
                    file=sys.stderr,
                )
                reports[first] = _train_kind(
                    first, labels[first], policy_dir, sep, cfg, tmp / first, meta, extra=extra.get(first)
                )
            if cfg.progress:
                print(_report_line(first, reports[first]), file=sys.stderr)
            reports = {k: reports[k] for k in cfg.kinds}
        (tmp / "report.json").write_text(json.dumps(json_safe(reports), indent=2, allow_nan=False) + "\n")
        old = out.parent / f".{out.name}-old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if aside is not None:
            aside.stop()
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return reports
