"""Matching by idiom, not by class: tiny random models of architectures we never wrote a line for
train through the backend like eager (loss and every gradient, fp32, rtol 1e-5), and each reports the
swaps its idioms allow (a LayerNorm model gets no rms_norm; Qwen3's q/k norms are RMSNorms too).
The off-by-default ``concat_linear`` is enabled here, so it is checked on every architecture (it
caught its own first bug on Gemma's RMSNorm: ``y.type_as(x)`` read as a cast of ``x``).

The expected swaps are what transformers 5.24 builds; an architecture the installed transformers
lacks is left out of the parametrisation rather than skipped (``test_enough_architectures_exist``
guards against the list emptying).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

CORE = {"causal_mask": 2, "gqa_attention": 2, "linear_cross_entropy": 1}
#: the gated product recomputed in backward: every gated MLP whose product feeds a linear
GATE = {"gate_recompute": 2}
#: architecture -> swaps for 2 layers (rms_norm 2L+1 = 5; 9 with per-head q/k norms)
EXPECTED = {
    "Qwen3": {**CORE, **GATE, "rms_norm": 9, "swiglu": 2, "rope": 2},
    "Gemma": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},            # (1 + w) norm, tanh-GELU gate
    "Olmo2": {**CORE, **GATE, "rms_norm": 9, "swiglu": 2, "rope": 2},            # norms after the blocks, q/k norms
    "Granite": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},          # residual and logit multipliers
    "Phi3": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},             # fused qkv and gate_up projections
    "SmolLM3": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},
    "Glm": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},              # interleaved pairs, partial rotary
    "Glm4": {**CORE, **GATE, "rms_norm": 9, "swiglu": 2, "rope": 2},             # the same, with sandwich norms
    "Helium": {**CORE, **GATE, "rms_norm": 5, "swiglu": 2, "rope": 2},           # interleaved pairs
    "Cohere": {**CORE, **GATE, "swiglu": 2, "rope": 2},                          # LayerNorm, logit scale, interleaved
    "StableLm": {**CORE, **GATE, "swiglu": 2, "rope": 2},                        # LayerNorm, partial rotary
    "Starcoder2": {**CORE, "rope": 2},                                   # LayerNorm, GELU MLP
    "Qwen2Moe": {**CORE, **GATE, "rms_norm": 5, "swiglu": 4, "rope": 2},  # experts + shared expert (only its product feeds a linear)
    "Mixtral": {**CORE, "rms_norm": 5, "swiglu": 2, "rope": 2},          # experts: no linear after the product
    "Exaone4": {**CORE, **GATE, "rms_norm": 9, "swiglu": 2, "rope": 2},
    "Arcee": {**CORE, "rms_norm": 5, "rope": 2},                         # relu^2 MLP: no gate
    # eager attention (no SDPA in transformers for it): no mask pass; the loss has a tanh soft-cap
    "Gemma2": {"rms_norm": 9, "swiglu": 2, "rope": 2, "linear_cross_entropy": 1, **GATE},
}
#: linears on one input fused into one GEMM (concat_linear, enabled here though off by default, so
#: every architecture checks it): q/k/v each layer (gate/up is refused everywhere: too wide to pay,
#: which explain says); Phi-3 has q/k/v fused already; Cohere's parallel block reads one norm for
#: attention and MLP (one group of five, narrow enough at the tiny shape); Qwen2-MoE's router and
#: shared expert are refused: the experts' in-place index_add_ lies between them
CONCAT = {"Phi3": 0}
#: architectures transformers runs with its own attention code only
EAGER_ATTENTION = {"Gemma2"}
AVAILABLE = [name for name in EXPECTED if hasattr(transformers, f"{name}ForCausalLM")]


def test_enough_architectures_exist():
    assert len(AVAILABLE) >= 10, AVAILABLE


def _tiny(name: str) -> torch.nn.Module:
    config = getattr(transformers, f"{name}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for key, value in (("head_dim", 16), ("moe_intermediate_size", 32), ("num_experts", 4),
                       ("num_experts_per_tok", 2)):
        if hasattr(config, key):
            setattr(config, key, value)
    config._attn_implementation = "eager" if name in EAGER_ATTENTION else "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config).float()


@pytest.mark.parametrize("name", AVAILABLE)
def test_unseen_architecture_trains_like_eager(name):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    report, eager, compiled = compiled_vs_eager(_tiny(name), {"input_ids": ids, "labels": ids},
                                                options={"compiler": "aot_eager", "enable": ["concat_linear"]})
    concat = CONCAT.get(name, 2)
    assert report.swaps == {**EXPECTED[name], **({"concat_linear": concat} if concat else {})}, str(report)
    if name == "Gemma2":  # the soft-capped loss was fused: no logits come back in training
        assert report.output.logits is None
    assert_same_training_step(eager, compiled)
