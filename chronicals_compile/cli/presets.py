"""Named model shapes: random weights built from a config, no download.

``default`` is what ``chronicals finetune`` trains with no arguments: a small Qwen2-shaped model
whose vocabulary is the embedded tokenizer's. ``tiny`` is for tests. The two real shapes match
the published configs (hidden size, layers, heads, KV heads, intermediate size, vocabulary, tied
embeddings), which is what throughput and memory depend on; their weights are random.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    family: str  # "qwen2" | "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's size
    tie: bool = True
    rope_theta: float = 10000.0
    max_positions: int = 4096
    rms_norm_eps: float = 1e-6

    def params(self, vocab: int | None = None) -> int:
        """Parameter count (embeddings once when tied)."""
        v = vocab or self.vocab or 0
        head_dim = self.hidden // self.heads
        attn = self.hidden * self.heads * head_dim * 2 + self.hidden * self.kv_heads * head_dim * 2
        if self.family == "qwen2":  # q/k/v biases
            attn += self.heads * head_dim + 2 * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        emb = v * self.hidden * (1 if self.tie else 2)
        return self.layers * per_layer + emb + self.hidden


PRESETS: dict[str, Preset] = {
    "default": Preset("qwen2", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, vocab=None),
    "tiny": Preset("qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=None),
    "qwen2.5-0.5b": Preset("qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                           vocab=151936, rope_theta=1000000.0, max_positions=32768),
    "llama-3.2-1b": Preset("llama", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192,
                           vocab=128256, rope_theta=500000.0, max_positions=131072, rms_norm_eps=1e-5),
}


def build_config(preset: Preset, vocab: int, *, attn_implementation: str = "sdpa",
                 pad_token_id: int | None = None, eos_token_id: int | None = None):
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[preset.family]
    kwargs = dict(
        vocab_size=vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads, max_position_embeddings=preset.max_positions,
        rms_norm_eps=preset.rms_norm_eps, tie_word_embeddings=preset.tie, use_cache=False,
        pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
    )
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def build_model(preset: Preset, vocab: int, *, dtype=None, device=None, seed: int = 0,
                attn_implementation: str = "sdpa", pad_token_id: int | None = None,
                eos_token_id: int | None = None):
    """A randomly initialised causal LM of ``preset``'s shape (HF's own init, seeded)."""
    import torch
    import transformers

    config = build_config(preset, vocab, attn_implementation=attn_implementation,
                          pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM}[preset.family]
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = model_cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model
