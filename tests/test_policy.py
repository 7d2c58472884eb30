"""Policy: batched proposals, exact log-probs, padding invariance, caps, determinism, merge, errors."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_models import save_tiny_gpt2, save_tiny_llama

from mcts.hf import PolicyLoadError
from mcts.merge import Option, merge_options
from mcts.policy import Policy, PolicyConfig
from mcts.tasks.countdown import CountdownTask

PROMPTS = ["3 7 9 4 -> 24\n", "1 2 -> 3\n", "12 5 8 9 -> 100\n"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def policy(request, tmp_path_factory) -> Policy:
    save = save_tiny_llama if request.param == "llama" else save_tiny_gpt2
    path = save(tmp_path_factory.mktemp(request.param))
    return Policy.load(PolicyConfig(path=str(path), device="cpu", max_step_tokens=6, max_rollout_tokens=12))


def _manual_logprob(policy: Policy, prompt: str, token_ids: tuple[int, ...]) -> float:
    """Unpadded single-sequence forward pass: the reference for every logprob."""
    prompt_ids = policy.tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + list(token_ids)])
    with torch.no_grad():
        logp = policy.model(input_ids=ids).logits[0].float().log_softmax(-1)
    n = len(prompt_ids)
    return sum(float(logp[n - 1 + i, t]) for i, t in enumerate(token_ids))


def test_propose_mixed_k_in_one_call(policy: Policy):
    calls = policy.generate_calls
    tokens = policy.tokens_generated
    options = policy.propose(PROMPTS, [3, 1, 5], seed=0)
    assert [len(o) for o in options] == [3, 1, 5]
    assert policy.generate_calls == calls + 1, "mixed k must be one batched generate call"
    flat = [o for opts in options for o in opts]
    assert policy.tokens_generated - tokens == sum(o.num_tokens for o in flat)
    for o in flat:
        assert "\n" not in o.text
        assert math.isfinite(o.logprob) and o.logprob <= 0
        assert 1 <= o.num_tokens <= 6 == policy.cfg.max_step_tokens
        assert o.num_tokens == len(o.token_ids)
        if o.truncated:
            assert o.num_tokens == 6 and not o.ended


def test_logprobs_match_unpadded_forward_pass(policy: Policy):
    """Prompts of different lengths share a left-padded batch: logprobs must not see the padding."""
    options = policy.propose(PROMPTS, [2, 2, 2], seed=3)
    for prompt, opts in zip(PROMPTS, options, strict=True):
        for o in opts:
            assert o.logprob == pytest.approx(_manual_logprob(policy, prompt, o.token_ids), abs=1e-4)
    # score() re-scores the same tokens in one padded batch: same numbers.
    flat = [(p, o) for p, opts in zip(PROMPTS, options, strict=True) for o in opts]
    scored = policy.score([p for p, _ in flat], [o.token_ids for _, o in flat])
    assert scored == pytest.approx([o.logprob for _, o in flat], abs=1e-4)


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 5)])
def test_the_decode_loop_samples_what_generate_samples(
    policy: Policy, monkeypatch, temperature, top_p, top_k
):
    """mcts.decode drops finished rows and prefills a repeated prompt once, yet for a seed it draws
    the tokens transformers' `generate` draws (same warpers, one multinomial over every row)."""
    for key, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        monkeypatch.setattr(policy.cfg, key, value)
    prompts = [PROMPTS[0]] * 3 + PROMPTS[1:] * 2
    cap = policy.cfg.max_rollout_tokens
    ours = policy.rollout(prompts, seed=4)
    tok = policy.tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(4)
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = policy.model.generate(
            **enc, max_new_tokens=cap, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=1.0, pad_token_id=tok.pad_token_id, eos_token_id=policy.eos_token_ids,
        )  # fmt: skip
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    theirs = [policy._cut(row, None, cap, enc["input_ids"][i, -1:].tolist()) for i, row in enumerate(new)]
    assert [(r.text, r.num_tokens, r.ended) for r in ours] == [
        (t["text"], len(t["ids"]), t["ended"]) for t in theirs
    ]
    assert len({r.text for r in ours[:3]}) > 1, "three rows of one prompt must still differ"


def test_stop_and_eos_are_cut(policy: Policy):
    """Over many samples some options stop at the separator: their last token is the newline."""
    options = [o for opts in policy.propose(PROMPTS, [40, 40, 40], seed=1) for o in opts]
    newline = policy.tokenizer("\n", add_special_tokens=False)["input_ids"]
    stopped = [o for o in options if not o.truncated and not o.ended]
    assert stopped, "expected some options to end at the separator"
    for o in stopped:
        assert list(o.token_ids[-1:]) == newline
    for o in options:
        if o.ended:
            assert o.token_ids[-1] in policy.eos_token_ids


