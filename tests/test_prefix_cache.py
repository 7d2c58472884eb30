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
    return torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), fill)


def test_longest_match_lru_and_pruning():
    cache = PrefixCache(max_bytes=64 * 10)  # 64 bytes a position: room for 10 positions
    cache.put([1, 2], *_states(2, 1.0))
    cache.put([1, 2, 3, 4], *_states(4, 2.0))
    assert cache.longest([1, 2, 3, 4, 5], limit=5) == (4, (1, 2, 3, 4))
    assert cache.longest([1, 2, 3, 9], limit=3) == (2, (1, 2)), "only a stored prompt's own prefix"
    assert cache.longest([1, 2, 3, 4], limit=3) == (3, (1, 2, 3, 4)), "a stored prompt serves its repeat"
    assert cache.longest([1, 3], limit=2) == (0, None)
    keys, values = cache.states((1, 2, 3, 4), 3)
    assert keys.shape == values.shape == (1, 2, 3, 4) and float(values[0, 0, 0, 0]) == 2.0
    cache.longest([1, 2, 9], limit=3)  # touches (1, 2): (1, 2, 3, 4) is now the oldest
    cache.put([7, 8, 9, 10, 11], *_states(5))  # 2 + 4 + 5 = 11 positions > 10: the oldest goes
    assert len(cache) == 2 and cache.evictions == 1 and cache.bytes == 64 * 7
    assert cache.longest([1, 2, 3, 4, 5], limit=5) == (2, (1, 2))
    assert 3 not in cache._trie[1][2], "the evicted prompt's own branch is pruned"
    cache.put(list(range(20)), *_states(20))  # bigger than the whole bound: not stored
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
    held = sum(t.untyped_storage().nbytes() for keys, values, _ in entries for t in (keys, values))
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


def test_deferred_row_selection_keeps_what_dynamic_layers_keep():
    """`mcts.decode.select_rows` defers a selection to the layer's next update and makes both in one
    copy: random selections (repeats, several before one update) and updates leave the same states as
    transformers' own `DynamicLayer` with `batch_select_indices` (which `_SelectingLayer` stands in for)."""
    from transformers import DynamicCache

    from mcts.decode import select_rows

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        ours, theirs = DynamicCache(), DynamicCache()
        rows = 1 + trial % 5
        for step in range(6):
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen)) if step else 0):
                keep = torch.randint(0, rows, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen)
                select_rows(ours, keep)  # two before one update: they compose
                theirs.batch_select_indices(keep)
                rows = keep.numel()
            new = int(torch.randint(1, 4, (1,), generator=gen))
            k, v = torch.randn(rows, 2, new, 4, generator=gen), torch.randn(rows, 2, new, 3, generator=gen)
            got, want = ours.update(k, v, 0), theirs.update(k, v, 0)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_latent_attention_keys_and_values_of_two_shapes():
    """Multi-head latent attention (DeepSeek-V3) caches keys and values of different head sizes: the
    prompt cache stores them apart, and decoding with it is what decoding without it is."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from mcts.decode import decode

    cfg = DeepseekV3Config(
        vocab_size=40, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg).eval()
    root = [1, 5, 6, 7, 8, 9]
    calls = ([root], [root + [10, 11], root + [12], [1, 4, 4]])

    def run(cache):
        out = []
        for i, prompts in enumerate(calls):
            rows = torch.arange(len(prompts)).repeat_interleave(2)
            groups = [(rows.numel(), torch.Generator().manual_seed(i))]
            tokens, logprobs, _, _ = decode(
                model, prompts, rows, 5, sample=True, eos_ids=torch.tensor([2]), pad_id=0,
                prefix_cache=cache, groups=groups,
            )  # fmt: skip
            out.append((tokens.tolist(), logprobs))
        return out

    cache = PrefixCache(max_bytes=1 << 20)
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(run(cache), run(None), strict=True):
        assert tokens == want_tokens
        assert torch.allclose(logprobs, want_logprobs, atol=1e-5)
    assert cache.hit_tokens > 0 and len(cache) == 4
