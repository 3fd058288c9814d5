"""``chronicals::gated_mlp``'s torch path (the layout QuACK's kernels compute, and their GPU
tests' specification) against float64 on the output and every gradient; its autograd contract."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import chronicals_compile.ops  # noqa: F401
from chronicals_compile.verify import gated_mlp as case
from chronicals_compile.verify.tolerance import assert_all_ok


@given(rows=st.integers(1, 40), d=st.sampled_from([8, 24, 64]), f=st.sampled_from([16, 40, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       activation=st.sampled_from(["swiglu", "geglu"]), three_d=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_float64(rows, d, f, dtype, activation, three_d, seed):
    shape = (2, rows, d) if three_d else (rows, d)
    assert_all_ok(case.check(shape, f, dtype, activation, seed=seed))


def test_qwen_width_and_non_contiguous_input():
    assert_all_ok(case.check((7, 896), 4864 // 8, torch.bfloat16))
    assert_all_ok(case.check((2, 9, 64), 96, torch.float32, transposed_x=True))


def test_frozen_weights_and_double_backward():
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(24, 16, dtype=torch.float64) * 0.3, torch.randn(24, 16, dtype=torch.float64) * 0.3,
          (torch.randn(16, 24, dtype=torch.float64) * 0.3).requires_grad_()]
    y, *_ = torch.ops.chronicals.gated_mlp(x, *ws, "swiglu")
    y.sum().backward()
    assert ws[0].grad is None and ws[1].grad is None and x.grad.abs().sum() > 0
    ws = [w.detach().requires_grad_() for w in ws]
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.chronicals.gated_mlp(*a, "geglu")[0], (x, *ws))


def test_opcheck_and_clear_errors():
    x, w = torch.randn(3, 8), torch.randn(16, 8)
    torch.library.opcheck(torch.ops.chronicals.gated_mlp.default, (x, w, w, torch.randn(8, 16), "swiglu"))
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.chronicals.gated_mlp(x, w, w, torch.randn(8, 16), "relu")
    with pytest.raises(ValueError, match="shapes do not chain"):
        torch.ops.chronicals.gated_mlp(x, w, w, torch.randn(8, 12), "swiglu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_weight_gives_the_same_bits(dtype):
    """``keep_weight`` only moves where the backward's interleaved weight comes from: the third
    output is the interleaved weight (empty without it), and the output and every gradient are
    bit-identical either way."""
    from chronicals_compile.ops.gated_mlp import _interleave

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=gen).to(dtype)
    ws = [(torch.randn(40, 24, generator=gen) / 5).to(dtype), (torch.randn(40, 24, generator=gen) / 5).to(dtype),
          (torch.randn(24, 40, generator=gen) / 6).to(dtype)]
    dy = torch.randn(2, 7, 24, generator=gen).to(dtype)
    results = {}
    for keep in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *ws)]
        y, preact, w1 = torch.ops.chronicals.gated_mlp(*leaves, "swiglu", keep)
        grads = torch.autograd.grad(y, leaves, dy)
        results[keep] = [y, preact, *grads]
        if keep:
            assert torch.equal(w1, _interleave(ws[0], ws[1]))
        else:
            assert w1.numel() == 0
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.chronicals.gated_mlp.default,
                          (x.float(), ws[0].float(), ws[1].float(), ws[2].float(), "swiglu", True))
