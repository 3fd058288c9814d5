"""Gated activations ``act(a) * b`` in Triton: SwiGLU (``act = silu``) and GeGLU (tanh GELU).

Elementwise and memory-bound: forward reads ``a`` and ``b`` once and writes the product once;
backward reads ``grad``, ``a`` and ``b`` once, recomputes the activation and its derivative in
registers, and writes ``da`` and ``db`` once. Nothing but ``a`` and ``b`` is saved between the two.

Math is fp32 whatever the storage dtype, rounded once on store. torch rounds ``act(a)`` to the
input dtype before multiplying, so for bf16/fp16 we are at least as close to the float64 result
as torch is (the project's tolerance rule), and the output dtype is the input dtype, as torch's.

Layouts: contiguous inputs are treated as one flat vector (long 16-byte-aligned blocks, no row
tail waste). Anything else is viewed as rows with a unit column stride and an arbitrary row
stride, which covers the halves of a fused ``gate_up`` projection split by ``chunk``/slicing
without a copy. The 1-D grid is split into (row, column block) by division, so neither the row
count nor the width is limited by CUDA's 65535 limit on the second grid axis.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Activation codes, shared with ``ops/swiglu.py``.
SILU = 0
GELU_TANH = 1

@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: accurate to fp32 rounding in absolute terms, which is what
    # the gates need (it only ever appears as 1 + tanh or 1 - tanh^2). Interpreter-safe.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _gated_fwd(A, B, Y, stride_a, stride_b, stride_y, N, n_col_blocks,
               ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        act = a / (1.0 + tl.exp(-a))
    else:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        act = 0.5 * a * (1.0 + _tanh(inner))
    tl.store(Y + row * stride_y + cols, (act * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd(DY, A, B, DA, DB, stride_dy, stride_a, stride_b, stride_da, stride_db, N, n_col_blocks,
               ACT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_col_blocks
    cols = (pid % n_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-a))
        act = a * s
        dact = s * (1.0 + a * (1.0 - s))
    else:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = _tanh(inner)
        act = 0.5 * a * (1.0 + t)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
        dact = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dinner
    tl.store(DA + row * stride_da + cols, (dy * b * dact).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + row * stride_db + cols, (dy * act).to(DB.dtype.element_ty), mask=mask)


def _block(n: int) -> tuple[int, int]:
    """Column block: the largest of 4096/2048/1024 that pads a row by at most 1/8 (a 4864-wide
    row split 4096 + 768 would idle 40% of the lanes of every second program), else the one
    padding least; below 1024 the next power of two."""
    if n <= 1024:
        block = max(16, triton.next_power_of_2(n))
    else:
        padded = {b: triton.cdiv(n, b) * b for b in (4096, 2048, 1024)}
        good = [b for b in (4096, 2048, 1024) if padded[b] * 8 <= n * 9]
        block = good[0] if good else min(padded, key=lambda b: (padded[b], -b))
    return block, (4 if block <= 1024 else 8)


def _check(*ts: torch.Tensor) -> None:
    if any(t.shape != ts[0].shape for t in ts):
        raise ValueError(f"gated activation: shapes differ {[tuple(t.shape) for t in ts]}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [rows, width] with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _flat_ok(*ts: torch.Tensor) -> bool:
    return all(t.is_contiguous() for t in ts)


def _grid(m: int, n: int, block: int) -> tuple[int, int]:
    n_col_blocks = triton.cdiv(n, block)
    return n_col_blocks, m * n_col_blocks


def gated_forward(a: torch.Tensor, b: torch.Tensor, act: int) -> torch.Tensor:
    """``act(a) * b`` in ``a.dtype``; ``a`` and ``b`` have the same shape and dtype."""
    _check(a, b)
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.numel() == 0:
        return y
    if _flat_ok(a, b):
        a2, b2, y2 = a.reshape(1, -1), b.reshape(1, -1), y.view(1, -1)
    else:
        a2, b2, y2 = _rows(a), _rows(b), y.view(-1, a.shape[-1])
    m, n = y2.shape
    block, warps = _block(n)
    n_col_blocks, programs = _grid(m, n, block)
    _gated_fwd[(programs,)](a2, b2, y2, a2.stride(0), b2.stride(0), y2.stride(0), n, n_col_blocks,
                            ACT=act, BLOCK=block, num_warps=warps)
    return y


def gated_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, db)`` for ``y = act(a) * b``; gradients in the inputs' dtypes and shapes."""
    _check(grad, a, b)
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    if a.numel() == 0:
        return da, db
    if _flat_ok(grad, a, b):
        views = [t.reshape(1, -1) for t in (grad, a, b)] + [da.view(1, -1), db.view(1, -1)]
    else:
        views = [_rows(t) for t in (grad, a, b)] + [da.view(-1, a.shape[-1]), db.view(-1, b.shape[-1])]
    dy2, a2, b2, da2, db2 = views
    m, n = da2.shape
    block, warps = _block(n)
    n_col_blocks, programs = _grid(m, n, block)
    _gated_bwd[(programs,)](dy2, a2, b2, da2, db2, dy2.stride(0), a2.stride(0), b2.stride(0),
                            da2.stride(0), db2.stride(0), n, n_col_blocks,
                            ACT=act, BLOCK=block, num_warps=warps)
    return da, db
