"""The Triton kernels of benchmarks/bench_mlp_epilogue.py (a GEMM with the SwiGLU forward or
backward in its epilogue) against torch, through the interpreter: the benchmark checks them on
the GPU before it times them, this keeps their math honest in CI. fp16 and fp32 (the interpreter's
bf16 tl.dot is wrong), ragged shapes so every tile edge is masked."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_mlp_epilogue as bench  # noqa: E402

META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}


def _inputs(m, k, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    dy = torch.randn(m, k, generator=gen).to(dtype)
    w_gate = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    w_up = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    w_down = (torch.randn(k, n, generator=gen) * n ** -0.5).to(dtype)
    return x, dy, w_gate, w_up, w_down


def _assert_close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(got, want):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m, k, n", [(37, 40, 52), (1, 16, 17), (37, 48, 56)])
def test_backward_epilogue_matches_torch(m, k, n, dtype):
    x, dy, w_gate, w_up, w_down = _inputs(m, k, n, dtype, m + n)
    g = (x.float() @ w_gate.float().t()).to(dtype)
    u = (x.float() @ w_up.float().t()).to(dtype)
    h, dg, du = (torch.empty(m, n, dtype=dtype) for _ in range(3))
    grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
    bench._mm_swiglu_bwd_kernel.fn[grid](dy, w_down, g, u, h, dg, du, m, n, k, dy.stride(0), w_down.stride(0),
                                         h.stride(0), EPILOGUE=True, **META)
    dh = (dy.float() @ w_down.float()).to(dtype)
    want_h, want_dg, want_du = bench._silu_bwd(dh, g, u)
    _assert_close((h, dg, du), (want_h, want_dg, want_du), dtype)
    if k % 8 == 0 and n % 8 == 0:  # tensor descriptors need 16-byte-aligned rows
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
        h2, dg2, du2 = (torch.empty(m, n, dtype=dtype) for _ in range(3))
        bench._mm_swiglu_bwd_persistent_kernel.fn[(3,)](dy, w_down, g, u, h2, dg2, du2, m, n, k, EPILOGUE=True,
                                                      WARP_SPECIALIZE=False, NUM_SMS=3, **META)
        _assert_close((h2, dg2, du2), (want_h, want_dg, want_du), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_forward_epilogue_matches_torch(dtype):
    m, k, n = 37, 40, 52
    x, _, w_gate, w_up, _ = _inputs(m, k, n, dtype, 3)
    g, u, h = (torch.empty(m, n, dtype=dtype) for _ in range(3))
    grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
    bench._mm_swiglu_fwd_kernel.fn[grid](x, w_gate, w_up, g, u, h, m, n, k, x.stride(0), w_gate.stride(0),
                                         g.stride(0), **META)
    want_g = (x.float() @ w_gate.float().t()).to(dtype)
    want_u = (x.float() @ w_up.float().t()).to(dtype)
    _assert_close((g, u, h), (want_g, want_u, bench._silu_mul(want_g, want_u)), dtype)
