"""Tiny random causal LMs of each family we support, built from configs (no network)."""
from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "mistral")


def tiny_model(family: str = "llama", *, layers: int = 2, hidden: int = 64, heads: int = 4,
               kv_heads: int = 2, vocab: int = 128, intermediate: int = 96, tie: bool = False,
               dtype: torch.dtype = torch.float32, seed: int = 0, **config_kwargs) -> torch.nn.Module:
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config_kwargs.setdefault("max_position_embeddings", 512)
    config_kwargs.setdefault("use_cache", False)
    config_kwargs.setdefault("attn_implementation", "sdpa")
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=tie, **config_kwargs,
    )
    torch.manual_seed(seed)
    return model_cls(config).to(dtype)


def random_batch(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 0,
                 pad_labels: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and labels; the last ``pad_labels`` labels of each row are -100 (padding)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    if pad_labels:
        labels[:, -pad_labels:] = -100
    return {"input_ids": ids, "labels": labels}
