"""Embedded default policy: reproducible tiny bootstrap, loadable, atomic, cached."""

from __future__ import annotations

import json

import pytest
import torch

import mcts.embedded as embedded
from mcts.embedded import TrainConfig, bootstrap_policy, default_policy_dir, training_texts, weights_hash
from mcts.policy import Policy, PolicyConfig
from mcts.tasks.countdown import CountdownTask, generate_problems

TINY = TrainConfig(
    steps=30, batch_size=16, d_model=32, n_layers=1, n_heads=2, eval_problems=10, eval_samples=2
)


def test_tiny_bootstrap_is_reproducible_and_loads(tmp_path):
    a = bootstrap_policy(seed=3, train=TINY, root=tmp_path / "a", progress=False)
    b = bootstrap_policy(seed=3, train=TINY, root=tmp_path / "b", progress=False)
    c = bootstrap_policy(seed=4, train=TINY, root=tmp_path / "c", progress=False)
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    report = json.loads((a / "bootstrap.json").read_text())
    assert report["steps_done"] == 30 and not report["time_cap_hit"]
    assert report["weights_sha256"] == weights_hash(a)
    assert {"greedy_success", "pass@2", "params", "wall_seconds", "difficulty"} <= report.keys()
    # where it was built: the same seed gives these weights on this kind of CPU only
    assert report["built_on"] == embedded.built_on()
    assert report["built_on"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["built_on"]["cpu"] not in ("", "unknown")
    policy = Policy.load(PolicyConfig(path=str(a), device="cpu", max_step_tokens=8))
    task = CountdownTask()
    [opts] = policy.propose([task.prompt(generate_problems(1, 0)[0])], [4], seed=0)
    assert len(opts) == 4
    # Cached: a second call returns at once without retraining.
    assert bootstrap_policy(seed=3, train=TINY, root=tmp_path / "a", progress=False) == a
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["policy", "trained-on"]
    [kept] = (tmp_path / "a" / "trained-on").glob("*.json")  # the build keeps what `trained_on` asks
    problems = embedded.training_problems(30 * 16, 3, embedded.default_difficulty())
    assert set(json.loads(kept.read_text())["keys"]) == {embedded._key(p) for p in problems}


def test_killed_bootstrap_leaves_no_model(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C during evaluation

    monkeypatch.setattr(embedded, "evaluate_policy", boom)
    with pytest.raises(KeyboardInterrupt):
        bootstrap_policy(seed=0, train=TINY, root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == [], "neither a final nor a temporary directory may remain"


def test_training_data_is_held_out_and_cache_dir(monkeypatch, tmp_path):
    diff = embedded.default_difficulty()
    held = {
        (tuple(sorted(p.meta["numbers"])), p.meta["target"])
        for p in generate_problems(embedded.EVAL_EXCLUDE, embedded.EVAL_SEED, diff)
    }
    pairs = training_texts(2000, 0, diff)
    task = CountdownTask()
    for prompt, solution in pairs[:300]:
        nums, target = prompt.strip().split(" -> ")
        assert (tuple(sorted(map(int, nums.split()))), int(target)) not in held
        assert solution.endswith("\n")
    monkeypatch.setenv("ARBORIST_CACHE", str(tmp_path))
    assert default_policy_dir(5) == tmp_path / "default-v1-seed5" / "policy"
    assert task.prompt(generate_problems(1, 0, diff)[0]).endswith("\n")


def test_trained_on_keeps_its_keys_once_drawn(monkeypatch, tmp_path):
    """The content keys of a recipe's training set are drawn once and kept in the cache; a kept file
    that is unreadable, of another recipe or of another shape is drawn again, never trusted."""
    monkeypatch.setenv("ARBORIST_CACHE", str(tmp_path))
    small = TrainConfig(steps=3, batch_size=16)
    keys = embedded.trained_on(0, small)
    assert keys == {
        embedded._key(p) for p in embedded.training_problems(48, 0, embedded.default_difficulty())
    }
    [kept] = (tmp_path / "default-v1-seed0" / "trained-on").glob("*.json")
    assert set(json.loads(kept.read_text())["keys"]) == keys
    assert not list(kept.parent.glob(".*")), "no temporary file left"
    assert embedded.trained_on(0, TrainConfig(steps=4, batch_size=16)) > keys, "another recipe, its own set"
    for broken in ("null", "[]", "{", json.dumps({"recipe": {}, "keys": ["x"]}), json.dumps({"keys": 3})):
        kept.write_text(broken)
        assert embedded.trained_on(0, small) == keys, broken
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "keys": ["planted"]}))
    assert embedded.trained_on(0, small) == {"planted"}, "a kept file of this recipe is what is read"
