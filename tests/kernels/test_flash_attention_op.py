"""``chronicals::flash_attention``'s SDPA-math path (the specification flash-attn-4's kernels are
tested against on the GPU) against float64 on the output and every gradient; its autograd contract."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chronicals_compile.ops  # noqa: F401
from chronicals_compile.verify import flash_attention as case
from chronicals_compile.verify.tolerance import assert_all_ok


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), seq=st.sampled_from([1, 7, 33]), heads=st.sampled_from([(2, 2), (4, 2), (6, 1)]),
       head_dim=st.sampled_from([8, 24, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_matches_float64(batch, seq, heads, head_dim, dtype, seed):
    assert_all_ok(case.check(batch, seq, *heads, head_dim, dtype, seed=seed))


def test_qwen_heads_and_an_explicit_scale():
    assert_all_ok(case.check(1, 40, 14, 2, 64, torch.bfloat16))
    assert_all_ok(case.check(2, 9, 4, 4, 16, torch.float32, scale=0.3))


def test_output_layout_and_lse():
    q = torch.randn(2, 5, 4, 8).transpose(1, 2)
    k = torch.randn(2, 5, 2, 8).transpose(1, 2)
    out, lse = torch.ops.chronicals.flash_attention(q, k, k, 0.5)
    assert out.shape == (2, 4, 5, 8) and out.transpose(1, 2).is_contiguous()
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    expected = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected)


def test_double_backward():
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda *a: torch.ops.chronicals.flash_attention(*a, 0.35)[0], (q, k, v))


def test_opcheck_and_clear_errors():
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    torch.library.opcheck(torch.ops.chronicals.flash_attention.default, (q, k, k, 0.25))
    with pytest.raises(ValueError, match="do not fit query"):
        torch.ops.chronicals.flash_attention(q, torch.randn(1, 3, 6, 8), torch.randn(1, 3, 6, 8), 0.25)
    with pytest.raises(ValueError, match=r"must be \[B, H, S, D\]"):
        torch.ops.chronicals.flash_attention(q, k, torch.randn(1, 2, 6, 4), 0.25)
