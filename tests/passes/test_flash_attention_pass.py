"""Causal, unmasked SDPA becomes ``chronicals::flash_attention`` where flash-attn-4 can run it, and
stays with SDPA everywhere else. FA4 needs a Hopper GPU, so these tests stand its readiness check
in with "ready" and run the op's portable path, which computes the same function
(tests/gpu/test_flash_attention_gpu.py checks FA4's kernels against it)."""
import pytest
import torch
import torch.nn.functional as F

import chronicals_compile
from chronicals_compile.passes import flash_attention
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

LAYERS = 2
ON = {"compiler": "aot_eager", "enable": ["flash_attention"]}


@pytest.fixture
def fa4_ready(monkeypatch):
    monkeypatch.setattr(flash_attention, "fast_path_unavailable", lambda device, dtype, head_dim: None)


@pytest.mark.parametrize("family,kv_heads", [("qwen2", 2), ("llama", 4), ("mistral", 1)])
def test_every_attention_swapped_and_training_unchanged(fa4_ready, family, kv_heads):
    model = tiny_model(family, layers=LAYERS, kv_heads=kv_heads)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options=ON)
    assert report.swaps.get("flash_attention") == LAYERS, str(report)
    assert report.swaps.get("causal_mask") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


def test_inductor_compiled_model_trains_like_eager(fa4_ready):
    model = tiny_model("qwen2", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=10), options={"enable": ["flash_attention"]})
    assert report.swaps.get("flash_attention") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


class _Attention(torch.nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.kwargs = sdpa_kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kwargs).sum()


def _explain(module, kv_len=6, kv_heads=2, dtype=torch.float32):
    q = torch.randn(2, 4, 6, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, kv_len, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    return chronicals_compile.explain(module, q, k, v, options=ON)


def test_grouped_heads_and_a_given_scale_swapped(fa4_ready):
    assert _explain(_Attention(is_causal=True, enable_gqa=True, scale=0.3)).swaps.get("flash_attention") == 1


@pytest.mark.parametrize("module,kv_len,reason", [
    (_Attention(is_causal=True, dropout_p=0.1, enable_gqa=True), 6, "dropout"),
    (_Attention(is_causal=True, enable_gqa=True), 9, "differ from the query"),
], ids=["dropout", "kv-longer"])
def test_refusals_name_the_reason(fa4_ready, module, kv_len, reason):
    report = _explain(module, kv_len=kv_len)
    assert "flash_attention" not in report.swaps, str(report)
    assert any(reason in f.reason for f in report.fallbacks if f.pattern == "flash_attention"), str(report)


def test_masked_or_non_causal_attention_is_not_a_candidate(fa4_ready):
    assert "flash_attention" not in _explain(_Attention(enable_gqa=True)).swaps


def test_without_fa4_attention_stays_with_sdpa():
    """This machine has no FA4 (and no CUDA): nothing is swapped, and nothing is said on a CPU."""
    assert flash_attention.fast_path_unavailable(torch.device("cpu"), torch.bfloat16, 64) is not None
    report = _explain(_Attention(is_causal=True, enable_gqa=True))
    assert "flash_attention" not in report.swaps, str(report)
    assert not [f for f in report.fallbacks if f.pattern == "flash_attention"], str(report)
