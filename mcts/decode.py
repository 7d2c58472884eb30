"""The policy's decode loop: one prefill per distinct prompt, rows that finish leave the batch.

`transformers`' `generate` runs every row until the last one stops: in the search's rollouts most
rows end well before the token cap and keep decoding padding, and the k rows sampling options of one
node each prefill the same prompt. This loop, for any causal LM of transformers 5 (one forward with
a `DynamicCache`):

- prefills each distinct prompt once (all its tokens) and copies its KV cache and last logits to the
  rows that share it;
- samples every row's next token the way `generate` does (temperature, top-k, top-p warpers, then
  `torch.multinomial` over the whole batch's rows: a finished row keeps its place in that draw, so a
  row's random numbers do not depend on when the others finished, and the same seed draws what
  `generate` draws, held by a test);
- stops a row at EOS or at a stop token (a token whose text holds the stop string; a stop string
  longer than one character is also looked for in each row's last tokens), and drops finished rows
  from the forward pass and the cache once a quarter of the batch has finished;
- gathers each kept token's log-probability at temperature 1 as it goes.
"""

from __future__ import annotations

import inspect

import torch

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


@torch.inference_mode()
def decode(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Continue the left-padded prompts `ids` / `mask` (one per distinct prompt) for the rows
    `rows` (row i continues prompt rows[i]) by up to `max_new` tokens.

    Returns (tokens [B, max_new], padded with `pad_id` after a row's last token; temperature-1
    log-probabilities of those tokens [B, max_new]; positions run through the model). `stop_text`:
    (tokens of a row so far) -> bool, for stops no single token completes.
    """
    device = ids.device
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    from transformers import DynamicCache

    cache = DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache}
    ).logits
    positions = ids.numel()
    if rows.numel() != ids.shape[0] or not torch.equal(rows, torch.arange(ids.shape[0], device=device)):
        cache.batch_select_indices(rows)
    logits, mask, next_pos = logits[rows, -1], mask[rows], pos[rows, -1] + 1
    b = rows.numel()
    tokens = torch.full((b, max_new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new), dtype=torch.float32, device=device)
    active = torch.arange(b, device=device)  # rows in the forward batch
    alive = torch.ones(b, dtype=torch.bool, device=device)  # of those, the ones not finished
    warpers = _warpers(temperature, top_k, top_p) if sample else []
    draw = None  # every row's distribution for this step's multinomial, finished rows included
    for t in range(max_new):
        raw = logits[alive].float()
        scores, live = raw, active[alive]
        if sample:
            for w in warpers:
                scores = w(None, scores)
            if draw is None:
                draw = torch.zeros((b, scores.shape[-1]), dtype=torch.float32, device=device)
                draw[:, 0] = 1.0  # a finished row: any distribution keeps its place in the draw
            draw[live] = scores.softmax(-1)
            step = torch.multinomial(draw, num_samples=1).squeeze(1)[live]
        else:
            step = scores.argmax(-1)
        tokens[live, t] = step
        logprobs[live, t] = raw.log_softmax(-1).gather(-1, step[:, None]).squeeze(1)
        done = torch.isin(step, eos_ids)
        if stop_ids is not None and stop_ids.numel():
            done |= torch.isin(step, stop_ids)
        if stop_text is not None:
            rows_now = tokens[live, : t + 1].tolist()
            done |= torch.tensor([stop_text(r) for r in rows_now], dtype=torch.bool, device=device)
        if sample and done.any():
            draw[live[done]] = 0.0
            draw[live[done], 0] = 1.0
        feed = torch.full((active.numel(),), pad_id, dtype=torch.long, device=device)
        feed[alive] = step
        alive[alive.clone()] = ~done
        if t == max_new - 1 or not bool(alive.any()):
            break
        # Copying the cache costs about a forward pass: drop finished rows once a quarter of the
        # batch has finished, not one at a time.
        if int((~alive).sum()) >= DROP_SHARE * active.numel():
            keep = alive.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, mask, next_pos, feed = active[keep], mask[keep], next_pos[keep], feed[keep]
            alive = torch.ones(active.numel(), dtype=torch.bool, device=device)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = model(
            input_ids=feed[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{name: cache},
        ).logits[:, -1]
        positions += feed.numel()
        next_pos = next_pos + 1
    return tokens, logprobs, positions
