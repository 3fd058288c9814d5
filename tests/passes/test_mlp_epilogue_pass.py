"""A gated MLP's three linears become ``chronicals::gated_mlp`` where QuACK's epilogue GEMMs can
run it, and are left to Inductor everywhere else. QuACK needs a Hopper GPU, so these tests stand
its readiness check in with "ready" and run the op's torch path, which computes the same
interleaved layout (tests/gpu/test_mlp_epilogue_gpu.py checks QuACK's kernels against it)."""
import pytest
import torch
import torch.nn.functional as F

import chronicals_compile
from chronicals_compile.passes import mlp_epilogue
from chronicals_compile.testing import random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

LAYERS = 2


@pytest.fixture
def quack_ready(monkeypatch):
    monkeypatch.setattr(mlp_epilogue, "fast_path_unavailable", lambda device, dtype: None)


@pytest.mark.parametrize("family,act", [("qwen2", "silu"), ("llama", "silu"), ("mistral", "gelu_pytorch_tanh")])
def test_every_mlp_fused_and_training_unchanged(quack_ready, family, act):
    model = tiny_model(family, layers=LAYERS, hidden_act=act)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={"compiler": "aot_eager"})
    assert report.swaps.get("mlp_epilogue") == LAYERS, str(report)
    assert "swiglu" not in report.swaps and "gate_recompute" not in report.swaps, str(report)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("keep", [False, True], ids=["default", "kept-weight"])
def test_inductor_compiled_model_trains_like_eager(quack_ready, keep):
    model = tiny_model("qwen2", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=10), options={"mlp_keep_weight": keep})
    assert report.swaps.get("mlp_epilogue") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("keep, interleaves", [(False, 2 * LAYERS), (True, LAYERS)])
def test_kept_weight_option_reaches_the_op_and_trains_the_same(quack_ready, monkeypatch, keep, interleaves):
    """``mlp_keep_weight``: the backward uses the forward's interleaved weight (one interleave a
    layer instead of two) and the step equals eager's."""
    from chronicals_compile.ops import gated_mlp as op_module

    calls = []
    original = op_module._interleave
    monkeypatch.setattr(op_module, "_interleave", lambda *a: calls.append(1) or original(*a))
    model = tiny_model("qwen2", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12),
                                                options={"compiler": "aot_eager", "mlp_keep_weight": keep})
    assert report.swaps.get("mlp_epilogue") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)
    assert len(calls) == interleaves


class _Mlp(torch.nn.Module):
    """One MLP with the variations the pass must refuse."""

    def __init__(self, bias=False, act="silu", spelled=False, leak=False, widths=(16, 32)):
        super().__init__()
        d, f = widths
        self.act, self.spelled, self.leak = act, spelled, leak
        self.g, self.u = torch.nn.Linear(d, f, bias=bias), torch.nn.Linear(d, f, bias=False)
        self.d = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        a = self.g(x)
        if self.spelled:
            gated = (a * torch.sigmoid(a)) * self.u(x)
        elif self.act == "silu":
            gated = self.u(x) * F.silu(a)
        else:
            gated = F.gelu(a, approximate=self.act) * self.u(x)
        out = self.d(gated)
        return (out.sum() + gated.mean()) if self.leak else out.sum()


def _explain(module, dtype=torch.float32):
    x = torch.randn(3, 5, module.g.in_features, dtype=dtype, requires_grad=True)
    return chronicals_compile.explain(module.to(dtype), x, options={"compiler": "aot_eager"})


def test_spelled_out_silu_and_either_operand_order_fused(quack_ready):
    for module in (_Mlp(spelled=True), _Mlp(act="silu")):
        report = _explain(module)
        assert report.swaps.get("mlp_epilogue") == 1, str(report)


@pytest.mark.parametrize("module,reason", [
    (_Mlp(bias=True), "bias"),
    (_Mlp(leak=True), "used outside the MLP"),
    (_Mlp(widths=(12, 32)), "multiples of 8"),
], ids=["bias", "product-used-elsewhere", "width-12"])
def test_refusals_name_the_reason(quack_ready, module, reason):
    report = _explain(module)
    assert "mlp_epilogue" not in report.swaps, str(report)
    assert any(reason in f.reason for f in report.fallbacks if f.pattern == "mlp_epilogue"), str(report)


def test_erf_gelu_is_not_a_candidate(quack_ready):
    assert "mlp_epilogue" not in _explain(_Mlp(act="none")).swaps


def test_lora_mlps_left_to_the_lora_passes(quack_ready):
    model = with_lora(tiny_model("llama", layers=LAYERS))
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={"compiler": "aot_eager"})
    assert "mlp_epilogue" not in report.swaps, str(report)
    assert_same_training_step(eager, compiled)


def test_without_quack_the_mlp_stays_with_inductor():
    """This machine has no QuACK (and no CUDA): nothing is swapped, and nothing is said on a CPU."""
    assert mlp_epilogue.fast_path_unavailable(torch.device("cpu"), torch.bfloat16) is not None
    report = _explain(_Mlp())
    assert "mlp_epilogue" not in report.swaps, str(report)
    assert not [f for f in report.fallbacks if f.pattern == "mlp_epilogue"], str(report)
    assert report.swaps.get("gate_recompute") == 1, str(report)
