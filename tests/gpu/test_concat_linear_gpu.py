"""Linears on one input as one GEMM on CUDA: the step equals eager's, full and LoRA (fp32 without
TF32: cuBLAS tiles a wider GEMM differently, hence a GEMM-sized tolerance), several AdamW steps
give eager's losses and final weights, and the forward holds no more for backward than without
the pass. bf16 is compared against eager by the e2e benchmark (its loss check)."""
import copy

import pytest
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, loss_and_grads, train_losses
from chronicals_compile.testing.saved import saved_bytes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")

LAYERS = 2


def _model(lora: bool = False):
    model = tiny_model("qwen2", layers=LAYERS, hidden=128, heads=8, kv_heads=2, intermediate=384)
    return (with_lora(model) if lora else model).cuda()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_concat_linear_step_equals_eager_on_cuda(lora):
    torch.backends.cuda.matmul.allow_tf32 = False
    base = _model(lora)
    batch = {k: v.cuda() for k, v in random_batch(seq=64).items()}
    eager = loss_and_grads(copy.deepcopy(base), batch)
    held = {}
    for label, enable in (("on", ["concat_linear"]), ("off", [])):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        report = chronicals_compile.explain(model, options={"enable": enable}, **batch)
        # full: q/k/v per layer (gate/up is refused by the width rule); LoRA: the frozen q/k/v and
        # their lora_A (gate/up's adapters go to lora_linear, on by default)
        want = (2 if lora else 1) * LAYERS if label == "on" else 0
        assert report.swaps.get("concat_linear", 0) == want, str(report)
        held[label] = saved_bytes(report.output.loss)
        report.output.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same_training_step(eager, (report.output.loss.detach(), grads), rtol=2e-3, atol=2e-4)
    assert held["on"] <= held["off"], held


def test_concat_linear_trains_like_eager_over_steps():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    base = _model()
    batches = [{k: v.cuda() for k, v in random_batch(seq=64, seed=s).items()} for s in range(4)]
    eager_model, ours = copy.deepcopy(base), copy.deepcopy(base)
    eager = train_losses(eager_model, batches, lr=1e-3)
    chronicals_compile.compile(ours, enable=["concat_linear"])
    compiled = train_losses(ours, batches, lr=1e-3)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-4)
    for (name, p), q in zip(ours.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")
