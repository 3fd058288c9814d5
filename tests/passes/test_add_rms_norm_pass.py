"""The residual add + RMSNorm pass: off by default, and when enabled the exact count on every
family with the training step unchanged; refusals where fusing would change the program."""
import pytest
import torch
import torch.nn as nn

import chronicals_compile
from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import FAMILIES, random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

ON = {"compiler": "aot_eager", "enable": ["add_rms_norm"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_norm_after_a_residual_add_is_fused(family):
    """L layers: every post-attention norm (L), every input norm but the first (L - 1, the first
    reads the embeddings) and the final norm: 2L sums fused; the first norm stays rms_norm."""
    layers = 3
    report, eager, compiled = compiled_vs_eager(tiny_model(family, layers=layers), random_batch(), options=ON)
    assert report.swaps.get("add_rms_norm") == 2 * layers, str(report)
    assert report.swaps.get("rms_norm") == 2 * layers + 1, str(report)  # the RMSNorm pass ran first
    assert_same_training_step(eager, compiled)


def test_dynamic_shapes():
    report, eager, compiled = compiled_vs_eager(tiny_model("mistral"), random_batch(seq=13), options=ON, dynamic=True)
    assert report.swaps.get("add_rms_norm") == 4, str(report)
    assert_same_training_step(eager, compiled)


def test_off_by_default_everywhere():
    report = chronicals_compile.explain(tiny_model("llama"), options={"compiler": "aot_eager"}, **random_batch())
    assert "add_rms_norm" not in report.swaps and report.swaps.get("rms_norm") == 5, str(report)


def test_lora_and_checkpointing():
    model = with_lora(tiny_model("qwen2"))
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=ON)
    # Each checkpointed layer is its own graph: its input norm reads the body's input, and the final
    # norm reads the last body's output, so only the post-attention sums (one per layer) fuse.
    assert report.swaps.get("add_rms_norm") == 2, str(report)
    assert_same_training_step(eager, compiled)


class SumThenNorm(nn.Module):
    """``s = a + b`` then an RMSNorm of s; optionally s is read before the norm, or b broadcasts."""

    def __init__(self, hidden: int = 16, read_early: bool = False, broadcast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.read_early, self.broadcast = read_early, broadcast

    def forward(self, a, b):
        s = a + (b[0] if self.broadcast else b)
        early = s * 2 if self.read_early else 0
        xf = s.to(torch.float32)
        y = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(s.dtype)
        return (y * y).sum() + (s * 0.5).sum() + (early.sum() if self.read_early else 0)


@pytest.mark.parametrize("kind, reason", [("read_early", "read before the norm"), ("broadcast", "broadcasting add")])
def test_refusals_keep_the_plain_norm(kind, reason):
    torch.manual_seed(0)
    module = SumThenNorm(**{kind: True})
    a, b = torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    report = chronicals_compile.explain(module, a, b, options=ON)
    assert "add_rms_norm" not in report.swaps and report.swaps.get("rms_norm") == 1, str(report)
    assert any(reason in f.reason for f in report.fallbacks if f.pattern == "add_rms_norm"), str(report)
    torch.testing.assert_close(report.output, module(a, b))


def test_fused_graph_matches_eager_on_gradients():
    torch.manual_seed(0)
    module = SumThenNorm()
    a, b = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    report = chronicals_compile.explain(module, a, b, options=ON)
    assert report.swaps.get("add_rms_norm") == 1, str(report)
    ours = torch.autograd.grad(report.output, (a, b, module.weight))
    ref = torch.autograd.grad(module(a, b), (a, b, module.weight))
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
