"""The gated product ``act(a) * b`` is rebuilt in backward instead of saved: the forward keeps
exactly one [tokens, intermediate] tensor a layer less, training is unchanged, and the compile
caches never hand one policy's partition to the other."""
import copy

import pytest
import torch
import torch.nn.functional as F

import chronicals_compile
from chronicals_compile.passes import gate_recompute
from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager, loss_and_grads
from chronicals_compile.testing.saved import saved_bytes

LAYERS, INTERMEDIATE = 2, 256


def _compiled_step(model, batch, options):
    """One Inductor step through ``explain``: (report, saved bytes, (loss, grads))."""
    report = chronicals_compile.explain(model, options=options, **batch)
    held = saved_bytes(report.output.loss)
    report.output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return report, held, (report.output.loss.detach(), grads)


@pytest.mark.parametrize("fused_gate", [False, True], ids=["inductor-gate", "chronicals-swiglu"])
def test_product_not_saved_training_unchanged_and_caches_keyed(fused_gate):
    """On -> off -> on in one process, caches enabled: the 'off' compile of the same graph must
    not reuse the tagged partition (the tags are metadata, which the cache keys do not hash)."""
    base = tiny_model("qwen2", layers=LAYERS, intermediate=INTERMEDIATE)
    batch = random_batch(seq=24)
    eager = loss_and_grads(copy.deepcopy(base), batch)
    keep_gate = [] if fused_gate else ["swiglu"]
    held = {}
    for label, disable in (("on", keep_gate), ("off", [*keep_gate, "gate_recompute"]), ("on again", keep_gate)):
        torch._dynamo.reset()
        report, held[label], compiled = _compiled_step(copy.deepcopy(base), batch, {"disable": disable})
        assert report.swaps.get("swiglu", 0) == (LAYERS if fused_gate else 0), str(report)
        assert report.swaps.get("gate_recompute", 0) == (0 if label == "off" else LAYERS), str(report)
        assert_same_training_step(eager, compiled)
    tokens = batch["input_ids"].numel()
    assert held["off"] - held["on"] == LAYERS * tokens * INTERMEDIATE * 4, held  # fp32 model
    assert held["on again"] == held["on"], held


class _Mlp(torch.nn.Module):
    def __init__(self, gated: bool, down: bool):
        super().__init__()
        self.gated, self.down = gated, down
        self.g, self.u, self.d = (torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))

    def forward(self, x):
        h = F.silu(self.g(x)) * self.u(x) if self.gated else F.gelu(self.g(x))
        return (self.d(h) if self.down else h).sum()


@pytest.mark.parametrize("gated,down", [(False, True), (True, False)], ids=["ungated", "no-linear-after"])
def test_left_alone_without_a_gated_product_feeding_a_linear(gated, down):
    report = chronicals_compile.explain(_Mlp(gated, down), torch.randn(3, 8), options={"compiler": "aot_eager"})
    assert "gate_recompute" not in report.swaps, str(report)


def test_lora_products_tagged_and_training_unchanged():
    model = with_lora(tiny_model("llama", layers=LAYERS))
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={"compiler": "aot_eager"})
    assert report.swaps.get("gate_recompute") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


def test_checkpointed_layers_are_left_to_checkpointing():
    model = tiny_model("qwen2", layers=LAYERS)
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={"compiler": "aot_eager"})
    assert "gate_recompute" not in report.swaps, str(report)
    assert report.swaps.get("linear_cross_entropy") == 1, str(report)
    assert_same_training_step(eager, compiled)


def test_dynamic_shapes_keep_the_saving():
    base = tiny_model("llama", layers=LAYERS, intermediate=INTERMEDIATE)
    batch = random_batch(seq=20)
    eager = loss_and_grads(copy.deepcopy(base), batch)
    held = {}
    for label, disable in (("on", ["swiglu"]), ("off", ["swiglu", "gate_recompute"])):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        report = chronicals_compile.explain(model, options={"disable": disable}, dynamic=True, **batch)
        held[label] = saved_bytes(report.output.loss)
        report.output.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same_training_step(eager, (report.output.loss.detach(), grads))
    # at least the products (the symbolic partition also moves a few small tensors)
    assert held["off"] - held["on"] >= LAYERS * batch["input_ids"].numel() * INTERMEDIATE * 4, held
