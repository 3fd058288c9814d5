"""``chronicals::lora_linear`` on CUDA: bf16/fp16 output and every gradient within the reference's
own error against fp64 at a Qwen2.5-0.5B MLP shape, and a compiled peft model's step equal to
eager's with the pass on (fp32 without TF32: cuBLAS tiles the stacked GEMM differently)."""
import copy

import pytest
import torch

import chronicals_compile
import chronicals_compile.ops  # noqa: F401
from chronicals_compile.ops.lora_linear import lora_linear_reference
from chronicals_compile.testing import random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, loss_and_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def _grads(fn, leaves, weight):
    out = fn(*leaves)
    (out * weight).sum().backward()
    return [out.detach(), *[t.grad if t is not None and t.grad is not None else None for t in leaves]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frozen_base", [True, False], ids=["lora", "trainable-base"])
def test_op_within_reference_error(dtype, frozen_base):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, width, out, r = 4099, 896, 4864, 32
    x = torch.randn(rows, width, device="cuda", generator=gen)
    w = torch.randn(out, width, device="cuda", generator=gen) * width ** -0.5
    a = torch.randn(r, width, device="cuda", generator=gen) * width ** -0.5
    lb = torch.randn(out, r, device="cuda", generator=gen) * 0.02
    weight = torch.randn(rows, out, device="cuda", generator=gen)
    needs = (True, not frozen_base, None, True, True)

    def prepared(to):
        return [t.to(to).requires_grad_(need) if t is not None else None for t, need in zip((x, w, None, a, lb), needs)]

    ours = _grads(lambda *t: torch.ops.chronicals.lora_linear(*t, 2.0)[0], prepared(dtype), weight.to(dtype))
    ref = _grads(lambda *t: lora_linear_reference(*t, 2.0), prepared(dtype), weight.to(dtype))
    exact = _grads(lambda *t: lora_linear_reference(*t, 2.0), prepared(torch.float64), weight.double())
    for name, o, rf, e in zip(("y", "x", "weight", "bias", "lora_A", "lora_B"), ours, ref, exact):
        if e is None:
            assert o is None, name
            continue
        assert not torch.isnan(o).any(), name
        slack = 2 * torch.finfo(dtype).eps * e.abs().max().item()
        assert (o.double() - e).abs().max().item() <= (rf.double() - e).abs().max().item() + slack, name


def test_compiled_peft_step_equals_eager_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    base = with_lora(tiny_model("qwen2", layers=2, hidden=128, heads=8, kv_heads=2, intermediate=384)).cuda()
    batch = {k: v.cuda() for k, v in random_batch(seq=64).items()}
    eager = loss_and_grads(copy.deepcopy(base), batch)
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    report = chronicals_compile.explain(model, options={"enable": ["lora_linear", "concat_linear"]}, **batch)
    assert report.swaps.get("lora_linear") == 4, str(report)
    report.output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_training_step(eager, (report.output.loss.detach(), grads), rtol=2e-3, atol=2e-4)
