"""The SwiGLU / GeGLU Triton kernels, interpreted on CPU, against float64 on out, da and db."""
import math

import pytest
import torch
from hypothesis import given

from chronicals_compile.verify import swiglu as case
from chronicals_compile.verify.tolerance import assert_all_ok, measure


@given(case.cases())
def test_matches_float64(params):
    assert_all_ok(case.check(**params))


@pytest.mark.parametrize("act", case.ACTS)
@pytest.mark.parametrize("layout", case.LAYOUTS)
def test_every_layout_and_dtype(act, layout):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_all_ok(case.check(rows=3, width=4864 // 16 + 1, dtype=dtype, act=act, layout=layout, seed=7))


def test_expanded_and_transposed_gradients():
    """Incoming gradients may be stride-0 expansions or transposed: results must not change."""
    from chronicals_compile.kernels.swiglu import SILU, gated_backward
    from chronicals_compile.ops.swiglu import gated_backward_reference

    a, b = torch.randn(6, 10), torch.randn(6, 10)
    for grad in (torch.ones(()).expand(6, 10), torch.randn(10, 6).t(), torch.randn(6, 1).expand(6, 10)):
        ours = gated_backward(grad, a, b, SILU)
        ref = gated_backward_reference(grad.contiguous(), a, b, SILU)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r)
            assert o.is_contiguous()


@pytest.mark.parametrize("act", case.ACTS)
def test_nan_and_inf_propagate_like_torch(act):
    from chronicals_compile.kernels.swiglu import GELU_TANH, SILU, gated_forward

    a, b = torch.randn(4, 16), torch.randn(4, 16)
    a[1, 3], a[2, 5], a[3, 7], b[0, 2] = math.nan, math.inf, -math.inf, math.nan
    ours = gated_forward(a, b, SILU if act == "silu" else GELU_TANH)
    ref = case.torch_gated(a.double(), b.double(), act)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert measure("out", ours, case.torch_gated(a, b, act), ref).ok


def test_nan_never_passes():
    """The rule itself: a NaN we invent fails, however large torch's own error is."""
    ref = torch.randn(8, dtype=torch.float64)
    ours = ref.float().clone()
    ours[3] = math.nan
    assert not measure("out", ours, ref.float() + 100, ref).ok


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_opcheck(name):
    import chronicals_compile.ops  # noqa: F401

    op = getattr(torch.ops.chronicals, name).default
    a, b = torch.randn(3, 2 * 7, requires_grad=True).chunk(2, dim=-1)  # strided halves
    torch.library.opcheck(op, (a, b))
    torch.library.opcheck(op, (torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True),
                               torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)))


def test_op_gradcheck_float64():
    import chronicals_compile.ops  # noqa: F401

    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.chronicals.swiglu, (a, b))
    assert torch.autograd.gradcheck(torch.ops.chronicals.geglu, (a, b))
