"""The gated product rebuilt in backward on CUDA: one [tokens, intermediate] tensor a layer less
held for backward, and the step trains like eager, with our kernels off (CUDA's defaults) and on."""
import copy

import pytest
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, loss_and_grads
from chronicals_compile.testing.saved import saved_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")

LAYERS, INTERMEDIATE = 2, 384


@pytest.mark.parametrize("enable", [[], ["swiglu"]], ids=["inductor-gate", "chronicals-swiglu"])
def test_gate_recompute_on_cuda(enable):
    base = tiny_model("qwen2", layers=LAYERS, hidden=128, heads=8, kv_heads=2, intermediate=INTERMEDIATE).cuda()
    batch = {k: v.cuda() for k, v in random_batch(seq=64).items()}
    eager = loss_and_grads(copy.deepcopy(base), batch)
    held = {}
    for label, disable in (("on", []), ("off", ["gate_recompute"])):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        report = chronicals_compile.explain(model, options={"enable": enable, "disable": disable}, **batch)
        assert report.swaps.get("gate_recompute", 0) == (LAYERS if label == "on" else 0), str(report)
        held[label] = saved_bytes(report.output.loss)
        report.output.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same_training_step(eager, (report.output.loss.detach(), grads), rtol=2e-3, atol=2e-4)
    assert held["off"] - held["on"] == LAYERS * batch["input_ids"].numel() * INTERMEDIATE * 4, held