def test_deterministic_for_a_seed(policy: Policy):
    """From empty prompt caches (as every search batch starts) a seed gives the same options, bit
    for bit; with the first call's prompts cached, the same samples (log-probs within rounding)."""

    def propose(seed: int, fresh: bool = True):
        if fresh:
            policy.reset_prefix_cache()
        return policy.propose(PROMPTS, [2, 3, 1], seed=seed)

    a, b, c = propose(11), propose(11), propose(12)
    assert a == b
    assert a != c
    warm = propose(11, fresh=False)
    assert [[o.token_ids for o in opts] for opts in warm] == [[o.token_ids for o in opts] for opts in a]
    got = [o.logprob for opts in warm for o in opts]
    assert got == pytest.approx([o.logprob for opts in a for o in opts], abs=1e-4)


@pytest.mark.parametrize("max_batch", [256, 4])
def test_shared_prefill_samples_what_plain_generate_samples(policy: Policy, monkeypatch, max_batch):
    """One prefill per distinct prompt, its cache copied to the rows that share it: the same seed
    draws the same options and rollouts as every row prefilling its own copy (a max_batch of 4 cuts
    runs of one prompt across calls), with the same log-probs."""
    monkeypatch.setattr(policy.cfg, "max_batch", max_batch)
    prompts = [PROMPTS[0]] * 5 + [PROMPTS[1]] + [PROMPTS[2]] * 3

    def run(shared: bool):
        monkeypatch.setattr(policy, "share_prefill", shared)
        return policy.propose(PROMPTS, [4, 1, 3], seed=5), policy.rollout(prompts, seed=9)

    (options, rollouts), (plain_options, plain_rollouts) = run(True), run(False)
    assert [[(o.token_ids, o.text) for o in opts] for opts in options] == [
        [(o.token_ids, o.text) for o in opts] for opts in plain_options
    ]
    got = [o.logprob for opts in options for o in opts]
    want = [o.logprob for opts in plain_options for o in opts]
    assert got == pytest.approx(want, abs=1e-4)
    assert rollouts == plain_rollouts
    assert len({o.token_ids for o in options[0]}) > 1, "the rows of one prompt must still differ"


@pytest.mark.parametrize("max_batch", [256, 4])
def test_seed_runs_draw_what_their_own_calls_draw(policy: Policy, monkeypatch, max_batch):
    """Prompts of two seeds in one call (the search's batches side by side, `SearchStream`): each run
    of one seed samples the options and rollouts a call of its own samples. With a max_batch of 4
    the first run's 6 rows are cut 4 + 2, and its last 2 share a decode call with the second run's."""
    monkeypatch.setattr(policy.cfg, "max_batch", max_batch)
    alone = policy.propose(PROMPTS[:2], [3, 3], seed=5) + policy.propose(PROMPTS[2:], [2], seed=6)
    calls = policy.generate_calls
    together = policy.propose(PROMPTS, [3, 3, 2], seed=[5, 5, 6])
    assert policy.generate_calls - calls == (2 if max_batch == 4 else 1)
    assert [[(o.token_ids, o.text) for o in opts] for opts in together] == [
        [(o.token_ids, o.text) for o in opts] for opts in alone
    ]
    got = [o.logprob for opts in together for o in opts]
    assert got == pytest.approx([o.logprob for opts in alone for o in opts], abs=1e-4)
    assert together != policy.propose(PROMPTS, [3, 3, 2], seed=5), "the second run's seed must matter"
    rollouts = policy.rollout(PROMPTS * 2, seed=[9] * 3 + [10] * 3)
    assert rollouts == policy.rollout(PROMPTS, seed=9) + policy.rollout(PROMPTS, seed=10)


def test_max_batch_splits_calls(policy: Policy, monkeypatch):
    monkeypatch.setattr(policy.cfg, "max_batch", 4)
    calls = policy.generate_calls
    options = policy.propose(PROMPTS, [3, 3, 3], seed=0)
    assert policy.generate_calls == calls + 3
    assert [len(o) for o in options] == [3, 3, 3]


