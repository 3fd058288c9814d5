"""The RMSNorm pass: every spelling transformers uses, the exact count, and safe refusals."""
import pytest
import torch
import torch.nn as nn

import chronicals_compile
from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import FAMILIES, random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

FAST = {"compiler": "aot_eager"}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_swaps_every_norm_and_trains_like_eager(family):
    layers = 3
    model = tiny_model(family, layers=layers)
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get("rms_norm") == 2 * layers + 1, str(report)
    assert_same_training_step(eager, compiled)


def test_dynamic_shapes_symbolic_epsilon():
    model = tiny_model("qwen2")
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=13), options=FAST, dynamic=True)
    assert report.swaps.get("rms_norm") == 5, str(report)
    assert_same_training_step(eager, compiled)


def test_gradient_checkpointing_bodies_are_rewritten():
    model = tiny_model("llama")
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get("rms_norm") == 5, str(report)
    assert_same_training_step(eager, compiled)


def test_peft_lora():
    model = with_lora(tiny_model("mistral"))
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get("rms_norm") == 5, str(report)
    assert_same_training_step(eager, compiled)


def test_four_lengths_at_most_two_compiles():
    from chronicals_compile.report import collecting

    model = tiny_model("llama")
    chronicals_compile.compile(model, compiler="aot_eager")
    with collecting() as report:
        for seq in (8, 12, 17, 24):
            out = model(**random_batch(seq=seq))
            out.loss.backward()
    assert report.graphs <= 2, str(report)
    assert report.swaps.get("rms_norm", 0) >= 5


class Spelled(nn.Module):
    """One RMSNorm written in a chosen spelling."""

    def __init__(self, spelling: str, hidden: int = 24):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden))
        self.spelling, self.eps = spelling, 1e-5

    def forward(self, x):
        s = self.spelling
        xf = x.float() if s in ("float", "xx") else x.to(torch.float32)
        sq = xf * xf if s == "xx" else torch.pow(xf, 2)
        if s == "sum":
            var = sq.sum(-1, keepdim=True) / x.shape[-1]
        elif s == "kwargs":
            var = torch.mean(input=sq, dim=-1, keepdim=True)
        else:
            var = sq.mean(-1, keepdim=True)
        normed = torch.rsqrt(self.eps + var) * xf
        out = normed.to(x.dtype)
        return (out * self.weight) if s == "weight_right" else (self.weight * out)


@pytest.mark.parametrize("spelling", ["float", "xx", "sum", "kwargs", "weight_right", "to"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spellings(spelling, dtype):
    module = Spelled(spelling).to(dtype)
    x = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    report = chronicals_compile.explain(module, x, options=FAST)
    assert report.swaps == {"rms_norm": 1}, str(report)
    torch.testing.assert_close(report.output, module(x), rtol=0, atol=0)


def test_sum_over_wrong_count_is_refused():
    class Wrong(nn.Module):
        def forward(self, x):
            xf = x.float()
            return xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / 7 + 1e-6)

    report = chronicals_compile.explain(Wrong(), torch.randn(3, 8), options=FAST)
    assert report.swaps == {}
    assert any("last dimension" in f.reason for f in report.fallbacks), str(report)


def test_gemma_order_in_bf16_is_refused():
    class GemmaNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(16))

        def forward(self, x):
            xf = x.float()
            normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (normed * (1.0 + self.weight.float())).type_as(x)

    module = GemmaNorm().to(torch.bfloat16)
    report = chronicals_compile.explain(module, torch.randn(3, 16, dtype=torch.bfloat16), options=FAST)
    assert report.swaps == {}
    assert any("cast back" in f.reason for f in report.fallbacks), str(report)


def test_escaping_intermediate_is_refused():
    class Leaky(nn.Module):
        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return torch.ones(8) * (x * torch.rsqrt(var + 1e-6)), var

    report = chronicals_compile.explain(Leaky(), torch.randn(3, 8), options=FAST)
    assert report.swaps == {}
    assert any("outside" in f.reason for f in report.fallbacks), str(report)


def test_unsupported_dtype_falls_back_with_reason():
    model = tiny_model("llama", dtype=torch.float64)
    report = chronicals_compile.explain(model, options=FAST, **random_batch())
    assert "rms_norm" not in report.swaps
    assert any("float64" in f.reason for f in report.fallbacks), str(report)
    torch.testing.assert_close(report.output.loss, model(**random_batch()).loss)
