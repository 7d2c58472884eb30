"""A value function of several heads on one frozen trunk (`TrainCriticsConfig.value_members`):
what training writes, that scoring averages the heads' logits from one trunk pass, that the heads
ride the PRM's pass like one head does, and that a member outside the directory or off the trunk
is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _tiny_models import save_tiny_llama

from critics.base import CriticSet
from critics.labels import Labels
from critics.models import CriticLoadError, load_critic
from critics.train import TrainCriticsConfig, train_critics
from mcts.tasks.countdown import CountdownTask, make_problem
from rewards.train_critics import main_train_critics

TASK = CountdownTask()
PROBLEMS = [make_problem(f"p{i}", [3, 7, 9, 4], 24) for i in range(7)]
STEPS = [["7*4=28"], ["7*4=28", "28-4=24"], [], ["9-3=6"], ["3+7=10", "10+9=19"], ["9*4=36"], ["1+1=2"]]


def _labels(kind: str, n: int) -> Labels:
    from test_critics import _toy_labels  # tests/ is on sys.path under pytest

    labels = _toy_labels(n)
    labels.kind = kind
    return labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    policy = save_tiny_llama(root / "policy")
    labels = {"value": _labels("value", 96), "prm": _labels("prm", 96)}
    extra = {"value": _labels("value", 64)}
    for i in range(len(extra["value"])):  # another source with a higher mean: the offset is refitted
        extra["value"].soft[i] = [0.95 if extra["value"].hard[i][0] else 0.5]
        extra["value"].problem_ids[i] = extra["value"].keys[i] = f"x{i}"
    cfg = TrainCriticsConfig(kinds=("value", "prm"), steps=30, batch_size=16, lr=3e-3, progress=False)
    one = train_critics(labels, root / "one", policy, cfg, extra_train=extra)
    three = train_critics(
        labels,
        root / "three",
        policy,
        TrainCriticsConfig(**{**cfg.__dict__, "value_members": 3}),
        extra_train=extra,
    )
    return root, one, three


def test_training_writes_the_heads_and_reports_their_mean(trained):
    root, one, three = trained
    report = three["value"]
    assert report["members"] == 3 and len(report["member_val_auroc"]) == 3
    assert report["member_val_auroc"][0] == one["value"]["val_auroc"], (
        "the first head is the one-head build's"
    )
    meta = json.loads((root / "three" / "value" / "critic.json").read_text())
    assert meta["members"] == ["member-1", "member-2"] and meta["logit_offset"] == report["logit_offset"]
    assert report["logit_offset"] != one["value"]["logit_offset"], "refitted on the mean of the heads"
    first = (root / "three" / "value" / "model.safetensors").read_bytes()
    assert first == (root / "one" / "value" / "model.safetensors").read_bytes()
    heads = [(root / "three" / "value" / m / "model.safetensors").read_bytes() for m in meta["members"]]
    assert len({first, *heads}) == 3, "each head trained with its own seed"
    seeds = [
        json.loads((root / "three" / "value" / m / "critic.json").read_text())["config"]["seed"]
        for m in meta["members"]
    ]
    assert (meta["config"]["seed"], seeds) == (0, [1, 2]), "each head's critic.json records its own seed"
    assert "members" not in json.loads((root / "three" / "prm" / "critic.json").read_text()), (
        "the PRM is one head"
    )
    assert three["prm"] == {**one["prm"], "seconds": three["prm"]["seconds"]}


def test_scores_are_the_heads_mean_logit_from_one_trunk_pass(trained):
    root = trained[0]
    value = load_critic(root / "three" / "value", "value", TASK, device="cpu")
    assert len(value.members) == 2
    alone = [load_critic(root / "three" / "value", "value", TASK, device="cpu")]
    alone[0].members = []
    alone += [
        load_critic(root / "three" / "value" / m, "value", TASK, device="cpu")
        for m in ("member-1", "member-2")
    ]
    logits = [np.log(p / (1 - p)) - c.logit_offset for c in alone for p in [c.score(PROBLEMS, STEPS)]]
    expected = 1 / (1 + np.exp(-(np.mean(logits, axis=0) + value.logit_offset)))
    before = value.forward_calls
    got = value.score(PROBLEMS, STEPS)
    assert value.forward_calls - before == 1
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.abs(np.array(logits[0]) - logits[1]).max() > 1e-3, (
        "the heads differ: the mean is not one of them"
    )


def test_the_heads_ride_the_prms_pass(trained):
    root = trained[0]
    value = load_critic(root / "three" / "value", "value", TASK, device="cpu", batch_size=3)
    prm = load_critic(root / "three" / "prm", "prm", TASK, device="cpu", batch_size=3)
    shared = CriticSet(value=value, prm=prm)
    assert shared.shared_trunk
    together = shared.score_nodes(PROBLEMS, STEPS)
    shared.shared_trunk = False
    apart = shared.score_nodes(PROBLEMS, STEPS)
    np.testing.assert_allclose(together["value"], apart["value"], rtol=0, atol=1e-6)
    assert np.array_equal(together["prm"], apart["prm"])


def test_a_member_outside_the_critic_missing_or_off_its_trunk_is_refused(trained, tmp_path):
    root = trained[0]
    bad = tmp_path / "value"
    shutil.copytree(root / "three" / "value", bad)
    meta = json.loads((bad / "critic.json").read_text())

    def refused(members, needle: str) -> None:
        (bad / "critic.json").write_text(json.dumps({**meta, "members": members}))
        with pytest.raises(CriticLoadError, match=needle) as e:
            load_critic(bad, "value", TASK, device="cpu")
        assert "\n" not in str(e.value) and str(bad) in str(e.value)

    refused(["../prm"], "not a sub-directory of it")
    (bad / "loop").symlink_to(bad)  # a member that is the critic itself: no endless recursion
    refused(["loop"], "leads out of it")
    (bad / "away").symlink_to(root / "three" / "prm")
    refused(["away"], "leads out of it")
    refused(["member-1", "member-3"], "'member-3', which is missing")
    (bad / "empty").mkdir()
    refused(["empty"], "'empty', which has no config.json")
    (bad / "critic.json").write_text(json.dumps(meta))
    member = load_critic(bad / "member-1", "value", TASK, device="cpu")
    with torch.no_grad():
        member.model.model.layers[0].mlp.down_proj.weight.add_(1e-3)
    member.model.save_pretrained(bad / "member-1", safe_serialization=True)
    with pytest.raises(CriticLoadError, match="does not share its frozen trunk"):
        load_critic(bad, "value", TASK, device="cpu")


def test_heads_need_one_trunk_pass(tmp_path, capsys):
    """Heads that could not share a trunk pass are refused before (or, for the base's shape, at) training."""
    from _tiny_models import save_tiny_gpt2

    with pytest.raises(ValueError, match="value_members=0"):
        TrainCriticsConfig(value_members=0)
    with pytest.raises(ValueError, match="train_layers=2: heads are scored from one trunk pass"):
        TrainCriticsConfig(value_members=2, train_layers=2)
    assert main_train_critics([str(tmp_path), "--value-members", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "value_members=0" in err and "\n" not in err
    cfg = TrainCriticsConfig(kinds=("value",), steps=2, batch_size=8, value_members=2, progress=False)
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="needs a Llama-style base .* train with value_members=1"):
        train_critics({"value": _labels("value", 32)}, tmp_path / "out", gpt2, cfg)
    assert not (tmp_path / "out").exists()
