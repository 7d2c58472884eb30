"""Tiny random causal LMs saved to disk, for tests that need a real `transformers` model.

Other test modules import these helpers (policy, critics, pipeline tests):

    from _tiny_models import save_tiny_llama  # tests/ is on sys.path under pytest
    path = save_tiny_llama(tmp_path / "policy")

Models are random (seeded) and use the character tokenizer of `mcts.charlm`, so they load in
well under a second and never touch a hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mcts.charlm import build_char_tokenizer, save_model_dir, tiny_gpt2_config, tiny_llama_config


def char_tokenizer():
    """The character tokenizer (pad/bos/eos set, left padding)."""
    return build_char_tokenizer()


def save_tiny_llama(path: str | Path, seed: int = 0, d_model: int = 32, n_layers: int = 2) -> Path:
    """Save a random tiny Llama + char tokenizer into `path` (safetensors); return the path."""
    from transformers import LlamaForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), d_model, n_layers, n_heads=2, tok=tok))
    return save_model_dir(model.eval(), tok, path)


def save_tiny_gpt2(path: str | Path, seed: int = 0, d_model: int = 32, n_layers: int = 2) -> Path:
    """Save a random tiny GPT-2 (learned absolute positions) + char tokenizer into `path`."""
    from transformers import GPT2LMHeadModel

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config(len(tok), d_model, n_layers, n_heads=2, tok=tok))
    return save_model_dir(model.eval(), tok, path)


def merging_bpe_tokenizer(metaspace: bool = False):
    """A BPE tokenizer trained here on Countdown-like text with no pre-tokenizer, so its merges
    cross step boundaries ("=7\\n", "\\n3"): a prompt's tokens are then not always a prefix of
    the tokens of the prompt extended by a step, as with the BPE tokenizers of real models.
    `metaspace`: SentencePiece-style instead (Llama-2, Mistral): spaces become "▁" and the decoder
    drops the leading space of a sequence's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from mcts.charlm import CHARS, SPECIALS

    texts = [
        f"{a} {b} {c} -> {a + b + c}\n{a}+{b}={a + b}\n{a + b}+{c}={a + b + c}\n"
        for a in range(1, 10)
        for b in range(1, 10)
        for c in (3, 7)
    ]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if metaspace:
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [*CHARS, "▁"] if metaspace else list(CHARS)
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=list(SPECIALS), initial_alphabet=alphabet)
    core.train_from_iterator(texts, trainer)
    bos = core.token_to_id("<s>")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    if metaspace:
        core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        core.decoder = decoders.Fuse()  # decode by concatenation, as the character tokenizer does
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )  # fmt: skip


def save_tiny_llama_bpe(path: str | Path, seed: int = 0, metaspace: bool = False) -> Path:
    """Save a random tiny Llama with `merging_bpe_tokenizer(metaspace)` into `path`."""
    from transformers import LlamaForCausalLM

    tok = merging_bpe_tokenizer(metaspace)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), 32, 2, n_heads=2, tok=tok))
    return save_model_dir(model.eval(), tok, path)
