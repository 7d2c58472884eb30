"""The policy's decode loop: one prefill per distinct prompt, rows that finish leave the batch.

`transformers`' `generate` runs every row until the last one stops: in the search's rollouts most
rows end well before the token cap and keep decoding padding, and the k rows sampling options of one
node each prefill the same prompt. This loop, for any causal LM of transformers 5 (one forward with
a `DynamicCache`):

- prefills each distinct prompt once and copies its KV cache and last logits to the rows that share
  it (the copy made with the cache's next update, which copies it anyway); with a `PrefixCache`
  (`mcts.prefix_cache`) a prompt runs only the tokens past the longest prompt an earlier call
  prefilled (a child's prompt past its parent's, a rollout's past the prompt its option was sampled
  from). The prefill computes the last position's logits only, where the model allows it
  (`logits_to_keep`): a real vocabulary times every prompt position is gigabytes;
- samples every row's next token the way `generate` does (temperature, top-k, top-p warpers, then
  `torch.multinomial` over the rows: a finished row keeps its place in that draw, so a row's random
  numbers do not depend on when the others finished, and the same seed draws what `generate` draws,
  held by a test). The rows may come in groups, each with its own generator and its own draw (the
  search's concurrent batches share a call: each draws what it would draw alone);
- stops a row at EOS or at a stop token (a token whose text holds the stop string; a stop string
  longer than one character is also looked for in each row's last tokens), and drops finished rows
  from the forward pass and the cache once a quarter of the batch has finished (again in the next
  update's copy);
- gathers each kept token's log-probability at temperature 1 as it goes.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from mcts.prefix_cache import PrefixCache

DROP_SHARE = 0.25  # finished share of the forward batch at which its rows are dropped


def stop_token_ids(tokenizer, stop: str) -> torch.Tensor:
    """Ids of every token whose text contains `stop` (emitting one completes the stop)."""
    vocab = range(len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in vocab], skip_special_tokens=True)
    return torch.tensor([i for i, t in zip(vocab, texts, strict=True) if stop in t], dtype=torch.long)


def _warpers(temperature: float, top_k: int, top_p: float) -> list:
    """`generate`'s sampling warpers, in its order, for these settings."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return out


@functools.cache
def _forward_params(model_class) -> frozenset[str]:
    """Names the model's forward takes (the cache's keyword differs across models; `logits_to_keep`
    is not everywhere): looked up once per class, not on every call of the hot path."""
    return frozenset(inspect.signature(model_class.forward).parameters)


def _cache_keyword(model) -> str:
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def _cache(past=None):
    """A `DynamicCache`, filled with `past` (per layer keys and values [B, H, T, D]) when given."""
    return DynamicCache(ddp_cache_data=past) if past else DynamicCache()


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [n, longest]: every sequence right-aligned, padding on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _past_states(prefix_cache: PrefixCache, hits, width: int, device):
    """Per layer (keys, values) [n, H, width, D] of the cached prompt prefixes, each row's right-
    aligned (zeros where a row has fewer cached positions), and the mask [n, width] of them."""
    found = [(i, h, prefix_cache.states(key, h)) for i, (h, key) in enumerate(hits) if h]
    first_k, first_v = found[0][2]
    buf_k = first_k.new_zeros((len(hits), *first_k.shape[:2], width, first_k.shape[3]))
    buf_v = first_v.new_zeros((len(hits), *first_v.shape[:2], width, first_v.shape[3]))
    mask = torch.zeros((len(hits), width), dtype=torch.long)
    for i, h, (keys, values) in found:
        buf_k[i, :, :, width - h :] = keys
        buf_v[i, :, :, width - h :] = values
        mask[i, width - h :] = 1
    return [(buf_k[:, j], buf_v[:, j]) for j in range(first_k.shape[0])], mask.to(device)


