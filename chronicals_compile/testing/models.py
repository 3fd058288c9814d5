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


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_lora(model: torch.nn.Module, targets=ALL_PROJECTIONS, *, r: int = 4, b_std: float = 0.02,
              seed: int = 0) -> torch.nn.Module:
    """``model`` wrapped in peft LoRA on ``targets``, with B drawn at random instead of zeros: a
    zero B makes every adapter gradient but B's vanish, and a gradient check would prove little."""
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    return model
