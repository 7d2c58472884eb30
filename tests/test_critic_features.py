"""The critics' feature cache (`critics.features`): the trained top blocks run on stored inputs of
the frozen trunk and give the whole model's logits; training with it follows training without it;
it stands aside where it does not apply."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from _tiny_models import save_tiny_gpt2, save_tiny_llama

from critics.features import TopBlocks
from critics.labels import Labels
from critics.models import StepEncoder, init_from_policy, pad_right, step_logits
from critics.train import TrainCriticsConfig, _train_top_layers, train_one


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base"), n_layers=3)


def _labels(n: int, kind: str) -> Labels:
    """Rows of 1-3 steps of different lengths; a step with '+' is sound, one with '-' is not."""
    rng = np.random.default_rng(1)
    out = Labels(kind)
    for i in range(n):
        steps, hard = [], []
        for _ in range(1 + i % 3):
            a, b = (int(x) for x in rng.integers(1, 60, 2))
            good = bool(rng.integers(0, 2))
            steps.append(f"{a}+{b}={a + b}" if good else f"{max(a, b)}-{min(a, b)}={abs(a - b)}")
            hard.append(good)
        if kind != "prm":
            hard = [all(hard)]
        out.problem_ids.append(f"t{i}")
        out.keys.append(f"t{i}")
        out.prompts.append(f"{i % 7 + 1} {i % 5 + 2} -> {i % 40}\n")
        out.steps.append(steps)
        out.soft.append([float(h) for h in hard])
        out.hard.append(hard)
        out.nodes.append([(f"t{i}", j) for j in range(len(hard))])
    return out


def _batch(tok, labels: Labels, kind: str, rows: list[int]):
    ids, ends = StepEncoder(tok, "\n").encode(labels.prompts, labels.steps)
    x, mask = pad_right([ids[i] for i in rows], tok.pad_token_id)
    k = max(len(ends[i]) for i in rows) if kind == "prm" else 1
    at = [(ends[i] if kind == "prm" else [len(ids[i]) - 1]) for i in rows]
    pos = torch.tensor([a + [a[-1]] * (k - len(a)) for a in at])
    return ids, x, mask, pos


@pytest.mark.parametrize("kind", ["value", "prm", "orm"])
def test_the_cache_gives_the_whole_models_logits(base_dir, kind):
    model, tok = init_from_policy(base_dir, kind, seed=0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    _train_top_layers(model, 1)
    model.eval()
    labels = _labels(40, kind)
    first = list(range(8))
    ids, *check = _batch(tok, labels, kind, first)
    top = TopBlocks.build(model, kind, ids, 1, tok.pad_token_id, "cpu", 64.0, (first, *check))
    assert top is not None and top.first == 2 and len(top.top) == 1
    rows = [3, 17, 25, 38, 11]  # other companions, another width than the cache was filled with
    _, x, mask, pos = _batch(tok, labels, kind, rows)
    with torch.no_grad():
        full = step_logits(model, kind, x, mask, pos)
        cached = top.logits(rows, mask, pos)
    assert full.shape == cached.shape == (5, pos.shape[1])
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert model.model.layers[0] is not top.top[0] and len(model.model.layers) == 3  # put back


def test_the_cache_stands_aside_where_it_does_not_apply(base_dir, tmp_path):
    labels = _labels(16, "value")
    for layers, budget in ((-1, 64.0), (0, 64.0), (3, 64.0), (1, 1e-4)):  # nothing frozen / too big
        model, tok = init_from_policy(base_dir, "value", seed=0)
        ids, *check = _batch(tok, labels, "value", [0, 1])
        assert (
            TopBlocks.build(model, "value", ids, layers, tok.pad_token_id, "cpu", budget, ([0, 1], *check))
            is None
        )
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2", n_layers=3)  # its stack is `transformer.h`
    model, tok = init_from_policy(gpt2, "value", seed=0)
    ids, *check = _batch(tok, labels, "value", [0, 1])
    assert TopBlocks.build(model, "value", ids, 1, tok.pad_token_id, "cpu", 64.0, ([0, 1], *check)) is None


@pytest.mark.parametrize("kind", ["value", "prm"])
def test_training_with_the_cache_follows_training_without(base_dir, kind):
    """Same steps, same batches, same dropout draws (the PRM's classifier has dropout): the weights
    of the two trainings differ only by float rounding."""
    labels = _labels(48, kind)
    runs = {}
    for mb in (64.0, 0.0):
        cfg = TrainCriticsConfig(
            steps=12, batch_size=8, lr=3e-3, feature_cache_mb=mb, val_fraction=0.0, progress=False
        )
        model, _, report = train_one(kind, labels, Labels(kind), base_dir, "\n", cfg)
        runs[mb] = (model.state_dict(), report)
    (cached, with_cache), (plain, without) = runs[64.0], runs[0.0]
    assert with_cache["feature_cache"] and not without["feature_cache"]
    assert abs(with_cache["final_loss"] - without["final_loss"]) < 1e-4
    start = init_from_policy(base_dir, kind, seed=0)[0].state_dict()
    moved = [k for k in plain if not torch.equal(plain[k], start[k])]
    assert any(k.startswith("model.layers.2.") for k in moved) and "score.weight" in moved
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-5)


def test_a_later_head_reuses_the_first_heads_cache_and_trains_the_same_weights(base_dir, monkeypatch):
    """An ensemble's heads share one fill (`train_one(features=...)`): the stored inputs are the
    ones a fill of the head's own gives, so its weights are equal bit for bit; rows that differ
    get a fill of their own."""
    labels = _labels(48, "value")
    cfg = TrainCriticsConfig(steps=12, batch_size=8, lr=3e-3, val_fraction=0.0, progress=False, seed=1)
    fills, fill = [], TopBlocks._fill
    monkeypatch.setattr(TopBlocks, "_fill", staticmethod(lambda *a, **k: fills.append(1) or fill(*a, **k)))
    shared: list = []
    train_one("value", labels, Labels("value"), base_dir, "\n", replace(cfg, seed=0), features=shared)
    assert len(shared) == 1
    reused, _, report = train_one("value", labels, Labels("value"), base_dir, "\n", cfg, features=shared)
    own, _, _ = train_one("value", labels, Labels("value"), base_dir, "\n", cfg)
    assert report["feature_cache"] and len(shared) == 1 and len(fills) == 2  # the first head's, and `own`'s
    a, b = reused.state_dict(), own.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)

    model, tok = init_from_policy(base_dir, "value", seed=0)
    _train_top_layers(model, 1)
    other = _labels(20, "value")
    ids, *check = _batch(tok, other, "value", [0, 1])
    fresh = TopBlocks.build(
        model, "value", ids, 1, tok.pad_token_id, "cpu", 64.0, ([0, 1], *check), shared[0]
    )
    assert (
        fresh is not None
        and fresh.flat is not shared[0].flat
        and fresh.flat.shape[0] < shared[0].flat.shape[0]
    )
