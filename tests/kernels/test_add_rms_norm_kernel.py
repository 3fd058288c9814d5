"""Residual add + RMSNorm: the Triton kernels, interpreted on CPU, against float64 (s, y, the
shared input gradient, dweight), and the op's schema, fake kernel and autograd."""
import pytest
import torch
from hypothesis import given

import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*
from chronicals_compile.ops.add_rms_norm import add_rms_norm_reference
from chronicals_compile.verify import add_rms_norm as case
from chronicals_compile.verify.tolerance import assert_all_ok


@given(case.cases())
def test_matches_float64(params):
    assert_all_ok(case.check(**params))


@pytest.mark.parametrize("hidden", [896, 1000])
def test_single_row_real_hidden_sizes(hidden):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert_all_ok(case.check(rows=1, hidden=hidden, dtype=dtype, seed=hidden))


def test_op_schema_fake_and_autograd():
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(3, 5, 24, generator=gen, requires_grad=True) for _ in range(2))
    w = (1 + 0.5 * torch.randn(24, generator=gen)).requires_grad_(True)
    torch.library.opcheck(torch.ops.chronicals.add_rms_norm.default, (x, r, w, 1e-6))
    ds, dy = torch.randn(3, 5, 24, generator=gen), torch.randn(3, 5, 24, generator=gen)
    ours = torch.autograd.grad(torch.ops.chronicals.add_rms_norm(x, r, w, 1e-6), (x, r, w), (ds, dy))
    ref = torch.autograd.grad(add_rms_norm_reference(x, r, w, 1e-6), (x, r, w), (ds, dy))
    for o, t in zip(ours, ref):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6)


def test_mismatched_inputs_are_refused_by_name():
    from chronicals_compile.kernels.rms_norm import add_rms_norm_forward

    with pytest.raises(ValueError, match="residual"):
        torch.ops.chronicals.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64),
                                          torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_forward(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-6)
