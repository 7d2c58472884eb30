"""Train a critic's top blocks on cached inputs: the frozen trunk runs once per row, not once per step.

A critic fine-tunes only its top `train_layers` blocks, the final norm and the head
(`critics.train`); the embeddings and the blocks below keep the base checkpoint's weights. So what
enters the first trained block is a fixed function of each row's tokens. The embedded critics'
value function trains 3,000 steps of 64 rows on ~26k rows (7 passes over each row), and the frozen
part is three of the trunk's four blocks: running it once per row and training on its stored
output nearly halves a step (41 -> 23 ms a value step on two cores). Measured on the bootstrap's
rows, one run after another (a Xeon's two cores): the three heads 199 / 209 s against 256 s
without the cache (value 76 against 112 s, ORM 75-80 against 94 s; the PRM, whose 1,000 steps
pass over each of its ~35k rows less than twice, about even).

The same numbers, not always bit for bit: a row's hidden states can depend in their last bits on
the width of the batch it is padded into (attention's vector reductions; up to 4e-5 measured), and
the cache is filled in batches of similar lengths where training pads each step to its widest row.
On the Xeon measured, the embedded value function came out bit-identical to its build without the
cache, the PRM and ORM did not (test-slice AUROC 0.842 / 0.921 against 0.842 / 0.920). A build with
the cache is reproducible; it fills the cache on one thread, so training beside another critic or
alone gives the same weights.

An ensemble's heads (the embedded value function's three) train on the same rows from the same
trunk, so the first head's cache serves the heads after it (`filled`; `critics.train.train_one`'s
`features`): bit-identical heads, and 45-52 s less of the first command's build measured on the
Xeon (the three heads at one step each: 63.9 s with one fill of 22.9 s, 115.9 s with three).

The cache is used where it fits `budget_mb` and where a check on the first batch gives the full
model's logits from it (`TopBlocks.build`): a model whose embedding does more than look up tokens
(Gemma scales it) or whose stack is not `model.model.layers` is trained the plain way.
"""

from __future__ import annotations

import contextlib

import torch

from critics.models import pad_right, step_logits


class _Captured(Exception):
    """Raised by the hook once the first trained block's input is in hand: the blocks above it
    need not run while the cache is filled."""


class TopBlocks:
    """The inputs of a model's first trained block for every row (one flat tensor, a zero row last
    for padding) and the forward from them through the trained blocks, the final norm and the head."""

    def __init__(self, model, first: int, flat: torch.Tensor, offsets: list[int], ids: list[list[int]]):
        self.model, self.first, self.flat = model, first, flat
        self.offsets, self.ids, self.lengths = offsets, ids, [len(r) for r in ids]
        self.top = torch.nn.ModuleList(list(model.model.layers)[first:])

    @classmethod
    def build(
        cls,
        model,
        kind: str,
        ids: list[list[int]],
        train_layers: int,
        pad_id: int,
        device,
        budget_mb: float,
        check_rows: tuple,
        filled: TopBlocks | None = None,
    ) -> TopBlocks | None:
        """The cache for `ids` (rows of token ids), or None where it does not apply: nothing is
        frozen below the trained blocks, the model is not a Llama-style stack with a `score` head,
        the cache would pass `budget_mb`, or its logits differ from the full model's on
        `check_rows` = (rows, ids, mask, positions) of one training batch. `filled`: a cache of
        another model with the same frozen part over the same `ids` (an ensemble's earlier head),
        whose stored inputs are reused, not computed again: the fill's batches depend on the rows
        alone, so the floats are those a fill of its own would give."""
        try:
            blocks = model.model.layers
            hidden = int(model.config.hidden_size)
            model.model.norm, model.score  # noqa: B018 (attribute check)
        except AttributeError:
            return None
        first = len(blocks) - train_layers
        if train_layers < 1 or first < 1:
            return None
        if filled is not None and filled.first == first and filled.ids == ids:
            top = cls(model, first, filled.flat, filled.offsets, ids)
            return top if top._agrees(kind, *check_rows) else None
        tokens = sum(len(r) for r in ids)
        size = (tokens + 1) * hidden * torch.finfo(model.dtype).bits / 8 / 2**20
        if size > budget_mb:
            return None
        # in host memory, a batch at a time to `device`
        flat = torch.zeros(tokens + 1, hidden, dtype=model.dtype)
        offsets, at = [], 0
        for r in ids:
            offsets.append(at)
            at += len(r)
        cls._fill(model, blocks[first], ids, offsets, flat, pad_id, device)
        top = cls(model, first, flat, offsets, ids)
        return top if top._agrees(kind, *check_rows) else None

    @staticmethod
    @torch.no_grad()
    def _fill(model, block, ids, offsets, flat, pad_id, device, batch: int = 256) -> None:
        seen: dict = {}

        def grab(module, args, kwargs):
            seen["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Captured

        hook = block.register_forward_pre_hook(grab, with_kwargs=True)
        # One thread, whatever the caller's: the cache's floats must not depend on whether this
        # critic trains beside another (`train_critics(side_by_side=True)`, one thread each) or
        # alone (two); its batches are wider than the training step `threads_agree` checks.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # little padding per batch
            for lo in range(0, len(order), batch):
                chunk = order[lo : lo + batch]
                x, mask = pad_right([ids[i] for i in chunk], pad_id)
                with contextlib.suppress(_Captured):  # the hook stops the pass at the first trained block
                    model.model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False)
                h = seen.pop("h")
                for j, i in enumerate(chunk):
                    flat[offsets[i] : offsets[i] + len(ids[i])] = h[j, : len(ids[i])].cpu()
        finally:
            hook.remove()
            torch.set_num_threads(threads)

    def _agrees(
        self, kind: str, rows: list[int], x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
    ) -> bool:
        training = self.model.training
        self.model.eval()  # no dropout draws: the two must see the same numbers
        try:
            with torch.no_grad():
                full = step_logits(self.model, kind, x, mask, pos)
                cached = self.logits(rows, mask, pos)
        finally:
            self.model.train(training)
        return bool(torch.allclose(full, cached, rtol=1e-3, atol=1e-4))

    def logits(self, rows: list[int], mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [n, k] at `pos` for `rows` (their right-padded `mask`): what `step_logits` gives
        (the value function's and ORM's pooled logit is the one at their last token, `pos`)."""
        width = mask.shape[1]
        pad = self.flat.shape[0] - 1
        index = torch.full((len(rows), width), pad, dtype=torch.long)
        for j, i in enumerate(rows):
            index[j, : self.lengths[i]] = torch.arange(self.offsets[i], self.offsets[i] + self.lengths[i])
        h = self.flat[index].to(mask.device)
        base = self.model.model
        blocks = base.layers
        base.layers = self.top  # the forward runs the trained blocks only
        try:
            out = base(inputs_embeds=h, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            base.layers = blocks
        dropout = getattr(self.model, "dropout", None)  # a token classifier's, on the final states
        if dropout is not None:
            out = dropout(out)
        return self.model.score(out).float()[..., 0].gather(1, pos)
