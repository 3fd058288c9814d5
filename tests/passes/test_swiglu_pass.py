"""The SwiGLU/GeGLU pass: every spelling, either operand order, fused projections, refusals,
and the tiny Llama/Qwen2/Mistral families trained through the backend."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from chronicals_compile.testing import FAMILIES, random_batch, tiny_model
from chronicals_compile.testing.equivalence import (assert_same_training_step, compile_and_capture,
                                                      compiled_vs_eager)

FAST = {"compiler": "aot_eager"}
LAYERS = 2




def targets(graphs):
    return [n.target for g in graphs for m in g.modules() if isinstance(m, fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function"]


def assert_same_as_eager(module, inputs, compiled_out, rtol=1e-5, atol=1e-6):
    """Outputs and the gradients of every input and parameter agree with eager."""
    def grads(out):
        params = [p for p in module.parameters()] + [x for x in inputs if x.requires_grad]
        return torch.autograd.grad(out.float().square().sum(), params, allow_unused=True)

    eager_out = module(*inputs)
    assert compiled_out.dtype == eager_out.dtype
    torch.testing.assert_close(compiled_out, eager_out, rtol=rtol, atol=atol)
    for gc, ge in zip(grads(compiled_out), grads(eager_out)):
        if ge is None:
            assert gc is None
        else:
            torch.testing.assert_close(gc, ge, rtol=rtol, atol=atol)


class Gated(nn.Module):
    """One gated MLP written in a chosen spelling."""

    def __init__(self, spelling: str, hidden: int = 16, inter: int = 24):
        super().__init__()
        from transformers.activations import ACT2FN

        self.spelling = spelling
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.silu_module = nn.SiLU()
        self.act2fn = ACT2FN["silu"]
        self.gelu_act2fn = ACT2FN["gelu_pytorch_tanh"]
        self.lora_a = nn.Linear(hidden, 4, bias=False)
        self.lora_b = nn.Linear(4, inter, bias=False)
        self.inter = inter

    def forward(self, x):
        s = self.spelling
        a, b = self.gate(x), self.up(x)
        if s == "silu":
            h = F.silu(a) * b
        elif s == "silu_reversed":
            h = b * F.silu(a)
        elif s == "module":
            h = self.silu_module(a) * b
        elif s == "act2fn":
            h = self.act2fn(a) * b
        elif s == "sigmoid":
            h = a * torch.sigmoid(a) * b
        elif s == "sigmoid_reversed":
            h = b * (a.sigmoid() * a)
        elif s == "chunk":
            g, u = self.gate_up(x).chunk(2, dim=-1)
            h = u * self.act2fn(g)
        elif s == "slice":
            gu = self.gate_up(x)
            h = F.silu(gu[..., :self.inter]) * gu[..., self.inter:]
        elif s == "lora":
            a = a + self.lora_b(self.lora_a(x)) * 2.0
            b = b + self.lora_b(self.lora_a(x)) * 2.0
            h = F.silu(a) * b
        elif s == "gelu_tanh":
            h = F.gelu(a, approximate="tanh") * b
        elif s == "gelu_act2fn":
            h = b * self.gelu_act2fn(a)
        # --- refusals ---
        elif s == "reused":
            act = F.silu(a)
            h = act * b + act
        elif s == "broadcast":
            h = F.silu(a) * self.up.weight[:, 0]
        elif s == "dtype":
            h = F.silu(a) * b.to(torch.bfloat16)
        elif s == "gelu_erf":
            h = F.gelu(a) * b
        elif s == "ungated":
            h = F.silu(a) + torch.sigmoid(b) * b
        else:
            raise ValueError(s)
        return self.down(h.to(x.dtype))


SWAPS = {
    "silu": "swiglu", "silu_reversed": "swiglu", "module": "swiglu", "act2fn": "swiglu",
    "sigmoid": "swiglu", "sigmoid_reversed": "swiglu", "chunk": "swiglu", "slice": "swiglu",
    "lora": "swiglu", "gelu_tanh": "geglu", "gelu_act2fn": "geglu",
}


@pytest.mark.parametrize("spelling", list(SWAPS))
def test_spelling_is_swapped_and_exact(spelling):
    torch.manual_seed(0)
    module = Gated(spelling)
    x = torch.randn(2, 5, 16, requires_grad=True)
    report, graphs, out = compile_and_capture(module, x)
    assert report.swaps.get("swiglu") == 1, str(report)
    op = getattr(torch.ops.chronicals, SWAPS[spelling]).default
    assert op in targets(graphs)
    assert not any(t in (F.silu, F.gelu, torch.sigmoid) for t in targets(graphs))
    assert_same_as_eager(module, [x], out)


@pytest.mark.parametrize("spelling, reason", [
    ("reused", "users"),
    ("broadcast", "shapes differ"),
    ("dtype", "but b is torch.bfloat16"),
    ("gelu_erf", "tanh approximation"),
])
def test_refusals_are_reported_and_leave_the_graph_alone(spelling, reason):
    torch.manual_seed(0)
    module = Gated(spelling)
    x = torch.randn(2, 5, 16, requires_grad=True)
    report, graphs, out = compile_and_capture(module, x)
    assert report.swaps.get("swiglu", 0) == 0, str(report)
    fallbacks = [f for f in report.fallbacks if f.pattern == "swiglu"]
    assert len(fallbacks) == 1 and reason in fallbacks[0].reason, str(report)
    assert_same_as_eager(module, [x], out)


def test_ungated_activations_are_not_candidates():
    module = Gated("ungated")
    report, _, _ = compile_and_capture(module, torch.randn(3, 16))
    assert "swiglu" not in report.swaps and not report.fallbacks, str(report)


def test_disable_leaves_swiglu_to_inductor():
    module = Gated("silu")
    report, graphs, _ = compile_and_capture(module, torch.randn(3, 16), disable=["swiglu"])
    assert report.swaps.get("swiglu", 0) == 0
    assert torch.ops.chronicals.swiglu.default not in targets(graphs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_dtype(dtype):
    torch.manual_seed(0)
    module = Gated("chunk").to(dtype)
    x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    report, _, out = compile_and_capture(module, x)
    assert report.swaps.get("swiglu") == 1, str(report)
    assert out.dtype == dtype
    # act(a) is rounded before the product in eager, once in ours: half-precision tolerance.
    assert_same_as_eager(module, [x], out, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_swaps_every_mlp_and_trains_like_eager(family):
    model = tiny_model(family, layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get("swiglu") == LAYERS, str(report)
    assert report.swaps.get("rope") == LAYERS, str(report)
    assert report.swaps.get("rms_norm") == 2 * LAYERS + 1, str(report)
    assert not [f for f in report.fallbacks if f.pattern in ("swiglu", "rope")], str(report)
    assert_same_training_step(eager, compiled)


def _tiny(name: str, **extra):
    import transformers

    config = getattr(transformers, f"{name}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_cache=False, **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{name}ForCausalLM")(config)


def test_gemma_geglu_model():
    """Gemma's MLP gate is gelu_pytorch_tanh: swapped for chronicals::geglu, reported as swiglu."""
    model = _tiny("Gemma", head_dim=16, attn_implementation="sdpa")
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get("swiglu") == LAYERS and report.swaps.get("rope") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)
