"""Critics: batched scoring (one forward per call), TRL stepwise positions against a manual forward,
labels from a hand-built tree, training that learns, one-line load errors, and critics-only search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_models import save_tiny_llama
from _trees import golden_tree

from critics.base import CriticsConfig, CriticSet
from critics.labels import Labels
from critics.models import CriticLoadError, ModelCritic, init_from_policy, load_critic, save_critic
from critics.train import TrainCriticsConfig, train_critics, train_one
from critics.verifier import VerifierCritic
from mcts.base import SearchConfig
from mcts.expander import PolicyExpander
from mcts.merge import Option
from mcts.policy import Rollout
from mcts.search import run_search
from mcts.tasks.countdown import CountdownTask, make_problem
from rewards.critic_data import orm_labels, prm_labels, value_labels
from rewards.train_critics import main_train_critics, train_critics_on_trees

TASK = CountdownTask()
PROBLEMS = [
    make_problem("a", [3, 7, 9, 4], 24),
    make_problem("b", [1, 2], 3),
    make_problem("c", [2, 5, 8], 18),
]
STEPS = [["7*4=28", "28-3=25"], [], ["2+5=7"]]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("policy"))


@pytest.fixture(scope="module")
def critic_dirs(policy_dir, tmp_path_factory):
    """Untrained critics (policy trunk + random head) saved the way training saves them."""
    root = tmp_path_factory.mktemp("critics")
    for kind in ("value", "prm", "orm"):
        model, tok = init_from_policy(policy_dir, kind, seed=1)
        torch.nn.init.normal_(_head(model).weight, std=0.5)  # a head with visible effect
        save_critic(model, tok, kind, root / kind, {"note": "test"})
    return root


def _head(model):
    return model.score if hasattr(model, "score") else model.classifier


def _critic(critic_dirs, kind, batch_size=256) -> ModelCritic:
    return load_critic(critic_dirs / kind, kind, TASK, device="cpu", batch_size=batch_size)


@pytest.mark.parametrize("kind", ["value", "prm", "orm"])
def test_one_forward_per_call_shapes_and_ranges(critic_dirs, kind):
    critic = _critic(critic_dirs, kind)
    scores = critic.score(PROBLEMS, STEPS)
    assert critic.forward_calls == 1, "a batch must be one forward"
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    small = _critic(critic_dirs, kind, batch_size=2)
    again = small.score(PROBLEMS, STEPS)
    assert small.forward_calls == 2, "chunks of batch_size: ceil(3 / 2) forwards"
    np.testing.assert_allclose(again, scores, atol=1e-5)  # padding and chunking do not change a score


def _manual(model, tok, text: str) -> torch.Tensor:
    """Unpadded single-row forward: logits [len] (token classifier) or [1] (sequence classifier)."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, ..., 0].float()


def test_prm_scores_step_ends_like_a_manual_forward(critic_dirs):
    critic = _critic(critic_dirs, "prm")
    prompts = [TASK.prompt(p) for p in PROBLEMS]
    per_step = critic.score_texts(prompts, STEPS, every_step=True)
    assert critic.forward_calls == 1
    for prompt, steps, probs in zip(prompts, STEPS, per_step, strict=True):
        text = prompt + "".join(s + "\n" for s in steps)
        logits = _manual(critic.model, critic.tok, text)
        # TRL stepwise layout: each step's label sits on the "\n" that ends it.
        ends = [i for i, t in enumerate(critic.tok(text)["input_ids"]) if critic.tok.decode([t]) == "\n"][1:]
        assert len(probs) == max(1, len(steps))
        if steps:
            np.testing.assert_allclose(probs, logits[ends].sigmoid().numpy(), atol=1e-5)
    last = critic.score(PROBLEMS, STEPS)
    assert last[0] == pytest.approx(per_step[0][-1], abs=1e-6)


@pytest.mark.parametrize("kind", ["value", "orm"])
def test_sequence_critics_read_the_last_token(critic_dirs, kind):
    critic = _critic(critic_dirs, kind)
    scores = critic.score(PROBLEMS, STEPS)
    for p, steps, s in zip(PROBLEMS, STEPS, scores, strict=True):
        text = TASK.prompt(p) + "".join(x + "\n" for x in steps)
        assert s == pytest.approx(float(_manual(critic.model, critic.tok, text).sigmoid()), abs=1e-5)


