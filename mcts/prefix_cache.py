"""A bounded cache of prompt KV states across policy calls, keyed by token ids.

A search asks the policy about prompts that extend each other: a child's prompt is its parent's
plus one step, a node's rollouts start from the prompt its options were sampled from, and the next
round samples options from the prompt its rollouts just read. Without a cache every call prefills
every prompt from its first token. With it, `mcts.decode` looks up the longest prompt it already
prefilled that is a token prefix of the new one, starts the row from that prompt's keys and
values, and runs only the new tokens; each prompt it prefills is stored for the calls after.

Matching is on token ids, not text, so a tokenizer that merges across a step boundary simply
misses (it never conditions on tokens the prompt does not have). An entry is the KV states of one
prompt as two tensors, keys and values [layers, heads, length, head_dim] (one copy in and one slice
out per prompt, not one per layer; keys and values may differ in head_dim, as in multi-head latent
attention); the least recently used go first once `max_bytes` is passed. The cache is emptied at
the start of each search batch (`Policy.reset_prefix_cache`), so what a batch computes never depends
on which batches a worker ran before.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_END = -1  # trie key marking "a stored prompt ends here" (token ids are >= 0)


class PrefixCache:
    """Prompt KV states by token ids: `longest` match, `put`, LRU eviction past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._trie: dict = {}
        self._entries: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens served from the cache (not run through the model)
        self.lookups = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._trie.clear()
        self._entries.clear()
        self.bytes = 0

    def longest(self, ids: list[int], limit: int) -> tuple[int, tuple[int, ...] | None]:
        """(length, key) of the longest stored prompt that is a prefix of `ids` and at most
        `limit` tokens long; (0, None) when there is none."""
        self.lookups += 1
        node, best, best_len = self._trie, None, 0
        for i, t in enumerate(ids[:limit]):
            node = node.get(t)
            if node is None:
                break
            if _END in node:
                best, best_len = node[_END], i + 1
        else:
            # `ids` itself may be stored (a node's options after its rollouts read its prompt):
            # its first `limit` positions serve
            below = node.get(ids[limit]) if len(ids) > limit else None
            if below is not None and _END in below:
                best, best_len = below[_END], limit
        if best is not None:
            self._entries.move_to_end(best)
        return best_len, best

    def states(self, key: tuple[int, ...], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of a stored prompt: keys and values [layers, H, length, D]
        (views)."""
        keys, values, _ = self._entries[key]
        return keys[:, :, :length], values[:, :, :length]

    def touch(self, ids: list[int]) -> bool:
        """Whether the prompt is stored; if it is, it becomes the most recently used."""
        key = tuple(ids)
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def put(self, ids: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prompt's states (keys and values [layers, H, len(ids), D]; copied, so a view does
        not keep the tensor it was cut from alive); evict the oldest past the bound."""
        if self.touch(ids):
            return
        key = tuple(ids)
        assert keys.shape[2] == values.shape[2] == len(key), (
            f"states of {keys.shape[2]} positions for {len(key)} tokens"
        )
        size = sum(t.numel() * t.element_size() for t in (keys, values))
        if size > self.max_bytes:
            return
        node = self._trie
        for t in key:
            node = node.setdefault(t, {})
        node[_END] = key
        copy = torch.contiguous_format
        self._entries[key] = (keys.clone(memory_format=copy), values.clone(memory_format=copy), size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._evict(next(iter(self._entries)))

    def _evict(self, key: tuple[int, ...]) -> None:
        _, _, size = self._entries.pop(key)
        self.bytes -= size
        self.evictions += 1
        path = [self._trie]
        for t in key:
            path.append(path[-1][t])
        del path[-1][_END]
        # prune the branch nodes nothing passes through any more
        for depth in range(len(key), 0, -1):
            if path[depth]:
                break
            del path[depth - 1][key[depth - 1]]
