"""The LLM policy: batched step proposals, rollouts and greedy decoding with any local causal LM.

Any model that `transformers` loads from a local directory (`save_pretrained` output with a
tokenizer and safetensors weights) works. Nothing is downloaded: loading passes
`local_files_only=True`, weights must be safetensors (pickle checkpoints are refused), and
remote code runs only when `trust_remote_code=True`.

Every call is batched (split at `max_batch` rows): `propose` samples k options for many leaves,
`rollout` and `greedy` continue many prompts (`mcts.decode`: one prefill per distinct prompt).

Log-probabilities (`Option.logprob`) are sums of the *unmodified* model's log-probs
(temperature 1, no top-p) of the generated tokens, separator or EOS included: that is the
probability the model gives the whole step, which is what a prior should be. The sampling
temperature/top-p only change *which* options are drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mcts.base import PolicyConfig, Seeds, seed_each
from mcts.decode import decode, left_pad, stop_token_ids
from mcts.hf import PolicyLoadError, check_policy_dir, load_policy_tokenizer, resolve_device, resolve_dtype
from mcts.merge import Option
from mcts.prefix_cache import PrefixCache


def _seed_runs(prompts: list, seed: Seeds) -> list[tuple[int, int, int]]:
    """(first prompt, end, seed) of each run of consecutive prompts sharing a seed."""
    seeds = seed_each(seed, len(prompts))
    assert len(seeds) == len(prompts), f"{len(seeds)} seeds for {len(prompts)} prompts"
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(seeds):
        if runs and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], i + 1, s)
        else:
            runs.append((i, i + 1, s))
    return runs


def _pack_calls(runs: list[tuple[int, int, int]], max_batch: int) -> list[list[tuple[int, int, tuple]]]:
    """Decode calls for seed runs: each run cut into `max_batch`-row chunks, the full chunks a call
    each, then the runs' last partial chunks packed together, in order, up to `max_batch` rows a
    call. Every run's chunks stay in their order (its generator's stream runs through them).
    A piece is (first row, end row, (run's first row, seed))."""
    full, partial = [], []
    for lo, hi, seed in runs:
        for start in range(lo, hi, max_batch):
            piece = (start, min(start + max_batch, hi), (lo, seed))
            (full if piece[1] - piece[0] == max_batch else partial).append(piece)
    calls = [[piece] for piece in full]
    packed, rows = [], max_batch  # rows: in the last packed call
    for piece in partial:
        size = piece[1] - piece[0]
        if rows + size <= max_batch:
            packed[-1].append(piece)
            rows += size
        else:
            packed.append([piece])
            rows = size
    return calls + packed


PROMPT_TOKENS_KEPT = 2_000_000  # prompt tokens a policy remembers between cache resets (~20-80 MB)


@dataclass(frozen=True)
class Rollout:
    """A continuation to the end: `text` (special tokens removed), generated `num_tokens`
    (EOS included), `steps` (text split at the separator, empty tail dropped), `ended` (EOS seen)."""

    text: str
    num_tokens: int
    steps: list[str]
    ended: bool


def _sliding_window(config) -> bool:
    """Whether some attention layer of the model sees a window only. Its mask measures the window in
    cache columns, and a prompt stitched from the prefix cache has padding columns inside it, so
    the prefix cache stays off for such a model (Mistral, Gemma 2/3, Qwen2 with sliding windows)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ()
    if any("sliding" in str(t) for t in layer_types):
        return True
    return (
        bool(getattr(text, "sliding_window", None)) and getattr(text, "use_sliding_window", True) is not False
    )


class Policy:
    """A causal LM and its tokenizer, ready for batched step proposals.

    `tokens_generated` counts every generated (non-padding) token over the policy's life, and
    `generate_calls` the `generate` calls, so callers can budget and report throughput.
    """

    def __init__(self, model, tokenizer, cfg: PolicyConfig, device: torch.device):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.tokens_generated = 0
        self.generate_calls = 0
        self.positions_run = 0  # positions run through the model: prompts (padding included) and steps
        # Prefill a prompt that repeats within a call once (`mcts.decode`); off: every row prefills
        # its own copy (the exactness test compares the two).
        self.share_prefill = True
        mb = cfg.prefix_cache_mb if not _sliding_window(model.config) else 0
        self.prefix_cache: PrefixCache | None = PrefixCache(mb * 2**20) if mb > 0 else None
        self._stop_ids: dict[str, torch.Tensor] = {}
        self._prompt_ids: dict[str, list[int]] = {}  # `_token_ids`' memory, and its size in tokens
        self._prompt_tokens = 0
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids: list[int] = sorted(set(eos))

    @classmethod
    def load(cls, cfg: PolicyConfig) -> Policy:
        """Load tokenizer and model from `cfg.path` (local files only, safetensors only)."""
        from transformers import AutoModelForCausalLM

        path = check_policy_dir(cfg.path)
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        tok = load_policy_tokenizer(cfg.path, cfg.trust_remote_code)
        model = (
            AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
                dtype=dtype,
            )
            .to(device)
            .eval()
        )
        tok.padding_side = "left"  # new tokens of every row start at the same column
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise PolicyLoadError(
                    f"policy.path={cfg.path}: the tokenizer has neither a pad nor an eos token: "
                    "set one (tokenizer.pad_token = ...) and save it again"
                )
            tok.pad_token = tok.eos_token
        return cls(model, tok, cfg, device)

    # -- public calls -------------------------------------------------------------------------

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt and its token ids (as a search stream starts and runs dry, for
        `run_search` every batch: what it computes must not depend on the work before it, and no
        memory is held after it)."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self._prompt_ids.clear()
        self._prompt_tokens = 0

    def propose(
        self, prompts: list[str], num_options: list[int], seed: Seeds, stop: str = "\n"
    ) -> list[list[Option]]:
        """Sample `num_options[i]` options for `prompts[i]`, all in one batched generate call
        (split only at `max_batch` sequences). Each option ends at `stop`, EOS or
        `max_step_tokens`. Returns one list of options per prompt, in prompt order."""
        assert len(prompts) == len(num_options), f"{len(prompts)} prompts, {len(num_options)} counts"
        flat = [p for p, k in zip(prompts, num_options, strict=True) for _ in range(k)]
        row_seeds = [
            s for s, k in zip(seed_each(seed, len(prompts)), num_options, strict=True) for _ in range(k)
        ]
        seqs = self._generate(flat, row_seeds, True, self.cfg.max_step_tokens, stop, want_logprob=True)
        out: list[list[Option]] = []
        it = iter(seqs)
        for k in num_options:
            out.append(
                [
                    Option(
                        text=s["text"],
                        logprob=s["logprob"],
                        num_tokens=len(s["ids"]),
                        ended=s["ended"],
                        truncated=s["truncated"],
                        token_ids=tuple(s["ids"]),
                    )
                    for s in (next(it) for _ in range(k))
                ]
            )
        return out

    def rollout(
        self, prompts: list[str], seed: Seeds, max_new_tokens: int | None = None, sep: str = "\n"
    ) -> list[Rollout]:
        """Sample a continuation of every prompt to EOS or the token cap, in one batched call."""
        cap = max_new_tokens or self.cfg.max_rollout_tokens
        return [self._as_rollout(s, sep) for s in self._generate(prompts, seed, True, cap, None)]

    def greedy(self, prompts: list[str], max_new_tokens: int | None = None, sep: str = "\n") -> list[Rollout]:
        """Greedy (argmax) continuation of every prompt to EOS or the token cap."""
        cap = max_new_tokens or self.cfg.max_rollout_tokens
        return [self._as_rollout(s, sep) for s in self._generate(prompts, 0, False, cap, None)]

    @torch.inference_mode()
    def score(self, prompts: list[str], continuations: list[list[int]]) -> list[float]:
        """Sum of log p(continuation tokens | prompt) under the model at temperature 1.

        One padded forward pass per `max_batch` rows; position ids follow the attention mask, so
        the result does not depend on how much left padding a row received.
        """
        tok = self.tokenizer
        rows = [tok(p)["input_ids"] + list(c) for p, c in zip(prompts, continuations, strict=True)]
        out: list[float] = []
        for lo in range(0, len(rows), self.cfg.max_batch):
            chunk = rows[lo : lo + self.cfg.max_batch]
            ids, mask = left_pad(chunk, tok.pad_token_id, self.device)
            width = ids.shape[1]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
            lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, c in enumerate(continuations[lo : lo + len(chunk)]):
                out.append(float(lp[i, width - 1 - len(c) :].sum()) if len(c) else 0.0)
        return out

    # -- internals ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(
        self,
        prompts: list[str],
        seed: Seeds,
        sample: bool,
        max_new: int,
        stop: str | None,
        want_logprob: bool = False,
    ) -> list[dict]:
        """Generate for every prompt (`mcts.decode`, at most `max_batch` rows a call); per sequence
        return its kept token `ids`, `text`, `logprob` (temperature-1 log-probs of the kept tokens;
        NaN unless `want_logprob`), `ended`, `truncated`.

        `seed`: one for every prompt, or one per prompt. Each run of consecutive prompts with the
        same seed is a group that draws exactly what a call of its own would: its own generator, cut
        into `max_batch`-row chunks run in order. A group's last, partial chunk shares a decode call
        with other groups' (the search's concurrent batches: `mcts.search.SearchStream`).
        """
        tok, cfg = self.tokenizer, self.cfg
        stop_ids, stop_text = self._stop_rule(stop)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=self.device)
        calls = _pack_calls(_seed_runs(prompts, seed), cfg.max_batch)
        generators: dict[int, torch.Generator] = {}  # group's first row -> its generator
        results: list[dict | None] = [None] * len(prompts)
        for call in calls:
            rows_of_call = [i for lo, hi, _ in call for i in range(lo, hi)]
            chunk = [prompts[i] for i in rows_of_call]
            groups = []
            for lo, hi, (group, group_seed) in call:
                if sample and group not in generators:
                    generators[group] = torch.Generator(device=self.device).manual_seed(group_seed)
                groups.append((hi - lo, generators.get(group)))
            if self.share_prefill:
                distinct = list(dict.fromkeys(chunk))
                where = {p: i for i, p in enumerate(distinct)}
                rows = torch.tensor([where[p] for p in chunk], device=self.device)
            else:
                distinct, rows = chunk, torch.arange(len(chunk), device=self.device)
            new, lp, positions, lengths = decode(
                self.model, self._token_ids(distinct), rows, max_new,
                sample=sample, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                eos_ids=eos, pad_id=tok.pad_token_id, stop_ids=stop_ids, stop_text=stop_text,
                prefix_cache=self.prefix_cache, groups=groups,
            )  # fmt: skip
            self.generate_calls += 1
            self.positions_run += positions
            lp = lp.cpu()
            prompt_ids = self._token_ids(chunk)
            for r, row in enumerate(new.cpu().tolist()):
                cut = self._cut(row[: lengths[r]], stop, max_new, prompt_ids[r][-1:])
                cut["logprob"] = float(lp[r, : len(cut["ids"])].sum()) if want_logprob else math.nan
                results[rows_of_call[r]] = cut
        self.tokens_generated += sum(len(r["ids"]) for r in results)
        return results

    def _stop_rule(self, stop: str | None):
        """(ids of the tokens that complete `stop`, a text check for a stop no one token completes)."""
        if not stop:
            return None, None
        if stop not in self._stop_ids:
            self._stop_ids[stop] = stop_token_ids(self.tokenizer, stop).to(self.device)
        if len(stop) == 1:
            return self._stop_ids[stop], None
        window = len(stop) + 4  # tokens: enough that a stop split over tokens is still seen

        def in_text(row: list[int]) -> bool:
            return stop in self.tokenizer.decode(row[-window:], skip_special_tokens=True)

        return self._stop_ids[stop], in_text

    def _cut(self, row: list[int], stop: str | None, max_new: int, context: list[int]) -> dict:
        """Find where one generated row (its tokens up to the one it stopped at) really ends: its
        first EOS, or the token that completed `stop`. `context`: the prompt's last token, which
        the row's text is decoded after (see `_decode_after`)."""
        eos = set(self.eos_token_ids)
        end = next((i for i, t in enumerate(row) if t in eos), None)
        body = row if end is None else row[:end]
        head = self._decode(context)

        def decode(ids: list[int]) -> str:
            return self._decode_after(context, head, ids)

        text = decode(body)
        if stop and stop in text:
            # Smallest prefix whose text contains `stop` (binary search: decoding is the cost). The
            # loop stopped the row at the token that completed it, so that is nearly always the
            # last one: one decode says so.
            lo, hi = 1, len(body)
            if stop not in decode(body[:-1]):
                lo = hi
            while lo < hi:
                mid = (lo + hi) // 2
                if stop in decode(body[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            return dict(ids=body[:lo], text=text[: text.index(stop)], ended=False, truncated=False)
        if end is not None:
            return dict(ids=row[: end + 1], text=text, ended=True, truncated=False)
        return dict(ids=row, text=text, ended=False, truncated=len(row) >= max_new)

    def _token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, remembered until the next `reset_prefix_cache` (a node's prompt
        is tokenized for its rollouts, then again when its options are sampled)."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._prompt_ids]
        if new:
            ids = self.tokenizer(new)["input_ids"]
            size = sum(map(len, ids))
            if self._prompt_tokens + size > PROMPT_TOKENS_KEPT:  # bounded: start again
                self._prompt_ids.clear()
                self._prompt_tokens = 0
            self._prompt_ids.update(zip(new, ids, strict=True))
            self._prompt_tokens += size
        return [self._prompt_ids[p] for p in prompts]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _decode_after(self, context: list[int], head: str, ids: list[int]) -> str:
        """The text `ids` add after `context` (whose text is `head`): what the model wrote after its
        prompt. Decoding `ids` alone would lose a SentencePiece-style token's leading space (its
        decoder drops the space of a sequence's first token: "▁8" reads "8", not " 8")."""
        if not context:
            return self._decode(ids)
        text = self._decode([*context, *ids])
        return text[len(head) :] if text.startswith(head) else self._decode(ids)

    @staticmethod
    def _as_rollout(s: dict, sep: str) -> Rollout:
        steps = s["text"].split(sep)
        if steps and steps[-1] == "":
            steps.pop()
        return Rollout(text=s["text"], num_tokens=len(s["ids"]), steps=steps, ended=s["ended"])
