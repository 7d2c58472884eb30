"""The two ~27M-parameter Llamas `benchmarks.throughput` measures beside the embedded policy, where
compute per position dominates as it does for a real model on a GPU: `wide_llama` (random weights
on the embedded tokenizer) and `policy_in_wide_llama` (the embedded policy inside a Llama 4x as
wide and twice as deep, so it grows the embedded search's deep trees)."""

from __future__ import annotations

from pathlib import Path


def wide_llama(tokenizer_dir: Path, out: Path, device: str) -> Path:
    """A random Llama of ~27M parameters with the embedded policy's tokenizer, saved to `out`: its
    steps are noise, so its trees are shallow (most options end without a separator)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def policy_in_wide_llama(policy_dir: Path, out: Path) -> Path:
    """The embedded policy inside a Llama 4x as wide and twice as deep (~27M parameters), saved to
    `out`: its weights fill the first 128 dimensions, the first heads and the first MLP units of
    the first layers, everything else is zero (the extra heads and units add nothing, the extra
    layers pass the residual stream through, the norms are rescaled for the zero dimensions), so
    it proposes what the embedded policy proposes, and grows the same deep trees, at the compute
    per position of a 27M model (a matmul costs the same whatever its values)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM.from_pretrained(policy_dir, local_files_only=True, dtype=torch.float32)
    c = small.config
    assert c.num_key_value_heads == c.num_attention_heads and not c.attention_bias and not c.mlp_bias, (
        "the embedding below copies plain multi-head attention and bias-free layers only"
    )
    assert c.hidden_size <= 512 and c.intermediate_size <= 1536, (
        f"{c.hidden_size} / {c.intermediate_size} too wide"
    )
    d, head_dim = 512, c.hidden_size // c.num_attention_heads
    shrink = (c.hidden_size / d) ** 0.5  # RMS over d dims of which only hidden_size are non-zero
    cfg = LlamaConfig(
        **{
            **c.to_dict(),
            "hidden_size": d,
            "intermediate_size": 1536,
            "num_hidden_layers": 2 * c.num_hidden_layers,
            "num_attention_heads": d // head_dim,
            "num_key_value_heads": d // head_dim,
            "head_dim": head_dim,
            "rms_norm_eps": c.rms_norm_eps * shrink**2,
        }
    )
    wide = LlamaForCausalLM(cfg)
    h, m = c.hidden_size, c.intermediate_size
    with torch.no_grad():
        for p in wide.parameters():
            p.zero_()
        wide.model.embed_tokens.weight[:, :h] = small.model.embed_tokens.weight
        wide.model.norm.weight[:h] = small.model.norm.weight * shrink
        for big, layer in zip(wide.model.layers, small.model.layers, strict=False):
            big.input_layernorm.weight[:h] = layer.input_layernorm.weight * shrink
            big.post_attention_layernorm.weight[:h] = layer.post_attention_layernorm.weight * shrink
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(big.self_attn, name).weight[:h, :h] = getattr(layer.self_attn, name).weight
            for name in ("gate_proj", "up_proj"):
                getattr(big.mlp, name).weight[:m, :h] = getattr(layer.mlp, name).weight
            big.mlp.down_proj.weight[:h, :m] = layer.mlp.down_proj.weight
    if not c.tie_word_embeddings:
        with torch.no_grad():
            wide.lm_head.weight[:, :h] = small.lm_head.weight
    wide.generation_config = small.generation_config
    wide.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir, local_files_only=True).save_pretrained(out)
    return out
