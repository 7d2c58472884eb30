"""`arborist train`: what TRL builds from the shards is the text the policy writes and scores, token
for token; the command trains, writes a model `policy.path=` loads, and refuses bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import processors

from mcts.policy import Policy, PolicyConfig
from rewards.cli import main
from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter
from rewards.train import TrainInputError, TrainPolicyConfig, as_trained, search_ids, train_policy
from tests._tiny_models import char_tokenizer, save_tiny_llama
from tests._trees import golden_tree, rich_tree

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "out"
    trees = [golden_tree("p1"), rich_tree("p2")]
    DatasetWriter(out, {"test": True}, {}).write_shard(
        derive_all(trees, DeriveConfig(confidence=0.0)), ["p1", "p2"], "s0"
    )
    return out


def _no_bos():
    """The same vocabulary with a tokenizer that adds no BOS (GPT-2 style)."""
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tok


@pytest.mark.parametrize("bos", [True, False], ids=["tokenizer-adds-bos", "no-bos"])
def test_trl_trains_on_the_ids_the_policy_writes(dataset, tmp_path, bos):
    """What TRL's own DPO and SFT tokenization builds from the shards (through `arborist train`'s
    row preparation) is, token for token, the prompt as the policy encodes it at search time, the
    steps as it writes them with their separators, then EOS."""
    from rewards.train import _trainer, read_kind

    tok = char_tokenizer() if bos else _no_bos()
    policy = save_tiny_llama(tmp_path / "policy")
    pairs, sft = read_kind(dataset, "pairs"), read_kind(dataset, "sft")
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    common = dict(report_to=[], bf16=False, use_cpu=True, max_length=256)
    dpo = _trainer(
        lambda ds: DPOTrainer(
            model=str(policy), args=DPOConfig(output_dir=str(tmp_path / "d"), **common), train_dataset=ds,
            processing_class=tok,
        ),
        tok, pairs, "\n", ("chosen", "rejected"),
    )  # fmt: skip
    sft_trainer = _trainer(
        lambda ds: SFTTrainer(
            model=str(policy), args=SFTConfig(output_dir=str(tmp_path / "s"), completion_only_loss=True, **common),
            train_dataset=ds, processing_class=tok,
        ),
        tok, sft, "\n", ("completion",),
    )  # fmt: skip
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    for i, row in enumerate(pairs):
        got = dpo.train_dataset[i]
        for key in ("chosen", "rejected"):
            prompt, completion = search_ids(tok, row["prompt"], row[key])
            assert got["prompt_ids"] == prompt and got[f"{key}_ids"] == completion, (i, key)
            assert completion[-2:] == [*nl, tok.eos_token_id]  # the last step's separator, then EOS
        assert (got["prompt_ids"][0] == tok.bos_token_id) == bos  # one BOS where the tokenizer adds one
        assert got["prompt_ids"][1] != tok.bos_token_id
    for i, row in enumerate(sft):
        got = sft_trainer.train_dataset[i]
        prompt, completion = search_ids(tok, row["prompt"], row["completion"])
        assert got["input_ids"] == prompt + completion
        assert got["labels"] == [-100] * len(prompt) + completion  # the loss on the solution only


def test_an_old_dataset_without_step_ends_is_mended():
    row = {"prompt": "3 4 -> 7\n", "completion": "3+4=7"}
    assert as_trained(row, "\n", ("completion",))["completion"] == "3+4=7\n"
    assert as_trained({**row, "completion": "3+4=7\n"}, "\n", ("completion",))["completion"] == "3+4=7\n"


@pytest.mark.slow
def test_train_writes_a_policy_the_search_loads(dataset, tmp_path):
    policy = save_tiny_llama(tmp_path / "policy")
    cfg = TrainPolicyConfig(recipe="sft+dpo", sft_epochs=1, dpo_epochs=1, batch_size=4, device="cpu")
    report = train_policy(dataset, tmp_path / "trained", policy, cfg)
    assert report["sft_rows"] == 2 and report["dpo_rows"] > 0 and report["dpo"]["train_loss"] > 0
    loaded = Policy.load(PolicyConfig(path=str(tmp_path / "trained"), device="cpu"))
    assert loaded.greedy(["7 3 -> 10\n"], max_new_tokens=4)
    meta = json.loads((tmp_path / "trained" / "arborist_train.json").read_text())
    assert meta["config"]["recipe"] == "sft+dpo"
    # the same seed trains the same weights
    again = train_policy(dataset, tmp_path / "again", policy, cfg)
    a = (tmp_path / "trained" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes() and again["sft_rows"] == 2


def test_bad_input_is_one_line(dataset, tmp_path, capsys):
    policy = save_tiny_llama(tmp_path / "policy")
    capsys.readouterr()
    cases = [
        [str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--policy", str(policy)],
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(tmp_path / "no-model")],
        [str(dataset), "--out", str(dataset), "--policy", str(policy)],  # would overwrite the dataset
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(policy), "--sft-lr", "-1"],
    ]
    for argv in cases:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("arborist: error: "), (argv, err)
    assert not (tmp_path / "o").exists()
    with pytest.raises(TrainInputError, match="recipe"):
        TrainPolicyConfig(recipe="ppo")


def test_train_takes_the_rows_of_several_datasets(dataset, tmp_path, capsys):
    policy = save_tiny_llama(tmp_path / "policy")
    argv = [
        str(dataset),
        str(dataset),
        "--out",
        str(tmp_path / "o"),
        "--policy",
        str(policy),
        "--batch-size",
        "4",
    ]
    assert main(["train", *argv, "--sft-epochs", "1", "--device", "cpu"]) == 0
    assert "'sft_rows': 4" in capsys.readouterr().out  # both datasets' two rows
    meta = json.loads((tmp_path / "o" / "arborist_train.json").read_text())
    assert meta["dataset"] == f"{dataset} + {dataset}"
