"""`arborist train DATASET... --out DIR`: a policy trained with TRL on arborist datasets as they are.

    arborist train arborist-out --out trained                  # the shipped recipe (sft)
    arborist train out-a out-b --out trained                   # the rows of several jobs
    arborist train arborist-out --out trained --recipe sft+dpo # SFT, then step-level DPO + NLL
    arborist train arborist-out --out trained --policy DIR     # any local causal LM

Recipes (`TrainPolicyConfig.recipe`):
- "sft": SFTTrainer on `sft/` (the verified trajectories of every problem: one by default,
  every distinct one with `rewards.sft_solutions`): rejection-sampling fine-tuning;
- "dpo": DPOTrainer on `pairs/` with an NLL term on chosen (`loss_type=["sigmoid", "sft"]`): plain
  DPO on reasoning pairs lowers the likelihood of both sides and collapses the policy;
- "sft+dpo": the two in sequence, DPO's reference being the SFT model.

Text that trains as it is generated. The search conditions the policy on `tokenizer(prompt)`,
which carries BOS where the tokenizer adds one; the exported completions are the steps as the
policy wrote them (each ended by the separator, except a step it ended with EOS), and TRL appends
EOS right after the completion. So rows are trained as they are. Whether TRL's own tokenization
puts BOS before the prompt is a property of the TRL version, not of its docs: 1.16's text DPO
and SFT paths call the tokenizer with its defaults (BOS included), while its vision collator
passes `add_special_tokens=False`. So each trainer's tokenized rows (up to `CHECKED_ROWS`) are
checked against the policy's own encoding (`_mismatches`), and the BOS text is put into the
prompts only where TRL left it out; rows TRL would cut or drop at `max_length` are refused first.
A tokenizer that merges across the prompt/completion boundary (BPE) makes TRL's ids differ from
the sampled ones for the same text: said in one line, and trained. tests/test_train.py holds the
ids the trainers build to the ids the policy writes and scores at search time.

The result is a local model directory (safetensors + tokenizer + `arborist_train.json`) that
`policy.path=` takes. Seeded; CPU here, CUDA where present.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RECIPES = ("sft", "dpo", "sft+dpo")


class TrainInputError(ValueError):
    """A dataset or setting `arborist train` cannot use; one line saying what to do."""


@dataclass(frozen=True)
class TrainPolicyConfig:
    """How `arborist train` trains (defaults: the embedded policy's size; a multi-billion model
    wants learning rates ~100x smaller). Chosen on the held-out pool's tune slice, one round from
    the embedded policy (docs/improve-recipes.md): SFT on every distinct verified solution of the
    round at 1e-3 x 3 epochs lifted greedy most while keeping pass@16; DPO + NLL on the step pairs
    never lifted greedy beyond its standard error and, at a learning rate that moves the policy at
    all (1e-4 and up), cut pass@16 by 0.05-0.2, so the default recipe is SFT alone."""

    recipe: str = "sft"
    """"sft", "dpo" or "sft+dpo" (see the module docstring)."""
    sft_epochs: float = 3.0
    sft_lr: float = 1e-3
    dpo_epochs: float = 1.0
    dpo_lr: float = 3e-5
    beta: float = 0.1
    """DPO's KL strength."""
    nll_weight: float = 1.0
    """Weight of the NLL term on chosen beside the DPO loss (0: plain DPO)."""
    batch_size: int = 32
    max_length: int = 256
    seed: int = 0
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    separator: str = "\n"
    """The task's step separator: a completion ends with it, as the policy ends its steps
    (`train_policy` takes the one the datasets' search used)."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise TrainInputError(
                f"recipe {self.recipe!r} is not one of {', '.join(RECIPES)}: use --recipe sft+dpo"
            )
        for name in ("sft_epochs", "sft_lr", "dpo_epochs", "dpo_lr", "beta", "batch_size", "max_length"):
            if not 0 < getattr(self, name) < math.inf:  # NaN fails too (beta inf trained NaN weights)
                raise TrainInputError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.nll_weight < math.inf:
            raise TrainInputError(f"nll_weight must be >= 0 and finite, got {self.nll_weight}")
        if not 0 <= self.seed < 2**32:
            raise TrainInputError(f"seed must be in [0, 2**32), got {self.seed}")


# -- text ---------------------------------------------------------------------------------------------
def bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer puts it before a text on its own, else ""."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token if ids and ids[0] == bos else ""


def as_trained(row: dict, keys: tuple[str, ...], bos: str = "") -> dict:
    """The row's prompt (after `bos` text) and completion columns, as exported."""
    return {"prompt": bos + row["prompt"], **{k: row[k] for k in keys}}


