"""The exported files train with TRL as they are: one optimizer step each of DPOTrainer (pairs),
RewardTrainer (pairs with `margin`), KTOTrainer (kto) and SFTTrainer (sft), on a tiny random Llama
with the project's character tokenizer, reading the parquet shards with `datasets.load_dataset`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter, load_manifest
from tests._tiny_models import char_tokenizer, save_tiny_llama
from tests._trees import golden_tree, rich_tree

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """An exported dataset (two problems, two seeds each) and a saved tiny policy."""
    root = tmp_path_factory.mktemp("trl")
    trees = [golden_tree(pid, seed) for pid in ("p1", "p2") for seed in (0, 1)] + [rich_tree("p3")]
    DatasetWriter(root / "out", {"test": True}, {}).write_shard(
        derive_all(trees, DeriveConfig(confidence=0.0)), ["p1", "p2", "p3"], "s0"
    )
    save_tiny_llama(root / "policy", d_model=32, n_layers=2)
    return root


def _data(root: Path, kind: str):
    files = [str(root / "out" / f) for f in load_manifest(root / "out")["files"][kind]]
    return load_dataset("parquet", data_files=files, split="train", cache_dir=str(root / "hf-cache"))


def _common(tmp_path: Path, batch: int) -> dict:
    return dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        max_length=128,
        dataset_num_proc=None,
    )


def _train_and_check(trainer, loss_key: str = "loss") -> None:
    """Run the step; the logged loss must be finite and at least one weight must have moved."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h[loss_key] for h in trainer.state.log_history if loss_key in h]
    assert losses and all(math.isfinite(x) for x in losses), trainer.state.log_history
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved, "one optimizer step changed no weight"


def test_dpo_on_pairs(workdir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    ds = _data(workdir, "pairs")
    assert {"prompt", "chosen", "rejected", "margin"} <= set(
        ds.column_names
    ) and ds.num_rows == 9  # 4 + 4 + 1
    args = DPOConfig(**_common(tmp_path, 2))
    trainer = DPOTrainer(
        model=str(workdir / "policy"), args=args, train_dataset=ds, processing_class=char_tokenizer()
    )
    _train_and_check(trainer)


def test_reward_model_on_pairs_with_margin(workdir, tmp_path):
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = char_tokenizer()
    model = LlamaForSequenceClassification.from_pretrained(workdir / "policy", num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    ds = _data(workdir, "pairs")
    trainer = RewardTrainer(
        model=model, args=RewardConfig(**_common(tmp_path, 2)), train_dataset=ds, processing_class=tok
    )
    # the margin column reaches the loss, not only the file
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch and torch.all(batch["margin"] > 0)
    _train_and_check(trainer)


def test_kto_on_kto_rows(workdir, tmp_path):
    from trl import KTOConfig, KTOTrainer

    ds = _data(workdir, "kto")
    assert set(ds["label"]) == {True, False}
    trainer = KTOTrainer(
        model=str(workdir / "policy"),
        args=KTOConfig(**_common(tmp_path, 4)),
        train_dataset=ds,
        processing_class=char_tokenizer(),
    )
    _train_and_check(trainer)


def test_sft_on_best_trajectories(workdir, tmp_path):
    from trl import SFTConfig, SFTTrainer

    ds = _data(workdir, "sft")
    assert ds.num_rows == 3  # one best verified trajectory per problem
    trainer = SFTTrainer(
        model=str(workdir / "policy"),
        args=SFTConfig(**_common(tmp_path, 2)),
        train_dataset=ds,
        processing_class=char_tokenizer(),
    )
    _train_and_check(trainer)
