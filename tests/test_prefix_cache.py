"""The prompt KV cache across policy calls: longest token-prefix match, LRU bound, and exactness
(the same seed samples the same options and rollouts with and without it)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import save_tiny_gpt2, save_tiny_llama

from mcts.policy import Policy, PolicyConfig
from mcts.prefix_cache import PrefixCache

PROMPTS = ["3 7 9 4 -> 24\n", "1 2 -> 3\n", "12 5 8 9 -> 100\n"]


def _states(n: int, fill: float = 0.0):
    """One layer's keys and values for n positions (2 heads, 4 dims: 32 bytes a position each)."""
    return torch.full((2, 2, n, 4), fill)


def test_longest_match_lru_and_pruning():
    cache = PrefixCache(max_bytes=64 * 10)  # 64 bytes a position: room for 10 positions
    cache.put([1, 2], _states(2, 1.0))
    cache.put([1, 2, 3, 4], _states(4, 2.0))
    assert cache.longest([1, 2, 3, 4, 5], limit=5) == (4, (1, 2, 3, 4))
    assert cache.longest([1, 2, 3, 9], limit=3) == (2, (1, 2)), "only a stored prompt's own prefix"
    assert cache.longest([1, 2, 3, 4], limit=3) == (3, (1, 2, 3, 4)), "a stored prompt serves its repeat"
    assert cache.longest([1, 3], limit=2) == (0, None)
    states = cache.states((1, 2, 3, 4), 3)
    assert states.shape == (2, 2, 3, 4) and float(states[1, 0, 0, 0]) == 2.0
    cache.longest([1, 2, 9], limit=3)  # touches (1, 2): (1, 2, 3, 4) is now the oldest
    cache.put([7, 8, 9, 10, 11], _states(5))  # 2 + 4 + 5 = 11 positions > 10: the oldest goes
    assert len(cache) == 2 and cache.evictions == 1 and cache.bytes == 64 * 7
    assert cache.longest([1, 2, 3, 4, 5], limit=5) == (2, (1, 2))
    assert 3 not in cache._trie[1][2], "the evicted prompt's own branch is pruned"
    cache.put(list(range(20)), _states(20))  # bigger than the whole bound: not stored
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.longest([1, 2, 3], 3) == (0, None)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def policy_dir(request, tmp_path_factory):
    save = save_tiny_llama if request.param == "llama" else save_tiny_gpt2
    return save(tmp_path_factory.mktemp(request.param))


def _walk(policy: Policy):
    """Three depths of a search's calls: options of each prompt, rollouts of the children, the
    children's options next (each child's prompt extends its parent's)."""
    policy.reset_prefix_cache()
    positions, prompts, out = policy.positions_run, PROMPTS, []
    for depth in range(3):
        options = policy.propose(prompts, [3] * len(prompts), seed=depth)
        children = [p + o.text + "\n" for p, opts in zip(prompts, options, strict=True) for o in opts[:2]]
        rollouts = policy.rollout(children, seed=10 + depth)
        out.append(([[o.token_ids for o in opts] for opts in options], rollouts))
        out.append([o.logprob for opts in options for o in opts])
        prompts = children[:4]
    return out, policy.positions_run - positions


def test_prefix_cache_samples_what_whole_prompts_sample(policy_dir):
    cfg = dict(path=str(policy_dir), device="cpu", max_step_tokens=6, max_rollout_tokens=12)
    cached = Policy.load(PolicyConfig(**cfg))
    plain = Policy.load(PolicyConfig(**cfg, prefix_cache_mb=0))
    assert plain.prefix_cache is None
    (got, positions), (want, plain_positions) = _walk(cached), _walk(plain)
    for g, w in zip(got[0::2], want[0::2], strict=True):
        assert g == w, "the same seed must draw the same options and rollouts"
    for g, w in zip(got[1::2], want[1::2], strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert cached.prefix_cache.hit_tokens > 0
    # entries are copies: the memory held is what the bound counts, not the batch tensors they came from
    entries = cached.prefix_cache._entries.values()
    held = sum(states.untyped_storage().nbytes() for states, _ in entries)
    assert held == cached.prefix_cache.bytes > 0
    assert positions < 0.8 * plain_positions, (
        f"{positions} positions run with the cache, {plain_positions} without"
    )


def test_the_cache_stays_off_where_a_layer_sees_a_window():
    """A sliding window is counted in cache columns, and a stitched prompt has padding inside it."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from mcts.policy import _sliding_window

    assert not _sliding_window(LlamaConfig()) and not _sliding_window(Qwen2Config())
    assert not _sliding_window(MistralConfig(sliding_window=None))
    assert _sliding_window(MistralConfig(sliding_window=4096))
    assert _sliding_window(Qwen2Config(use_sliding_window=True)) and _sliding_window(Gemma2Config())


def test_prefix_cache_with_merges_across_step_boundaries(tmp_path):
    """A BPE tokenizer whose merges cross step ends: a child's prompt need not extend its parent's
    tokens, so some lookups find a shorter prefix or none; samples stay what whole prompts sample."""
    from _tiny_models import save_tiny_llama_bpe

    path = save_tiny_llama_bpe(tmp_path / "bpe")
    cfg = dict(path=str(path), device="cpu", max_step_tokens=6, max_rollout_tokens=12)
    cached, plain = Policy.load(PolicyConfig(**cfg)), Policy.load(PolicyConfig(**cfg, prefix_cache_mb=0))
    tok = cached.tokenizer
    # a parent and a child whose tokens do not extend the parent's ("4\n" + "1" merges to "4\n1")
    parent, child = PROMPTS[0], PROMPTS[0] + "1+2=3\n"
    assert tok(child)["input_ids"][: len(tok(parent)["input_ids"])] != tok(parent)["input_ids"]
    for policy in (cached, plain):
        policy.reset_prefix_cache()
    hit = cached.prefix_cache.hit_tokens
    assert [cached.rollout([p], seed=3) for p in (parent, child)] == [
        plain.rollout([p], seed=3) for p in (parent, child)
    ]
    assert cached.prefix_cache.hit_tokens - hit < len(tok(parent)["input_ids"]) - 1, "a shorter match or none"
    (got, _), (want, _) = _walk(cached), _walk(plain)
    for g, w in zip(got[0::2], want[0::2], strict=True):
        assert g == w
    for g, w in zip(got[1::2], want[1::2], strict=True):
        assert g == pytest.approx(w, abs=1e-4)
    assert cached.prefix_cache.hit_tokens > 0


def test_throughput_benchmark_on_a_small_search(solving_policy):
    """`benchmarks.throughput.measure` end to end on a tiny trained policy: every figure is there, and
    its exactness checks hold (the prompt cache and batches side by side grow the same trees)."""
    from benchmarks.throughput import YARDSTICK_RUNS, measure

    out = measure("tiny", solving_policy, None, problems=4, sims=4, one_leaf=1, device="cpu")
    assert out["same_trees_uncached"] and out["same_steps_side_by_side"]
    assert all(1 <= runs <= YARDSTICK_RUNS for runs in out["yardstick_runs"])
    assert min(out["tokens_per_s_plain"], out["tokens_per_s_search"], out["nodes_per_s_one_leaf"]) > 0
    assert 0 < out["model_share"] <= 1
    assert out["positions_per_token"] <= out["positions_per_token_uncached"]
