"""SwiGLU / GeGLU on the GPU at real shapes: the Triton kernels against float64, and the op
through torch.compile (Inductor) against the reference."""
import pytest
import torch

from chronicals_compile.verify import swiglu as case
from chronicals_compile.verify.tolerance import assert_all_ok

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("rows,width", [(16384, 4864), (8192, 14336), (1, 4864), (33, 4863), (4097, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", case.ACTS)
def test_kernel_matches_float64(rows, width, dtype, act):
    assert_all_ok(case.check(rows=rows, width=width, dtype=dtype, act=act, layout="contiguous",
                             seed=rows + width, device="cuda"))


@pytest.mark.parametrize("layout", ["chunk", "strided", "3d"])
def test_layouts_at_real_width(layout):
    """chunk = the two halves of a fused gate_up projection, read in place (row stride 2w)."""
    for act in case.ACTS:
        assert_all_ok(case.check(rows=4096, width=4864, dtype=torch.bfloat16, act=act, layout=layout,
                                 seed=11, device="cuda"))


def test_more_than_65535_rows():
    assert_all_ok(case.check(rows=70000, width=8, dtype=torch.bfloat16, layout="chunk", seed=3, device="cuda"))


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_op_through_compile_matches_reference(name):
    import chronicals_compile.ops  # noqa: F401
    from chronicals_compile.ops.swiglu import geglu_reference, swiglu_reference

    op = getattr(torch.ops.chronicals, name)
    ref_fn = swiglu_reference if name == "swiglu" else geglu_reference
    gu = torch.randn(4, 512, 2 * 4864, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(lambda t: op(*t.chunk(2, dim=-1)))(gu)
    a, b = gu.detach().double().chunk(2, dim=-1)
    ref = ref_fn(a, b)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    out.sum().backward()
    assert gu.grad is not None and torch.isfinite(gu.grad).all()