def test_labels_from_golden_tree():
    """Golden tree (tests/_trees.py): each terminal is one trial, however often it was revisited."""
    tree = golden_tree()
    value = value_labels([tree], min_verified=2)
    got = {n[0][1]: (s[0], h[0]) for n, s, h in zip(value.nodes, value.soft, value.hard, strict=True)}
    assert got == {1: (0.5, True), 2: (pytest.approx(1 / 3), True), 6: (0.5, True)}  # 3: one trial
    assert [row[-1] for row in value.steps] == ["3 + 2 = 5", "3 * 2 = 6", "6 + 5 = 11"]
    assert len(value_labels([tree], min_verified=3)) == 1  # only node 2 rests on three samples

    prm = prm_labels([tree])
    rows = {tuple(i for _, i in n): h for n, h in zip(prm.nodes, prm.hard, strict=True)}
    assert rows == {
        (1, 4): [True, True],
        (1, 5): [True, False],
        (2, 6, 9): [True, True, True],
        (2, 6, 10): [True, True, False],
        (2, 7): [True, False],
        (3, 8): [False, False],
    }
    soft = dict(zip([tuple(i for _, i in n) for n in prm.nodes], prm.soft, strict=True))
    assert soft[(2, 6, 10)] == pytest.approx([1 / 3, 0.5, 0.0])

    orm = orm_labels([tree, golden_tree(seed=1)])  # the same solutions twice: kept once
    got = {n[0][1]: h[0] for n, h in zip(orm.nodes, orm.hard, strict=True)}
    assert got == {4: True, 5: False, 9: True, 10: False, 7: False, 8: False}


def _toy_labels(n: int) -> Labels:
    """Separable: a step with '+' is sound, one with '-' is not."""
    rng = np.random.default_rng(0)
    out = Labels("orm")
    for i in range(n):
        a, b = (int(x) for x in rng.integers(1, 9, 2))
        good = i % 2 == 0
        step = f"{a}+{b}={a + b}" if good else f"{max(a, b)}-{min(a, b)}={abs(a - b)}"
        out.problem_ids.append(f"t{i}")
        out.keys.append(f"t{i}")
        out.prompts.append(f"{a} {b} -> {a + b}\n")
        out.steps.append([step])
        out.soft.append([float(good)])
        out.hard.append([good])
        out.nodes.append([(f"t{i}", 1)])
    return out