def search_ids(tokenizer, prompt: str, completion: str, sep: str = "\n") -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) as the search has them: the prompt encoded as the policy
    encodes it (special tokens included), then each step as generated (ended by its separator, or
    by nothing where the policy ended it with EOS), then EOS."""
    pieces = completion.split(sep)
    texts = [p + sep for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    return tokenizer(prompt)["input_ids"], ids + [tokenizer.eos_token_id]


CHECKED_ROWS = 512  # rows of each trainer's tokenized dataset held to the policy's ids


def _mismatches(trainer, tokenizer, rows: list[dict], keys: tuple[str, ...], sep: str) -> tuple[int, bool]:
    """(rows whose ids in the trainer differ from the search's, whether any differs in text too)
    over the first `CHECKED_ROWS` rows."""
    bad, text_differs = 0, False
    for i, row in enumerate(rows[:CHECKED_ROWS]):
        got = trainer.train_dataset[i]
        for key in keys:
            prompt, completion = search_ids(tokenizer, row["prompt"], row[key], sep)
            if "prompt_ids" in got:  # DPO: prompt and each side apart
                theirs = list(got["prompt_ids"]) + list(got[f"{key}_ids"])
            else:  # SFT: one sequence
                theirs = list(got["input_ids"])
            if theirs != prompt + completion:
                bad += 1
                text_differs |= tokenizer.decode(theirs) != tokenizer.decode(prompt + completion)
                break
    return bad, text_differs


def _check_lengths(tokenizer, rows: list[dict], keys: tuple[str, ...], max_length: int) -> None:
    """TRL cuts a row longer than `max_length` tokens (its EOS lost) or drops it: refuse instead."""
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    lengths = [
        len(p) + len(c) + 1  # + EOS
        for key in keys
        for p, c in zip(
            prompts, tokenizer([r[key] for r in rows], add_special_tokens=False)["input_ids"], strict=True
        )
    ]
    longest, over = max(lengths), sum(n > max_length for n in lengths)
    if over:
        raise TrainInputError(
            f"{over} rows are longer than max_length={max_length} tokens (the longest {longest}): TRL "
            "would cut them before their EOS or drop them; raise --max-length"
        )


# -- data ---------------------------------------------------------------------------------------------
def _manifest(dataset: Path, kind: str = "sft") -> dict:
    """The manifest of an arborist output directory, the shard log of a running or killed job
    folded in; `TrainInputError` (one line) where there is none or it is not ours."""
    manifest_path = dataset / "manifest.json"
    if not manifest_path.is_file():
        raise TrainInputError(f"{dataset} has no manifest.json: pass the out= directory of `arborist search`")
    from rewards.export import load_manifest

    try:
        manifest = load_manifest(dataset)
        manifest["files"][kind]  # noqa: B018 (a manifest without this kind is not one of ours)
    except (ValueError, KeyError, TypeError) as e:
        raise TrainInputError(
            f"{manifest_path} is not an arborist manifest ({e!r}): rerun `arborist search`"
        ) from None
    return manifest


def read_kind(dataset: Path, kind: str) -> list[dict]:
    """Rows of one kind of an arborist output directory (the files its manifest names)."""
    import pyarrow as pa

    from rewards.export import read_rows

    try:
        rows = read_rows(dataset, _manifest(dataset, kind), kind)
    except (OSError, pa.ArrowException) as e:  # a shard deleted, truncated or not parquet
        raise TrainInputError(
            f"{dataset}: a {kind} shard cannot be read ({str(e).splitlines()[0][:160]}): rerun `arborist search` "
            "into a new out=DIR"
        ) from None
    need = {"pairs": ("prompt", "chosen", "rejected"), "sft": ("prompt", "completion")}.get(kind, ())
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise TrainInputError(
            f"{dataset}: its {kind} rows have no {missing[0]!r} column: not arborist's {kind}"
        )
    return rows


def search_settings(datasets: list[Path]) -> tuple[str, str, int]:
    """(step separator, policy.path, policy.bootstrap_seed) of the searches that wrote `datasets`:
    the separator their steps end with (one for all of them), and the policy that searched the
    first ('' : the embedded policy of that seed), which `arborist train` starts from by default."""
    manifests = [_manifest(d) for d in datasets]
    configs = [m.get("config", {}) for m in manifests]
    seps = {c.get("task", {}).get("step_separator", "\n") for c in configs}
    if len(seps) > 1:
        raise TrainInputError(
            f"{datasets_name(datasets)} end their steps with different separators ({sorted(seps)}): "
            "train on datasets of one task format at a time"
        )
    policy = configs[0].get("policy", {})
    path = policy.get("path", "")
    if path:  # the directory the workers loaded, made absolute by the job (`resolve_models`)
        path = manifests[0].get("versions", {}).get("policy_dir", path)
    return seps.pop(), str(path), int(policy.get("bootstrap_seed", 0))


def training_device(name: str) -> str:
    """`mcts.policy.resolve_device`, refusing in one line a device torch does not know, or CUDA
    where torch sees none (`arborist train`, `arborist train-critics`), before anything trains."""
    import torch

    from mcts.hf import resolve_device

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError) as e:  # "tpu": torch's own words
        raise TrainInputError(
            f"--device {name}: {str(e).splitlines()[0][:120]}: use auto, cpu or cuda"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainInputError(f"--device {name}, but torch sees no CUDA device: use --device cpu")
    return str(device)


def _common(cfg: TrainPolicyConfig, out: Path, epochs: float, lr: float, device: str) -> dict:
    return dict(
        output_dir=str(out),
        num_train_epochs=epochs,
        learning_rate=lr,
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=10,
        report_to=[],
        bf16=False,
        use_cpu=device == "cpu",
        save_strategy="no",
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataset_num_proc=None,
        disable_tqdm=not sys.stderr.isatty(),
    )


def _trainer(make, tokenizer, rows: list[dict], sep: str, keys: tuple[str, ...], max_length: int):
    """`make(dataset)` on the rows as exported, with the BOS text before the prompt only if TRL's
    tokenization leaves BOS out (see the module docstring)."""
    from datasets import Dataset

    _check_lengths(tokenizer, rows, keys, max_length)
    for bos in ("", bos_text(tokenizer)):
        trainer = make(Dataset.from_list([as_trained(r, keys, bos) for r in rows]))
        assert len(trainer.train_dataset) == len(rows), "TRL dropped rows that fit max_length"
        bad, text_differs = _mismatches(trainer, tokenizer, rows, keys, sep)
        if not bad:
            return trainer
        if not text_differs:  # the same text, tokenized apart where the policy sampled it whole
            print(
                f"arborist train: {bad} of {min(len(rows), CHECKED_ROWS)} checked rows tokenize "
                "differently in TRL (prompt and completion apart) than in the search (the same text: a "
                "tokenizer that merges across their boundary); training on TRL's tokens",
                file=sys.stderr,
            )
            return trainer
        if not bos_text(tokenizer):
            break
    raise RuntimeError(
        f"{type(trainer).__name__} tokenizes {bad} of {min(len(rows), CHECKED_ROWS)} checked rows into "
        "other text than the policy wrote (BOS, EOS or a chat template): this TRL version is not "
        "supported by `arborist train`"
    )


def train_sft(model, tokenizer, rows: list[dict], cfg: TrainPolicyConfig, work: Path, device: str):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**_common(cfg, work, cfg.sft_epochs, cfg.sft_lr, device), completion_only_loss=True)
    trainer = _trainer(
        lambda ds: SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer),
        tokenizer,
        rows,
        cfg.separator,
        ("completion",),
        cfg.max_length,
    )
    result = trainer.train()
    return trainer.model, {"train_loss": float(result.training_loss), "logged": _losses(trainer)}


def train_dpo(model, tokenizer, rows: list[dict], cfg: TrainPolicyConfig, work: Path, device: str):
    from trl import DPOConfig, DPOTrainer

    losses = ["sigmoid", "sft"] if cfg.nll_weight > 0 else ["sigmoid"]
    weights = [1.0, cfg.nll_weight] if cfg.nll_weight > 0 else None
    args = DPOConfig(
        **_common(cfg, work, cfg.dpo_epochs, cfg.dpo_lr, device),
        beta=cfg.beta,
        loss_type=losses,
        loss_weights=weights,
    )
    trainer = _trainer(
        lambda ds: DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer),
        tokenizer,
        rows,
        cfg.separator,
        ("chosen", "rejected"),
        cfg.max_length,
    )
    result = trainer.train()
    return trainer.model, {"train_loss": float(result.training_loss), "logged": _losses(trainer)}


def _losses(trainer) -> list[float]:
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


# -- the command --------------------------------------------------------------------------------------
def datasets_name(datasets) -> str:
    """How a model's report names the datasets it was trained on (`arborist_train.json`)."""
    return " + ".join(map(str, datasets))


def train_policy(
    dataset: str | Path | list[str | Path], out: str | Path, policy: str | Path, cfg: TrainPolicyConfig
) -> dict:
    """Train `policy` on the dataset directory `dataset` (or several, their rows in the order
    given) with `cfg`; write the model to `out` atomically; return a report."""
    datasets = [Path(d) for d in (dataset if isinstance(dataset, list | tuple) else [dataset])]
    named = datasets_name(datasets)
    cfg = replace(cfg, separator=search_settings(datasets)[0])  # as the rows' steps were cut
    sft = [row for d in datasets for row in read_kind(d, "sft")] if "sft" in cfg.recipe else []
    pairs = [row for d in datasets for row in read_kind(d, "pairs")] if "dpo" in cfg.recipe else []
    if "sft" in cfg.recipe and not sft:
        raise TrainInputError(f"{named} has no sft rows: search more problems, or use --recipe dpo")
    if "dpo" in cfg.recipe and not pairs:
        raise TrainInputError(f"{named} has no pairs: search more problems, or use --recipe sft")
    return train_on_rows(sft, pairs, out, policy, cfg, source=named)


def _sweep_killed_work_dirs(out: Path) -> None:
    """Remove the work directories (`.{out.name}.*`, a model's size each) of earlier runs into `out`
    that were killed before they could remove their own: their `owner` names a process of this host
    that is gone. A run still going, or one on another host (a shared filesystem), keeps its own."""
    for work in out.parent.glob(f".{out.name}.*"):
        try:
            host, pid = (work / "owner").read_text().split()
            if host == socket.gethostname():
                os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except (OSError, ValueError):  # no owner file (not ours), or a process that is there
            continue


def train_on_rows(
    sft: list[dict],
    pairs: list[dict],
    out: str | Path,
    policy: str | Path,
    cfg: TrainPolicyConfig,
    source: str = "",
) -> dict:
    """SFT on `sft` rows, then DPO on `pairs` rows (either may be empty), from `policy` into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from mcts.hf import check_policy_dir

    out, policy = Path(out), check_policy_dir(policy)  # `~` expanded
    if out.exists() and not out.is_dir():
        raise TrainInputError(f"--out {out} is a file: choose a directory for the trained model")
    if out.exists() and any(out.iterdir()) and not (out / "arborist_train.json").is_file():
        raise TrainInputError(
            f"--out {out} exists and is not a model `arborist train` wrote: choose a new --out"
        )
    device = training_device(cfg.device)
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32, use_safetensors=True)
    report: dict = {"config": asdict(cfg), "dataset": source, "base": str(policy), "device": device}
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_killed_work_dirs(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    (work / "owner").write_text(f"{socket.gethostname()} {os.getpid()}")
    try:
        if sft:
            model, report["sft"] = train_sft(model, tokenizer, sft, cfg, work / "sft", device)
            report["sft_rows"] = len(sft)
        if pairs:
            model, report["dpo"] = train_dpo(model, tokenizer, pairs, cfg, work / "dpo", device)
            report["dpo_rows"] = len(pairs)
        final = work / "model"
        model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        (final / "arborist_train.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        from rewards.interrupts import deferred_sigint

        with deferred_sigint():  # two renames, never one of them alone: the old model goes when the new is in
            if out.exists():
                os.replace(out, work / "replaced")
            os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
