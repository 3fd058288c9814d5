"""The RMSNorm Triton kernel, interpreted on CPU, against float64 on output, dx and dweight."""
import math

import pytest
import torch
from hypothesis import given

from chronicals_compile.kernels.rms_norm import BWD_LAUNCH
from chronicals_compile.verify import rms_norm as case
from chronicals_compile.verify.tolerance import assert_all_ok


@given(case.cases())
def test_matches_float64(params):
    assert_all_ok(case.check(**params))


@pytest.mark.parametrize("hidden", [896, 1000])
def test_single_row_real_hidden_sizes(hidden):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_all_ok(case.check(rows=1, hidden=hidden, dtype=dtype, seed=hidden))


def test_nan_and_inf_propagate_like_torch():
    from chronicals_compile.kernels.rms_norm import rms_norm_forward
    from chronicals_compile.ops.rms_norm import rms_norm_reference

    x = torch.randn(4, 16)
    x[1, 3] = math.nan
    x[2, 5] = math.inf
    w = torch.randn(16)
    ours, ref = rms_norm_forward(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.isnan(ours[1]).all() and torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[[0, 3]], ref[[0, 3]])


@pytest.mark.parametrize("per_sm,rows_per_step", sorted({(p, r) for _, p, r in BWD_LAUNCH}))
def test_every_gpu_backward_launch_shape_is_exact(per_sm, rows_per_step):
    """The GPU picks its launch shape by hidden size (BWD_LAUNCH); each shape is proven here on a
    width the interpreter can afford, with rows that leave the last program a partial share."""
    from chronicals_compile.kernels.rms_norm import rms_norm_backward
    from chronicals_compile.ops.rms_norm import rms_norm_reference

    torch.manual_seed(per_sm * 10 + rows_per_step)
    x = torch.randn(37, 48, dtype=torch.float64).float().requires_grad_()
    w = (torch.rand(48) + 0.5).requires_grad_()
    dy = torch.randn(37, 48)
    dx, dw = rms_norm_backward(dy, x.detach(), w.detach(), 1e-6, programs_per_sm=per_sm, block_m=rows_per_step)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64, 1e-6).backward(dy.double())
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-5, atol=1e-5)
