"""`arborist train`: what TRL builds from the shards is the text the policy writes and scores, token
for token; the command trains, writes a model `policy.path=` loads, and refuses bad input in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import processors

from mcts.policy import Policy, PolicyConfig
from rewards.cli import main
from rewards.derive import DeriveConfig, derive_all
from rewards.export import DatasetWriter
from rewards.train import TrainInputError, TrainPolicyConfig, as_trained, search_ids, train_policy
from tests._tiny_models import char_tokenizer, save_tiny_llama
from tests._trees import N, T, build_tree, golden_tree, rich_tree

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "out"
    # p3: steps the policy ended with EOS, an empty one and "3*4=12</s>" (no separator after it)
    ended = build_tree(
        [N("3+4=7", T("", 2, 0, eos=True), T("7*2=14", 2, 1)), T("3*4=12", 3, 0, eos=True)],
        prompt="3 4 2 -> 14\n",
        problem_id="p3",
    )
    trees = [golden_tree("p1"), rich_tree("p2"), ended]
    DatasetWriter(out, {"test": True}, {}).write_shard(
        derive_all(trees, DeriveConfig(confidence=0.0)), ["p1", "p2", "p3"], "s0"
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
        tok, pairs, "\n", ("chosen", "rejected"), 256,
    )  # fmt: skip
    sft_trainer = _trainer(
        lambda ds: SFTTrainer(
            model=str(policy), args=SFTConfig(output_dir=str(tmp_path / "s"), completion_only_loss=True, **common),
            train_dataset=ds, processing_class=tok,
        ),
        tok, sft, "\n", ("completion",), 256,
    )  # fmt: skip
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    for i, row in enumerate(pairs):
        got = dpo.train_dataset[i]
        for key in ("chosen", "rejected"):
            prompt, completion = search_ids(tok, row["prompt"], row[key])
            assert got["prompt_ids"] == prompt and got[f"{key}_ids"] == completion, (i, key)
            # the last step's separator, then EOS; or EOS right after a step the policy ended so
            assert completion[-1] == tok.eos_token_id
            assert (completion[-2:-1] == nl) == row[key].endswith("\n"), (row[key], completion)
        assert (got["prompt_ids"][0] == tok.bos_token_id) == bos  # one BOS where the tokenizer adds one
        assert got["prompt_ids"][1] != tok.bos_token_id
    ended_rows = [r for r in pairs for k in ("chosen", "rejected") if not r[k].endswith("\n")]
    assert ended_rows, "no pair side ends with a step the policy ended with EOS: the check proved nothing"
    for i, row in enumerate(sft):
        got = sft_trainer.train_dataset[i]
        prompt, completion = search_ids(tok, row["prompt"], row["completion"])
        assert got["input_ids"] == prompt + completion
        assert got["labels"] == [-100] * len(prompt) + completion  # the loss on the solution only


def test_a_tokenizer_merging_across_the_prompt_boundary_is_said_and_trained(tmp_path, capsys):
    """A BPE tokenizer merges "\\n" with the next digit where the search sampled the text whole,
    while TRL tokenizes prompt and completion apart: the same text, other ids. One line says so."""
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from rewards.train import _trainer
    from tests._tiny_models import save_tiny_llama_bpe

    policy = save_tiny_llama_bpe(tmp_path / "bpe")
    tok = AutoTokenizer.from_pretrained(policy)
    rows = [
        {"prompt": f"{a} {b} 7 -> {a + b + 7}\n", "completion": f"{a}+{b}={a + b}\n{a + b}+7={a + b + 7}\n"}
        for a in range(1, 5)
        for b in range(1, 5)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path / "s"), report_to=[], bf16=False, use_cpu=True, completion_only_loss=True
    )
    trainer = _trainer(
        lambda ds: SFTTrainer(model=str(policy), args=args, train_dataset=ds, processing_class=tok),
        tok, rows, "\n", ("completion",), 256,
    )  # fmt: skip
    assert len(trainer.train_dataset) == len(rows)
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("arborist train:")]
    assert len(said) == 1 and "checked rows tokenize differently in TRL" in said[0], said


def test_rows_train_as_exported_and_long_ones_are_refused(dataset, tmp_path):
    """No separator is added (a step the policy ended with EOS has none); a row TRL would cut
    before its EOS, or drop, at max_length is refused in one line before anything trains."""
    row = {"prompt": "3 4 -> 7\n", "completion": "3+4=7"}
    assert as_trained(row, ("completion",)) == row
    assert as_trained(row, ("completion",), bos="<s>")["prompt"] == "<s>3 4 -> 7\n"
    policy = save_tiny_llama(tmp_path / "policy")
    cfg = TrainPolicyConfig(recipe="sft", max_length=12, device="cpu")
    with pytest.raises(TrainInputError, match=r"rows are longer than max_length=12 tokens .*--max-length"):
        train_policy(dataset, tmp_path / "o", policy, cfg)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_writes_a_policy_the_search_loads(dataset, tmp_path):
    policy = save_tiny_llama(tmp_path / "policy")
    cfg = TrainPolicyConfig(recipe="sft+dpo", sft_epochs=1, dpo_epochs=1, batch_size=4, device="cpu")
    report = train_policy(dataset, tmp_path / "trained", policy, cfg)
    assert report["sft_rows"] == 3 and report["dpo_rows"] > 0 and report["dpo"]["train_loss"] > 0
    loaded = Policy.load(PolicyConfig(path=str(tmp_path / "trained"), device="cpu"))
    assert loaded.greedy(["7 3 -> 10\n"], max_new_tokens=4)
    meta = json.loads((tmp_path / "trained" / "arborist_train.json").read_text())
    assert meta["config"]["recipe"] == "sft+dpo"
    # the same seed trains the same weights
    again = train_policy(dataset, tmp_path / "again", policy, cfg)
    a = (tmp_path / "trained" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes() and again["sft_rows"] == 3


def test_bad_input_is_one_line(dataset, tmp_path, capsys):
    policy = save_tiny_llama(tmp_path / "policy")
    capsys.readouterr()
    cases = [
        [str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--policy", str(policy)],
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(tmp_path / "no-model")],
        [str(dataset), "--out", str(dataset), "--policy", str(policy)],  # would overwrite the dataset
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(policy), "--sft-lr", "-1"],
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(policy), "--beta", "inf"],
        [str(dataset), "--out", str(tmp_path / "o"), "--policy", str(policy), "--device", "tpu"],
        [str(dataset), "--out", str(policy / "config.json"), "--policy", str(policy)],  # a file
    ]
    damaged = tmp_path / "damaged"  # a shard cut short, as a full disk outside arborist leaves it
    shutil.copytree(dataset, damaged)
    sft = next((damaged / "sft").glob("*.parquet"))
    sft.write_bytes(sft.read_bytes()[:100])
    cases.append([str(damaged), "--out", str(tmp_path / "o"), "--policy", str(policy)])
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
    assert "'sft_rows': 6" in capsys.readouterr().out  # both datasets' three rows
    meta = json.loads((tmp_path / "o" / "arborist_train.json").read_text())
    assert meta["dataset"] == f"{dataset} + {dataset}"


def test_the_datasets_search_settings_decide_the_separator_and_the_default_policy(tmp_path, capsys):
    """`arborist train` cuts the rows' steps at the separator their search used, refuses datasets
    of two, and starts from the policy that searched the first dataset unless --policy says."""
    from rewards.train import search_settings

    trees = [golden_tree("p1")]
    dirs = []
    for name, sep, path in (("a", "\n\n", "/models/m"), ("b", "\n", "")):
        config = {
            "task": {"name": "jsonl", "step_separator": sep},
            "policy": {"path": path, "bootstrap_seed": 2},
        }
        DatasetWriter(tmp_path / name, config, {}).write_shard(
            derive_all(trees, DeriveConfig(confidence=0.0)), ["p1"], "s0"
        )
        dirs.append(tmp_path / name)
    assert search_settings(dirs[:1]) == ("\n\n", "/models/m", 2)
    assert search_settings(dirs[1:]) == ("\n", "", 2)
    with pytest.raises(TrainInputError, match="different separators"):
        search_settings(dirs)
    # no --policy: the searching policy's directory, refused here in one line as it does not exist
    capsys.readouterr()
    assert main(["train", str(dirs[0]), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "starting from /models/m" in err[0] and err[1].startswith("arborist: error: policy.path=/models/m")


@pytest.mark.slow
def test_a_model_replaced_under_ctrl_c_is_the_old_or_the_new_one_whole(dataset, tmp_path, monkeypatch):
    """Training into an existing --out swaps the new model in with two renames; a Ctrl-C between
    them waits for the second, so --out always holds a whole model."""
    import os
    import signal

    policy = save_tiny_llama(tmp_path / "policy")
    cfg = TrainPolicyConfig(recipe="sft", sft_epochs=1, batch_size=4, device="cpu")
    first = train_policy(dataset, tmp_path / "trained", policy, cfg)
    rename = os.replace

    def interrupted(src, dst):
        rename(src, dst)
        if Path(dst).name == "replaced":  # the old model moved aside, the new one not yet in
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_policy(dataset, tmp_path / "trained", policy, TrainPolicyConfig(**{**cfg.__dict__, "seed": 1}))
    meta = json.loads((tmp_path / "trained" / "arborist_train.json").read_text())
    assert meta["config"]["seed"] == 1 and first["config"]["seed"] == 0  # the new one, whole
    assert Policy.load(PolicyConfig(path=str(tmp_path / "trained"), device="cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy", "trained"]  # no work dir left


def test_a_killed_runs_work_dir_is_swept_and_a_live_ones_kept(tmp_path):
    """SIGKILL leaves `arborist train`'s hidden work dir (a model's size) beside --out; the next run
    into that --out removes it, but never the dir of a run still going, here or on another host."""
    import os
    import socket
    import subprocess
    import sys

    from rewards.train import _sweep_killed_work_dirs

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    owners = {
        ".trained.killed": f"{socket.gethostname()} {int(gone.stdout)}",
        ".trained.running": f"{socket.gethostname()} {os.getpid()}",
        ".trained.elsewhere": f"another-host-{socket.gethostname()} {int(gone.stdout)}",
    }
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner").write_text(owner)
    (tmp_path / ".trained.users").mkdir()  # no owner file: not one of ours
    _sweep_killed_work_dirs(tmp_path / "trained")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".trained.elsewhere",
        ".trained.running",
        ".trained.users",
    ]