def _gather_append(old: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """cat([old[rows], new], dim=-2) as one copy: the gather writes straight into the result."""
    length = old.shape[-2]
    out = old.new_empty((rows.numel(), old.shape[1], length + new.shape[-2], old.shape[-1]))
    torch.index_select(old, 0, rows, out=out[:, :, :length])
    out[:, :, length:] = new
    return out


class _SelectingLayer(DynamicLayer):
    """A `DynamicLayer` whose row selection waits for its next `update`.

    Every update of a `DynamicLayer` copies its whole cache (`torch.cat` with the new states), and
    selecting rows copies it once more; here the two are one copy (the gather writes into the
    grown tensor). `DynamicCache.batch_select_indices` would also gather with `keys[rows, ...]`:
    advanced indexing, 3-9x slower than `index_select` on a CPU for the same bytes.
    """

    pending: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending is None:
            return super().update(key_states, value_states, *args, **kwargs)
        rows, self.pending = self.pending, None
        self.keys = _gather_append(self.keys, rows, key_states)
        self.values = _gather_append(self.values, rows, value_states)
        return self.keys, self.values


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep the cache's batch rows `rows` (in that order, repeats allowed), every layer: a plain
    `DynamicLayer` at its next update (`_SelectingLayer`), any other layer now, its own way. Until
    that update a plain layer's `keys` / `values` still hold the old rows: the next thing to touch
    the cache must be the model's forward (as in `decode`), which reads only their length before it.
    `_SelectingLayer.update` stands in for `DynamicLayer.update` (lazy init, then `torch.cat`);
    `tests/test_prefix_cache.py` holds the two to the same states."""
    for layer in cache.layers:
        plain = type(layer) in (DynamicLayer, _SelectingLayer) and layer.is_initialized
        if not plain or layer.keys.dim() != 4 or layer.get_seq_length() == 0:
            layer.batch_select_indices(rows)
            continue
        layer.__class__ = _SelectingLayer  # same state, one method more: no copy of the cache
        layer.pending = rows if layer.pending is None else layer.pending.index_select(0, rows)


def _cacheable(cache) -> bool:
    """Every layer a plain full-attention `DynamicLayer` holding [B, H, T, D] keys: the states the
    prefix cache can cut per prompt and stitch back together (a sliding-window or linear-attention
    layer cannot)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(
        isinstance(layer, DynamicLayer) and not layer.is_sliding and layer.keys.dim() == 4 for layer in layers
    ):
        return False
    # one shape across layers, for keys and for values (they may differ from each other: multi-head
    # latent attention), so a prompt's states stack into one tensor of each
    return all(len({getattr(layer, part).shape for layer in layers}) == 1 for part in ("keys", "values"))


def prefill(model, prompts: list[list[int]], pad_id: int, prefix_cache: PrefixCache | None = None):
    """Run the prompts (token ids, one per distinct prompt) through the model.

    With a `prefix_cache`, each prompt starts from the longest stored prompt that is a token prefix
    of it (at most all but its last token, whose logits are needed) and only the rest is run; every
    prompt's states are then stored. Returns (cache, last-position logits [n, V], attention mask
    [n, T], position of each row's last token [n], positions run through the model).
    """
    device = next(model.parameters()).device
    name = _cache_keyword(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(model)) else {}
    hits = [prefix_cache.longest(p, len(p) - 1) for p in prompts] if prefix_cache is not None else []
    width = max((h for h, _ in hits), default=0)
    if width:
        past, past_mask = _past_states(prefix_cache, hits, width, device)
        cache = _cache(past)
        del past  # the cache holds its own copy: do not keep two through the forward pass
        ids, new_mask = left_pad([p[h:] for p, (h, _) in zip(prompts, hits, strict=True)], pad_id, device)
        mask = torch.cat([past_mask, new_mask], dim=1)
        prefix_cache.hit_tokens += sum(h for h, _ in hits)
    else:
        cache = _cache()
        ids, mask = left_pad(prompts, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=pos[:, -ids.shape[1] :], use_cache=True,
        **{name: cache}, **keep,
    ).logits[:, -1]  # fmt: skip
    if prefix_cache is not None and _cacheable(cache):
        stacked = None  # [n, layers, H, T, D] keys and values, built once a prompt is new
        for i, p in enumerate(prompts):
            if prefix_cache.touch(p):
                continue
            if stacked is None:
                stacked = [
                    torch.stack([getattr(layer, part) for layer in cache.layers], 1)
                    for part in ("keys", "values")
                ]
            # row i's real positions: its cached ones right-aligned before `width`, then its new
            # ones right-aligned at the end
            h = hits[i][0]
            start = stacked[0].shape[3] - (len(p) - h)
            keys, values = (
                torch.cat([t[i, :, :, width - h : width], t[i, :, :, start:]], dim=2)
                if h
                else t[i, :, :, start:]
                for t in stacked
            )
            prefix_cache.put(p, keys, values)
    return cache, logits, mask, pos[:, -1], ids.numel()


@torch.inference_mode()
def decode(
    model,
    prompts: list[list[int]],
    rows: torch.Tensor,
    max_new: int,
    *,
    sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_ids: torch.Tensor,
    pad_id: int,
    stop_ids: torch.Tensor | None = None,
    stop_text=None,
    prefix_cache: PrefixCache | None = None,
    groups: list[tuple[int, torch.Generator | None]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """Continue the prompts (token ids, one per distinct prompt) for the rows `rows` (row i
    continues prompt rows[i]) by up to `max_new` tokens; `prefix_cache`: see `prefill`.

    `groups`: (number of rows, generator) for consecutive runs of rows that sample as one call of
    their own would (their own `torch.multinomial` over their rows, drawn while any of them is
    unfinished); default one group over every row, from torch's default generator.

    Returns (tokens [B, max_new], padded with `pad_id` after a row's last token; temperature-1
    log-probabilities of those tokens [B, max_new]; positions run through the model; each row's
    number of tokens, its last one included). `stop_text`:
    (tokens of a row so far) -> bool, for stops no single token completes.
    """
    name = _cache_keyword(model)
    cache, logits, mask, last_pos, positions = prefill(model, prompts, pad_id, prefix_cache)
    device = logits.device
    if rows.numel() != len(prompts) or not torch.equal(rows, torch.arange(len(prompts), device=device)):
        select_rows(cache, rows)
    logits, next_pos = logits[rows], last_pos[rows] + 1
    b = rows.numel()
    # every step's attention mask is a view of this one (a step adds a column of ones), not a new cat
    width = mask.shape[1]
    mask = torch.cat([mask[rows], mask.new_ones((b, max_new))], dim=1)
    tokens = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new), dtype=torch.float32, device=device)
    lengths = torch.full((b,), -1, dtype=torch.long, device=device)  # set as a row finishes
    # a token that ends its row (EOS or a stop token), looked up in one gather
    end_ids = torch.cat([eos_ids, eos_ids[:0] if stop_ids is None else stop_ids]).long()
    end_ids = end_ids[end_ids >= 0]  # a -1 (some generation configs) ends nothing, as with `isin`
    ends = torch.zeros(max([logits.shape[-1], *(end_ids + 1).tolist()]), dtype=torch.bool, device=device)
    ends[end_ids] = True
    active = torch.arange(b, device=device)  # rows in the forward batch (ascending)
    alive = torch.ones(b, dtype=torch.bool, device=device)  # of those, the ones not finished
    finished_in_batch = 0  # rows of the forward batch that have finished (`alive` False)
    warpers = _warpers(temperature, top_k, top_p) if sample else []
    draw = None  # every row's distribution for this step's multinomial, finished rows included
    bounds, lo = [], 0  # (first row, end row, generator) of each group
    for size, generator in groups or [(b, None)]:
        bounds.append((lo, lo + size, generator))
        lo += size
    assert lo == b, f"groups cover {lo} of {b} rows"
    unfinished = torch.ones(b, dtype=torch.bool)  # on the CPU: read every step to skip done groups
    # Until a row of the forward batch finishes (most steps of a short call, and of each stretch
    # after a drop until its first finish), the loop indexes no rows (each skipped op is a kernel
    # launch on a GPU, ~10 us on a CPU).
    t = -1
    for t in range(max_new):
        every_row = finished_in_batch == 0 and active.numel() == b  # live == arange(b)
        if finished_in_batch == 0:
            raw, live = logits.float(), active
        else:
            raw, live = logits[alive].float(), active[alive]
        scores = raw
        if sample:
            for w in warpers:
                scores = w(None, scores)
            if every_row:
                draw = scores.softmax(-1)  # no finished row to keep in the draw yet
            else:
                draw[live] = scores.softmax(-1)
            if len(bounds) == 1:
                picks = torch.multinomial(draw, 1, generator=bounds[0][2]).squeeze(1)
            else:
                picks = torch.zeros(b, dtype=torch.long, device=device)
                for first, end, generator in bounds:
                    if bool(unfinished[first:end].any()):
                        group = torch.multinomial(draw[first:end], 1, generator=generator)
                        picks[first:end] = group.squeeze(1)
            step = picks if every_row else picks[live]
        else:
            step = scores.argmax(-1)
        picked_lp = raw.log_softmax(-1).gather(-1, step[:, None]).squeeze(1)
        if every_row:
            tokens[:, t] = step
            logprobs[:, t] = picked_lp
        else:
            tokens[live, t] = step
            logprobs[live, t] = picked_lp
        done = ends[step]
        if stop_text is not None:
            rows_now = tokens[live, : t + 1].tolist()
            done |= torch.tensor([stop_text(r) for r in rows_now], dtype=torch.bool, device=device)
        # every row alive at this step feeds its token (one that just finished too), the others pad
        if finished_in_batch == 0:
            feed = step
        else:
            feed = torch.full((active.numel(),), pad_id, dtype=torch.long, device=device)
            feed[alive] = step
        newly = int(done.sum())
        if newly:
            gone = live[done]
            lengths[gone] = t + 1
            if sample:
                draw[gone] = 0.0  # a finished row: any distribution keeps its place in the draw
                draw[gone, 0] = 1.0
                unfinished[gone.cpu()] = False
            alive[alive.clone()] = ~done
            finished_in_batch += newly
        if t == max_new - 1 or finished_in_batch == active.numel():
            break
        # Copying the cache costs about a forward pass: drop finished rows once a quarter of the
        # batch has finished, not one at a time.
        if newly and finished_in_batch >= DROP_SHARE * active.numel():
            keep = alive.nonzero().squeeze(1)
            select_rows(cache, keep)
            active, mask, next_pos, feed = active[keep], mask[keep], next_pos[keep], feed[keep]
            alive = torch.ones(active.numel(), dtype=torch.bool, device=device)
            finished_in_batch = 0
        logits = model(
            input_ids=feed[:, None],
            attention_mask=mask[:, : width + t + 1],
            position_ids=next_pos[:, None],
            use_cache=True,
            **{name: cache},
        ).logits[:, -1]
        positions += feed.numel()
        next_pos = next_pos + 1
    lengths[lengths < 0] = t + 1  # rows still going when the loop ended
    return tokens, logprobs, positions, lengths.tolist()