def test_rollout_and_greedy(policy: Policy):
    rolls = policy.rollout(PROMPTS, seed=0)
    assert len(rolls) == 3
    for r in rolls:
        assert 1 <= r.num_tokens <= 12
        assert r.steps == [s for s in r.text.split("\n")][: len(r.steps)]
        assert not r.steps or r.steps[-1] != "" or r.text.endswith("\n\n")
    assert rolls == policy.rollout(PROMPTS, seed=0)
    g1, g2 = policy.greedy(PROMPTS), policy.greedy(PROMPTS)
    assert g1 == g2
    assert all(r.num_tokens <= 5 for r in policy.greedy(PROMPTS, max_new_tokens=5))


def test_merge_options_with_task_normalizer():
    task = CountdownTask()
    opts = [
        Option("3+4=7", math.log(0.3), 6, False),
        Option("4+3=7", math.log(0.1), 6, False),
        Option("3+4=7", math.log(0.3), 6, False),  # the same string sampled twice counts once
        Option("7*4=28", math.log(0.2), 7, False),
    ]
    merged = merge_options(opts, task.normalize_step)
    assert [m.text for m in merged] == ["3+4=7", "7*4=28"]
    assert merged[0].count == 3 and set(merged[0].surfaces) == {"3+4=7", "4+3=7"}
    assert merged[0].logprob == pytest.approx(math.log(0.4))
    assert [m.prior for m in merged] == pytest.approx([0.4 / 0.6, 0.2 / 0.6])
    assert sum(m.prior for m in merged) == pytest.approx(1.0)


def test_merge_near_identical_and_underflow():
    opts = [Option("12+34=46", -900.0, 9, False), Option("12+34=47", -901.0, 9, False)]
    exact = merge_options(opts, str)
    assert len(exact) == 2 and all(math.isfinite(m.prior) for m in exact)
    assert exact[0].prior == pytest.approx(1 / (1 + math.exp(-1)))
    near = merge_options(opts, str, similarity=0.8)
    assert len(near) == 1 and near[0].text == "12+34=46" and near[0].prior == pytest.approx(1.0)


def test_load_errors(tmp_path):
    with pytest.raises(PolicyLoadError, match="does not exist: point policy.path"):
        Policy.load(PolicyConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyLoadError, match="no config.json"):
        Policy.load(PolicyConfig(path=str(tmp_path / "empty")))
    src = save_tiny_llama(tmp_path / "pickled")
    (src / "model.safetensors").unlink()
    torch.save({}, src / "pytorch_model.bin")
    with pytest.raises(PolicyLoadError, match=r"pytorch_model.bin.*safe_serialization=True"):
        Policy.load(PolicyConfig(path=str(src)))
    src = save_tiny_llama(tmp_path / "notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    with pytest.raises(PolicyLoadError, match="no tokenizer"):
        Policy.load(PolicyConfig(path=str(src)))


def test_a_negative_end_id_ends_no_row(policy: Policy):
    """A -1 among the EOS ids (some generation configs carry one) ends no row: the last vocabulary
    id is drawn and decoded past like any other (the loop's end-token table must not wrap it)."""
    from mcts.decode import decode

    ids = [policy.tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = torch.arange(len(PROMPTS)).repeat_interleave(8)
    tokens, _, _, lengths = decode(
        policy.model, ids, rows, 12, sample=True, eos_ids=torch.tensor([-1]),
        pad_id=policy.tokenizer.pad_token_id, groups=[(rows.numel(), torch.Generator().manual_seed(0))],
    )  # fmt: skip
    last = policy.model.get_output_embeddings().weight.shape[0] - 1
    assert bool((tokens == last).any()), "the last id should be drawn somewhere in 24 x 12 draws"
    assert lengths == [12] * rows.numel()


def test_a_step_keeps_the_leading_space_a_sentencepiece_token_wrote(tmp_path):
    """With a SentencePiece-style tokenizer (Llama-2, Mistral) a token "▁8" reads " 8" after a
    prompt, but "8" decoded on its own: an option's text is what the model wrote after its prompt."""
    from _tiny_models import save_tiny_llama_bpe

    policy = Policy.load(PolicyConfig(path=str(save_tiny_llama_bpe(tmp_path / "sp", metaspace=True))))
    tok = policy.tokenizer
    prompts = ["3 7 9 4 -> 24\n", "1 2 -> 3\n"]
    options = policy.propose(prompts, [12, 12], seed=0)
    spaced = 0
    for prompt, opts in zip(prompts, options, strict=True):
        ids = tok(prompt)["input_ids"]
        head = tok.decode(ids, skip_special_tokens=True)
        for o in opts:
            written = tok.decode([*ids, *o.token_ids], skip_special_tokens=True)[len(head) :]
            assert written.startswith(o.text), (o.text, written)
            spaced += o.text.startswith(" ")
    assert spaced > 0, "no option began with a spaced token: the check above proved nothing"
