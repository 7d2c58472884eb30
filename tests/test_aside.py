"""Two cores side by side (`mcts.aside`): a training step may change its thread count mid-run
without changing the weights (where this machine's kernels agree), and a second process quits on
request or with its parent, leaving no temporary directory."""

from __future__ import annotations

import time

import pytest
import torch

from critics.train import TrainCriticsConfig, train_one
from mcts.aside import Aside, threads_agree, usable_cores
from mcts.embedded import TrainConfig, default_difficulty, train_policy, weights_hash

TINY = TrainConfig(steps=12, batch_size=8, d_model=32, n_layers=2, n_heads=2, eval_problems=0, threads=2)


@pytest.fixture(scope="module")
def agree():
    if usable_cores() < 2 or not threads_agree(TINY):
        pytest.skip("needs two cores whose kernels give one thread's floats on two: side by side is not used")


def _switch_at(step_at: int, calls: list[int]):
    """A step hook: one thread before `step_at`, two from it (as the trunk's at its handover)."""

    def hook(step: int) -> None:
        want = 1 if step < step_at else 2
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
            calls.append(want)

    return hook


def test_the_trunk_may_move_from_one_thread_to_two_midway(agree, tmp_path):
    calls: list[int] = []
    train_policy(tmp_path / "two", 0, TINY, default_difficulty(), progress=False)
    train_policy(
        tmp_path / "moved", 0, TINY, default_difficulty(), progress=False, step_hook=_switch_at(6, calls)
    )
    assert calls == [1, 2], "one thread for the first six steps, two after"
    assert weights_hash(tmp_path / "moved") == weights_hash(tmp_path / "two")


def test_a_critic_may_move_from_one_thread_to_two_midway(agree, tmp_path):
    from _tiny_models import save_tiny_llama
    from test_critics import _toy_labels  # tests/ is on sys.path under pytest

    base = save_tiny_llama(tmp_path / "policy")
    labels = _toy_labels(48)
    labels.kind = "prm"
    cfg = TrainCriticsConfig(steps=10, batch_size=8, val_fraction=0.0, progress=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ref, _, a = train_one("prm", labels, _toy_labels(8), base, "\n", cfg)
        calls: list[int] = []
        moved, _, b = train_one("prm", labels, _toy_labels(8), base, "\n", cfg, _switch_at(5, calls))
    finally:
        torch.set_num_threads(before)
    assert calls == [1, 2]
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), moved.parameters(), strict=True))
    assert a["final_loss"] == b["final_loss"]


def _long_trunk(root, step_hook=None):
    """A tiny trunk of many steps (what `rewards.critic_bootstrap` runs aside, made long)."""
    from mcts.embedded import bootstrap_policy

    train = TrainConfig(steps=20000, batch_size=2, d_model=32, n_layers=1, n_heads=2, eval_problems=0)
    bootstrap_policy(0, progress=False, train=train, root=root, name="critic-trunk", step_hook=step_hook)


def _fails(step_hook=None):
    raise ValueError("this build step fails")


def test_a_second_process_stops_on_request_and_cleans_up(tmp_path):
    aside = Aside(_long_trunk, (tmp_path,), "test-trunk")
    try:
        deadline = time.monotonic() + 120
        while aside.steps_done < 5:  # training: its temporary directory exists
            assert aside.alive() and time.monotonic() < deadline, "the trunk never started"
            time.sleep(0.2)
        assert list(tmp_path.glob(".critic-trunk-tmp-*"))
        t0 = time.monotonic()
        aside.stop()
        assert time.monotonic() - t0 < 10 and aside.process.exitcode == 1, "quit at its next step"
    finally:
        aside.stop(timeout_s=0)
    assert list(tmp_path.iterdir()) == [], "no temporary directory and no trunk left behind"


def test_a_failed_second_process_is_reported():
    aside = Aside(_fails, (), "test-fails")
    assert aside.wait() is False and aside.process.exitcode == 1
