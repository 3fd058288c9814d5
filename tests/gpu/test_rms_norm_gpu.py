"""RMSNorm on the GPU at real shapes: the Triton kernel against float64, and a bf16 model step."""
import pytest
import torch

from chronicals_compile.verify import rms_norm as case
from chronicals_compile.verify.tolerance import assert_all_ok


@pytest.mark.parametrize("rows,hidden", [(16384, 896), (8192, 4096), (1, 896), (33, 5120), (4097, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_float64(rows, hidden, dtype):
    assert_all_ok(case.check(rows=rows, hidden=hidden, dtype=dtype, seed=rows + hidden, device="cuda"))


def test_non_contiguous_and_fp32_weight():
    assert_all_ok(case.check(rows=2048, hidden=896, dtype=torch.bfloat16, weight_dtype="float32",
                             non_contiguous=True, seed=7, device="cuda"))


def test_op_through_compile_matches_reference():
    from chronicals_compile.ops.rms_norm import rms_norm_reference

    x = torch.randn(4, 512, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(lambda a, b: torch.ops.chronicals.rms_norm(a, b, 1e-6))(x, w)
    ref = rms_norm_reference(x.double(), w.double(), 1e-6)
    assert (out.double() - ref).abs().max() < 0.05