@pytest.mark.parametrize("kind", ["orm", "prm"])
def test_training_reduces_the_loss(policy_dir, kind):
    labels = _toy_labels(64)
    labels.kind = kind
    cfg = TrainCriticsConfig(steps=40, batch_size=16, lr=3e-3, progress=False)
    model, tok, report = train_one(kind, labels, _toy_labels(32), policy_dir, "\n", cfg)
    assert report["final_loss"] < 0.7 * report["first_loss"], report
    assert report["val_auroc"] > 0.9, report


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_layers_trains_the_top_blocks_and_head_only(tmp_path, arch):
    """train_layers=1 moves the top block, the final norm and the head; the embeddings and the
    blocks below keep the base checkpoint's weights. -1 moves everything."""
    from _tiny_models import save_tiny_gpt2, save_tiny_llama

    base = (save_tiny_llama if arch == "llama" else save_tiny_gpt2)(tmp_path / "base", n_layers=3)
    before = {k: v.clone() for k, v in init_from_policy(base, "prm", 0)[0].state_dict().items()}
    labels = _toy_labels(32)
    labels.kind = "prm"
    moved = {}
    for layers in (1, -1):
        cfg = TrainCriticsConfig(steps=3, batch_size=8, train_layers=layers, val_fraction=0.0, progress=False)
        model, _, report = train_one("prm", labels, Labels("prm"), base, "\n", cfg)
        after = model.state_dict()
        moved[layers] = {k for k, v in after.items() if k in before and not torch.equal(v, before[k])}
        assert report["trained_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = "model.layers." if arch == "llama" else "transformer.h."
    top = {k for k in moved[1] if k.startswith(blocks)}
    assert top and all(k.startswith(f"{blocks}2.") for k in top), sorted(moved[1])
    assert not any(
        "embed" in k or k.startswith(("transformer.wte", "transformer.wpe")) for k in moved[1] - top
    )
    assert any(k.startswith(("score", "classifier")) for k in moved[1])
    assert any(k.startswith((f"{blocks}0.", f"{blocks}1.")) for k in moved[-1])  # -1: the whole model
    with pytest.raises(ValueError, match="train_layers=-2"):  # refused at construction
        TrainCriticsConfig(train_layers=-2)


def test_logit_offset_from_critic_json_shifts_every_logit(critic_dirs, tmp_path):
    """A class-balanced ORM keeps its prior correction in critic.json; loading applies it."""
    import math
    import shutil

    shifted = tmp_path / "orm"
    shutil.copytree(critic_dirs / "orm", shifted)
    meta = json.loads((shifted / "critic.json").read_text())
    (shifted / "critic.json").write_text(json.dumps({**meta, "logit_offset": -2.0}))
    plain = _critic(critic_dirs, "orm").score(PROBLEMS, STEPS)
    moved = load_critic(shifted, "orm", TASK, device="cpu").score(PROBLEMS, STEPS)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    for a, b in zip(plain, moved, strict=True):
        assert logit(b) == pytest.approx(logit(a) - 2.0, abs=1e-4)


def test_load_errors_are_one_line(policy_dir, critic_dirs, tmp_path):
    from transformers import LlamaForSequenceClassification

    def err(path, kind="value") -> str:
        with pytest.raises(CriticLoadError) as e:
            load_critic(path, kind, TASK, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "does not exist" in err(tmp_path / "nope")
    assert "ForSequenceClassification" in err(policy_dir)  # a causal LM is not a value critic
    assert "ForTokenClassification" in err(critic_dirs / "value", "prm")
    three = LlamaForSequenceClassification.from_pretrained(policy_dir, num_labels=3)
    three.save_pretrained(tmp_path / "three")
    assert "a value critic needs num_labels=1" in err(tmp_path / "three")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((critic_dirs / "value" / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    assert "pickle" in err(pickled)
    assert "orm critic" in err(critic_dirs / "orm", "value")  # critic.json says what it is


def test_verifier_critic():
    v = VerifierCritic(TASK)
    p = make_problem("v", [3, 7, 9, 4], 24)
    out = v.score([p, p, p], [["7*4=28", "28-4=24"], ["3+7=10"], ["3+3=6"]])
    assert np.isnan(out[1]) and out[2] == 0.0  # partial: no verdict; invalid step: wrong
    assert v.score([p], [["9-3=6", "6*4=24"]])[0] == 1.0


def test_default_critics_need_a_dir(critic_dirs, capsys):
    assert CriticSet.load(CriticsConfig(value_path="", prm_path="", orm_path=""), TASK) is None
    assert CriticSet.load(CriticsConfig(), TASK, default_dir=None) is None
    assert "only read the built-in Countdown task" in capsys.readouterr().err
    loaded = CriticSet.load(CriticsConfig(device="cpu", orm_path=""), TASK, default_dir=critic_dirs)
    assert loaded.value.kind == "value" and loaded.prm.kind == "prm" and loaded.orm is None
    nodes = loaded.score_nodes(PROBLEMS, STEPS)
    assert nodes["value"].shape == nodes["prm"].shape == (3,)
    assert np.isnan(loaded.score_outcomes(PROBLEMS, STEPS)).all()


class ScriptedPolicy:
    """A deterministic stand-in for the policy that writes valid Countdown steps (a random tiny
    model writes unparsable text, so every node would be terminal and no critic would run)."""

    def __init__(self):
        self.generate_calls = 0

    @staticmethod
    def _moves(prompt: str) -> list[str]:
        head, *done = [line for line in prompt.split("\n") if line]
        pool = [int(x) for x in head.split("->")[0].split()]
        for step in done:  # "a op b=c": a and b leave the pool, c joins it
            left, c = step.split("=")
            a, b = (int(x) for x in left.replace("*", "+").replace("-", "+").split("+"))
            pool.remove(a)
            pool.remove(b)
            pool.append(int(c))
        if len(pool) < 2:
            return []
        a, b = sorted(pool[:2], reverse=True)
        return [f"{a}+{b}={a + b}", f"{a}*{b}={a * b}", f"{a}-{b}={a - b}"]

    def propose(self, prompts, num_options, seed, stop="\n"):
        self.generate_calls += 1
        out = []
        for prompt, k in zip(prompts, num_options, strict=True):
            moves = self._moves(prompt) or ["done"]
            out.append([Option(moves[i % len(moves)], -1.0 - i, 4, ended=False) for i in range(k)])
        return out

    def rollout(self, prompts, seed, max_new_tokens=None, sep="\n"):
        self.generate_calls += 1
        out = []
        for prompt in prompts:
            steps = []
            while moves := self._moves(prompt + "".join(s + "\n" for s in steps)):
                steps.append(moves[0])
            out.append(Rollout("\n".join(steps), 4 * len(steps), steps, ended=True))
        return out


def test_critics_only_search_end_to_end(critic_dirs):
    policy = ScriptedPolicy()
    cfg = CriticsConfig(device="cpu", rollouts=0, w_orm=1.0, verifier_at_terminals=False)
    critics = CriticSet.load(cfg, TASK, default_dir=critic_dirs)
    calls = {"expander": 0}
    expander = PolicyExpander(policy, TASK, cfg, critics=critics)

    def counting(leaves, seed):
        calls["expander"] += 1
        return expander(leaves, seed)

    trees = run_search(PROBLEMS, TASK, counting, SearchConfig(simulations=3, max_depth=3), seed=0)
    assert policy.generate_calls == calls["expander"], "critics-only: no rollout generate calls"
    # value and PRM: one forward per expander call at most (new non-terminal nodes, batched)
    assert 1 <= critics.value.forward_calls == critics.prm.forward_calls <= calls["expander"]
    assert critics.orm.forward_calls <= calls["expander"]  # terminals valued by the ORM
    for t in trees:
        inner = (t.nodes["depth"] > 0) & ~t.nodes["terminal"]
        assert not np.isnan(t.nodes["value"][inner]).any() and not np.isnan(t.nodes["prm"][inner]).any()
        assert (t.nodes["verified_visits"][0] <= t.nodes["visits"][0]).all()


def test_train_critics_from_search_trees(policy_dir, tmp_path):
    """Trees of a tiny rollouts-valued search -> dataset dir -> `train-critics` -> loadable critics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    expander = PolicyExpander(ScriptedPolicy(), TASK, CriticsConfig(rollouts=1))
    trees = run_search(PROBLEMS, TASK, expander, SearchConfig(simulations=4, max_depth=3), seed=0)
    (tmp_path / "ds" / "trees").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([t.to_row() for t in trees]), tmp_path / "ds" / "trees" / "s0.parquet"
    )
    argv = [str(tmp_path / "ds"), "--base", str(policy_dir), "--steps", "3", "--kinds", "orm,prm"]
    assert main_train_critics(argv) == 0
    for kind in ("orm", "prm"):
        meta = json.loads((tmp_path / "ds" / "critics" / kind / "critic.json").read_text())
        assert meta["kind"] == kind and meta["train"]["steps"] == 3
        rate = meta["train"]["train_positive_rate"]
        balanced = kind == "orm" and 0 < rate < 1  # the ORM's loss is class-balanced by default
        expected = np.log(rate / (1 - rate)) if balanced else 0.0
        assert meta["logit_offset"] == pytest.approx(expected), (kind, rate)
        load_critic(tmp_path / "ds" / "critics" / kind, kind, TASK, device="cpu")
        assert meta["task"] == TASK.name
    from mcts.tasks.jsonl import JsonlTask

    with pytest.raises(CriticLoadError, match=f"learned from {TASK.name} trees, not jsonl ones"):
        load_critic(tmp_path / "ds" / "critics" / "prm", "prm", JsonlTask(), device="cpu")
    assert not list(tmp_path.glob("ds/.critics-*")), "no temporary directory left behind"
    assert main_train_critics([str(tmp_path / "empty")]) == 2
    assert main_train_critics([str(tmp_path / "ds"), "--train-layers", "-3"]) == 2
    assert main_train_critics([str(tmp_path / "ds"), "--value-steps", "0"]) == 2
    assert main_train_critics([str(tmp_path / "ds"), "--orm-steps", "0"]) == 2
    assert main_train_critics([str(tmp_path / "ds"), "--device", "tpu"]) == 2
    assert main_train_critics([str(tmp_path / "ds"), "--seed", "-1"]) == 2  # not a build for seed -1
    reports = train_critics_on_trees(
        trees,
        tmp_path / "direct",
        policy_dir,
        TrainCriticsConfig(
            kinds=("value", "prm", "orm"), steps=2, value_steps=3, orm_steps=4, progress=False
        ),
    )
    assert reports["value"]["train_rows"] > 0
    steps = tuple(reports[k]["steps"] for k in ("value", "prm", "orm"))
    assert steps == (3, 2, 4), "value_steps and orm_steps are their critic's alone"


def test_critics_side_by_side_are_the_critics_one_after_another(policy_dir, tmp_path):
    """`train_critics(side_by_side=True)` trains the critic with the most steps in a second process
    (one thread; this process moves from one thread to two once it is done): the same weights and
    figures as one critic after another. Where this machine's matrix products give other floats on
    two threads than on one (the build then never goes side by side), the check runs in a fresh
    process with MKL's conditional numerical reproducibility on (`MKL_CBWR=COMPATIBLE`, which makes
    the two agree on the Intel Xeon measured), so the machinery is exercised there too."""
    from mcts.aside import threads_agree
    from mcts.embedded import TrainConfig

    if threads_agree(TrainConfig()):
        _side_by_side_matches_one_after_another(policy_dir, tmp_path)
        return
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import test_critics as t; "
        "from mcts.aside import threads_agree; from mcts.embedded import TrainConfig; "
        "threads_agree(TrainConfig()) or sys.exit(3); "
        "t._side_by_side_matches_one_after_another(Path(sys.argv[2]), Path(sys.argv[3]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(policy_dir), str(tmp_path)],
        env={**os.environ, "MKL_CBWR": "COMPATIBLE"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode == 3:
        pytest.skip("threads give other floats here, with MKL_CBWR=COMPATIBLE too: side by side is not used")
    assert done.returncode == 0, done.stderr[-4000:]


def _side_by_side_matches_one_after_another(policy_dir: Path, tmp_path: Path) -> None:
    from mcts.embedded import weights_hash

    labels = {}
    for i, kind in enumerate(("value", "prm", "orm")):
        labels[kind] = _toy_labels(40 + 8 * i)
        labels[kind].kind = kind
    cfg = TrainCriticsConfig(
        steps=5, value_steps=12, value_members=2, batch_size=8, val_fraction=0.25, progress=False
    )
    apart = train_critics(labels, tmp_path / "apart", policy_dir, cfg)
    together = train_critics(labels, tmp_path / "together", policy_dir, cfg, side_by_side=True)
    assert list(together) == ["value", "prm", "orm"] and together["value"]["steps"] == 12
    member = "value/member-1"  # the value function's second head trains in the same process as its first
    assert weights_hash(tmp_path / "together" / member) == weights_hash(tmp_path / "apart" / member)
    for kind in apart:
        assert weights_hash(tmp_path / "together" / kind) == weights_hash(tmp_path / "apart" / kind), kind
        drop = {"seconds"}
        assert {k: v for k, v in together[kind].items() if k not in drop} == {
            k: v for k, v in apart[kind].items() if k not in drop
        }, kind
    assert not list(tmp_path.glob(".together-*")), "no temporary directory left behind"


def test_default_critics_cache_is_rebuilt_only_when_stale(policy_dir, tmp_path):
    """`ensure_default_critics` reuses a build for the same policy and recipe, and rebuilds one made
    with another recipe or before critic.json carried the ORM's logit offset."""
    from rewards.critic_bootstrap import BootstrapCriticsConfig, ensure_default_critics

    tiny = BootstrapCriticsConfig(
        problems=6,
        search=SearchConfig(simulations=3, max_depth=3),
        trunk=None,  # the policy's own trunk (the critics' trunk has a test of its own)
        # the ORM alone: a random policy's steps end the solution at once (no value or PRM rows)
        train=TrainCriticsConfig(kinds=("orm",), steps=2, batch_size=8, val_fraction=0.0, progress=False),
    )
    root = tmp_path / "critics"

    def build(cfg):
        ensure_default_critics(0, policy_dir, progress=False, cfg=cfg, root=root)
        return (root / "bootstrap.json").stat().st_mtime_ns

    first = build(tiny)
    assert (root / "orm" / "critic.json").is_file()
    assert build(tiny) == first, "same policy and recipe: the cache is reused"
    meta_file = root / "orm" / "critic.json"
    meta = json.loads(meta_file.read_text())
    del meta["logit_offset"]
    meta_file.write_text(json.dumps(meta))
    second = build(tiny)
    assert second != first and "logit_offset" in json.loads(meta_file.read_text())
    other = BootstrapCriticsConfig(
        problems=5, search=tiny.search, trunk=None, train=tiny.train, max_step_tokens=tiny.max_step_tokens
    )
    assert build(other) != second, "another recipe rebuilds"


def test_default_critics_start_from_their_own_trunk(policy_dir, tmp_path):
    """With `trunk` set, the critics are fine-tuned from a model trained beside them
    (`critic-trunk/`), not from the policy; a changed trunk recipe rebuilds the trunk and the
    critics, the same one reuses both."""
    from mcts.embedded import TrainConfig, built_on, weights_hash
    from rewards.critic_bootstrap import (
        BootstrapCriticsConfig,
        ensure_critic_trunk,
        ensure_default_critics,
        side_by_side_ok,
    )

    def cfg(trunk_steps):
        trunk = TrainConfig(
            steps=trunk_steps, batch_size=8, d_model=32, n_layers=1, n_heads=2, eval_problems=0
        )
        orm_only = TrainCriticsConfig(kinds=("orm",), steps=2, batch_size=8, val_fraction=0.0, progress=False)
        return BootstrapCriticsConfig(
            problems=6, search=SearchConfig(simulations=3, max_depth=3), trunk=trunk, train=orm_only
        )

    root = tmp_path / "default" / "critics"
    trunk_dir = root.parent / "critic-trunk"

    def build(c):
        ensure_default_critics(0, policy_dir, progress=False, cfg=c, root=root)
        meta = json.loads((root / "orm" / "critic.json").read_text())
        return meta, (root / "bootstrap.json").stat().st_mtime_ns

    meta, first = build(cfg(3))
    alone = ensure_critic_trunk(0, cfg(3).trunk, tmp_path / "alone", progress=False)
    summary = json.loads((root / "bootstrap.json").read_text())
    assert summary["side_by_side"] == side_by_side_ok(cfg(3)), (
        "trunk and critics side by side where cores and floats allow"
    )
    assert summary["built_on"] == built_on(), "where the weights were built: they come back on that CPU only"
    assert weights_hash(trunk_dir) == weights_hash(alone), "built beside the search, the trunk is the same"
    trunk_report = json.loads((trunk_dir / "bootstrap.json").read_text())
    assert trunk_report["train"]["steps"] == 3 and trunk_report["steps_done"] == 3
    assert meta["base"] == str(trunk_dir) and meta["base_sha256"] == weights_hash(trunk_dir)
    assert meta["policy_sha256"] == weights_hash(policy_dir) != meta["base_sha256"]
    critic = load_critic(str(root / "orm"), "orm", TASK, "cpu", "float32")
    assert critic.model.config.num_hidden_layers == 1, "the trunk's shape (1 block), not the policy's (2)"
    assert build(cfg(3))[1] == first, "same trunk and recipe: both are reused"
    meta, second = build(cfg(4))
    assert second != first and json.loads((trunk_dir / "bootstrap.json").read_text())["steps_done"] == 4
    assert meta["base_sha256"] == weights_hash(trunk_dir)


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    try:
        with open(path) as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_killed_build_leaves_no_trainer_behind(policy_dir, tmp_path):
    """SIGKILL the process building the critics while its trunk trains in a second process: the
    second quits at its next step, removing its temporary directory, and no trunk is left as if
    finished."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mcts.embedded import TrainConfig
    from rewards.critic_bootstrap import BootstrapCriticsConfig, side_by_side_ok

    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("needs Linux's /proc to find the build's second process")
    trunk = TrainConfig(steps=20000, batch_size=2, d_model=32, n_layers=1, n_heads=2, eval_problems=0)
    if not side_by_side_ok(BootstrapCriticsConfig(trunk=trunk)):
        pytest.skip("one core, or kernels that give other floats on two threads: no second process here")
    root = tmp_path / "default" / "critics"
    script = f"""
from critics.train import TrainCriticsConfig
from mcts.base import SearchConfig
from mcts.embedded import TrainConfig
from rewards.critic_bootstrap import BootstrapCriticsConfig, ensure_default_critics
trunk = TrainConfig(steps=20000, batch_size=2, d_model=32, n_layers=1, n_heads=2, eval_problems=0)
train = TrainCriticsConfig(kinds=("orm",), steps=2, batch_size=8, val_fraction=0.0, progress=False)
cfg = BootstrapCriticsConfig(problems=6, search=SearchConfig(simulations=3, max_depth=3), trunk=trunk, train=train)
ensure_default_critics(0, {str(policy_dir)!r}, progress=False, cfg=cfg, root={str(root)!r})
"""
    build = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 120
        while not list(root.parent.glob(".critic-trunk-tmp-*")):  # the trunk is training
            assert build.poll() is None and time.monotonic() < deadline, "the trunk never started"
            time.sleep(0.2)
        helpers = [c for c in _children(build.pid) if "spawn_main" in _cmdline(c)]  # not the resource tracker
        assert len(helpers) == 1, "the trunk trains in a second process"
    finally:
        build.send_signal(signal.SIGKILL)
        build.wait()
    deadline = time.monotonic() + 30
    try:
        while any(_running(c) for c in helpers):
            assert time.monotonic() < deadline, "the trunk's process outlived the build by 30 s"
            time.sleep(0.2)
    finally:
        for c in helpers:  # a failed check leaves no trainer running either
            if _running(c) and "spawn_main" in _cmdline(c):
                os.kill(c, signal.SIGKILL)
    assert not list(root.parent.glob(".critic-trunk-tmp-*")), "its temporary directory went with it"
    assert not (root.parent / "critic-trunk").exists(), "no trunk is left as if finished"


def test_value_and_prm_share_one_trunk_pass(critic_dirs):
    """Critics fine-tuned from one frozen trunk: the PRM's pass also serves the value function (its
    top block and head run on the PRM's input to the top block), with bit-identical scores; a value
    function whose lower blocks differ is scored on its own."""
    from critics.models import shares_trunk

    value, prm = _critic(critic_dirs, "value", batch_size=3), _critic(critic_dirs, "prm", batch_size=3)
    problems = [make_problem(f"p{i}", [3, 7, 9, 4], 24) for i in range(7)]
    steps = [["7*4=28"], ["7*4=28", "28-4=24"], [], ["9-3=6"], ["3+7=10", "10+9=19"], ["9*4=36"], ["1+1=2"]]
    shared = CriticSet(value=value, prm=prm)
    assert shared.shared_trunk
    together = shared.score_nodes(problems, steps)
    before = (value.forward_calls, prm.forward_calls)
    shared.shared_trunk = False
    apart = shared.score_nodes(problems, steps)
    assert np.array_equal(together["value"], apart["value"]) and np.array_equal(together["prm"], apart["prm"])
    assert (value.forward_calls - before[0], prm.forward_calls - before[1]) == (3, 3)  # 7 items, chunks of 3
    with torch.no_grad():
        value.model.model.layers[0].mlp.down_proj.weight.add_(1e-3)
    assert not shares_trunk(prm, value) and not CriticSet(value=value, prm=prm).shared_trunk
