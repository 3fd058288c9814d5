"""Residual add + RMSNorm on the GPU at real shapes: the Triton kernels against float64 (s, y, the
shared input gradient, dweight), and the op inside an Inductor graph."""
import pytest
import torch

from chronicals_compile.verify import add_rms_norm as case
from chronicals_compile.verify.tolerance import assert_all_ok


@pytest.mark.parametrize("rows,hidden", [(16384, 896), (8192, 4096), (1, 896), (33, 5120), (4097, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_float64(rows, hidden, dtype):
    assert_all_ok(case.check(rows=rows, hidden=hidden, dtype=dtype, seed=rows + hidden, device="cuda"))


def test_non_contiguous_and_fp32_weight():
    assert_all_ok(case.check(rows=2048, hidden=896, dtype=torch.bfloat16, weight_dtype="float32",
                             non_contiguous=True, seed=7, device="cuda"))


def test_op_through_compile_matches_eager():
    """Both outputs and all three gradients, against float64 with the same-dtype eager error as bound."""
    import chronicals_compile.ops  # noqa: F401
    from chronicals_compile.ops.add_rms_norm import add_rms_norm_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(4, 512, 896, generator=gen, device="cuda").bfloat16().requires_grad_(True) for _ in range(2))
    w = (1 + 0.5 * torch.randn(896, generator=gen, device="cuda")).bfloat16().requires_grad_(True)
    grads = tuple(torch.randn(4, 512, 896, generator=gen, device="cuda").bfloat16() for _ in range(2))
    outs = torch.compile(lambda a, b, c: torch.ops.chronicals.add_rms_norm(a, b, c, 1e-6))(x, r, w)
    ours = (*outs, *torch.autograd.grad(outs, (x, r, w), grads))
    same_outs = add_rms_norm_reference(x, r, w, 1e-6)
    same = (*same_outs, *torch.autograd.grad(same_outs, (x, r, w), grads))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, r, w)]
    ref_outs = add_rms_norm_reference(*leaves64, 1e-6)
    ref = (*ref_outs, *torch.autograd.grad(ref_outs, leaves64, tuple(g.double() for g in grads)))
    for name, o, t, e in zip(("s", "y", "dx", "dr", "dw"), ours, same, ref):
        err, bound = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err == err and err <= 1.5 * bound + 1e-3 * e.abs().max().item(), (name, err, bound)
