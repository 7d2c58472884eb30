"""A character-level tokenizer and tiny causal-LM builders for arithmetic step text.

Used by the embedded default policy (`mcts.embedded`) and by the tests, which need small
real `transformers` models saved on disk. Everything here is built locally; nothing is
downloaded.

The tokenizer is a `tokenizers` BPE model with *no merges*, i.e. one token per character,
wrapped as a `PreTrainedTokenizerFast` so that `AutoTokenizer.from_pretrained(dir)` loads it
like any other checkpoint's tokenizer. Vocabulary (ids are stable, the model's embedding
rows depend on them):

    0 <pad>   1 <s>   2 </s>   3 <unk>   then the characters of `CHARS` in order.

`<s>` is prepended to every encoded text (a fixed anchor for the first real character, which
matters for left-padded batches); `</s>` ends a solution.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the tokenizer alone needs none
    import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Digits, the four operations, '=' and '>' (the "->" of a prompt), space and newline.
CHARS = "0123456789+-*/=> \n"


def build_char_tokenizer():
    """Return a `PreTrainedTokenizerFast` over `SPECIALS + CHARS` (one token per character).

    pad/bos/eos/unk are set; the padding side is left (the policy always pads on the left).
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    # BPE without merges is a character tokenizer that maps unknown characters to <unk>
    # instead of silently dropping them; no pre-tokenizer, so spaces and newlines are tokens.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIALS))
    # Fuse: decode by concatenation (the default decoder would join tokens with spaces).
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def tiny_llama_config(
    vocab_size: int, d_model: int = 128, n_layers: int = 4, n_heads: int = 4, max_len: int = 128, tok=None
):
    """A small `LlamaConfig` (d_model=128, 4 layers: about 0.8M parameters with the char vocab).

    Embeddings are tied to the output head: at this size an untied head would be ~1/3 of the
    parameters for no gain. `tok` supplies pad/bos/eos ids (defaults: the char tokenizer's).
    """
    from transformers import LlamaConfig

    ids = _special_ids(tok)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=int(d_model * 8 / 3) // 8 * 8,  # Llama's SwiGLU ratio, rounded
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **ids,
    )


def tiny_gpt2_config(
    vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 2, max_len: int = 128, tok=None
):
    """A small `GPT2Config` (learned absolute positions: exercises left-padding position ids)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_positions=max_len,
        **_special_ids(tok),
    )


def _special_ids(tok) -> dict:
    tok = tok if tok is not None else build_char_tokenizer()
    return {
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def save_model_dir(model, tok, path: str | Path) -> Path:
    """Save model (safetensors) and tokenizer into `path` so `Policy.load` can read it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def num_params(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def warmup_cosine(i: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor of step i: linear warmup over `warmup` steps, then cosine decay to
    `floor` at `steps` (the embedded policy's and the critics' schedule)."""
    if i < warmup:
        return (i + 1) / warmup
    frac = (i - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def encode_pairs(pairs: list[tuple[str, str]], tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [n, width] and labels [n, width] (-100 on prompt and padding): the embedded
    models' training rows, `prompt + solution + </s>` with the loss on the solution."""
    import torch

    prompts = tok([p for p, _ in pairs])["input_ids"]  # each starts with <s>
    sols = tok([s for _, s in pairs], add_special_tokens=False)["input_ids"]
    rows = [(p, s + [tok.eos_token_id]) for p, s in zip(prompts, sols, strict=True)]
    width = max(len(p) + len(s) for p, s in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, s) in enumerate(rows):
        ids[i, : len(p) + len(s)] = torch.tensor(p + s)
        labels[i, len(p) : len(p) + len(s)] = torch.tensor(s)
    return ids, labels
