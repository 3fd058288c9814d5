"""RMSNorm forward and backward in Triton, with the Llama cast order; optionally with the residual
add before it (``add_rms_norm_forward``).

``out = weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``: the normalised
value is rounded to ``x.dtype`` before the weight multiplies it, exactly as transformers does,
so the fused result matches the unfused graph bit for bit in spirit and within rounding in fact.

Backward saves nothing: ``rstd`` is recomputed from ``x``, which backward reads anyway, so a
saved ``rstd`` would only add a write and a read. The weight gradient is reduced per program
into fp32 partial rows, then summed once by torch: no atomics, deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(X, R, S, W, Y, stride_x, stride_r, stride_s, stride_y, M, N, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows[:, None].to(tl.int64)
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s = x + residual, rounded to the input dtype as torch's add rounds it
        res = tl.load(R + r64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s_val = (x + res).to(X.dtype.element_ty)
        tl.store(S + r64 * stride_s + cols[None, :], s_val, mask=mask)
        x = s_val.to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    normed = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    y = w[None, :] * normed
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, DS, X, W, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x, stride_dx, M, N, eps,
                  ROWS_PER_PROGRAM, HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for start in range(first, first + ROWS_PER_PROGRAM, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (rows < first + ROWS_PER_PROGRAM)
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows[:, None].to(tl.int64)
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        xhat = x * rstd[:, None]
        dw_acc += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w[None, :]
        dot = tl.sum(g * xhat, axis=1) / N
        dx = rstd[:, None] * (g - xhat * dot[:, None])
        if HAS_DS:  # the gradient reaching x = a + b from its other readers (the residual stream)
            dx += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


def _block_sizes(n: int) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    num_warps = 4 if block_n <= 2048 else (8 if block_n <= 8192 else 16)
    return block_m, block_n, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m:
        block_m, block_n, num_warps = _block_sizes(n)
        _rms_norm_fwd[(triton.cdiv(m, block_m),)](
            x2, x2, x2, weight.contiguous(), y, x2.stride(0), 0, 0, y.stride(0), m, n, float(eps),
            HAS_RESIDUAL=False, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return y.view(x.shape)


def add_rms_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, rms_norm(s))`` with ``s = x + residual``: the decoder's residual add and the next
    norm in one pass (reads x, residual, w; writes s, y), the fusion Inductor also makes."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x and residual must match: {tuple(x.shape)} {x.dtype} vs "
                         f"{tuple(residual.shape)} {residual.dtype}")
    n = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    m = x2.shape[0]
    s_out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    y = torch.empty((m, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if m:
        block_m, block_n, num_warps = _block_sizes(n)
        _rms_norm_fwd[(triton.cdiv(m, block_m),)](
            x2, r2, s_out, weight.contiguous(), y, x2.stride(0), r2.stride(0), s_out.stride(0), y.stride(0),
            m, n, float(eps), HAS_RESIDUAL=True, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return s_out.view(x.shape), y.view(x.shape)


#: Backward launch shape by hidden size: (programs per SM, rows per loop step). Each program walks
#: its rows and keeps one fp32 partial dweight row, so fewer programs mean fewer partial rows to sum
#: but less latency hiding. From the H200 sweep (benchmarks/results/2026-11-28-h200-session3/
#: rms_norm_bwd_sweep.md, kernel time under CUDA graphs, bf16): the best measured shape per width,
#: each faster than Inductor's fused backward of the same function (compile -> ours, ms):
#: 16384x896 0.047 -> 0.045 (8, 1); 8192x2048 0.057 -> 0.042 (2, 4); 8192x4096 0.108 -> 0.085 and
#: 16384x4096 0.260 -> 0.155 (2, 1); 4096x5120 0.082 -> 0.077 (1, 1). Four rows a step at 5120
#: spill registers (1.0 ms), hence one row a step past 4096.
BWD_LAUNCH: tuple[tuple[int, int, int], ...] = (  # (widest hidden size, programs per SM, rows per step)
    (1024, 8, 1),
    (2048, 2, 4),
    (4096, 2, 1),
    (1 << 62, 1, 1),
)


def _bwd_launch(n: int) -> tuple[int, int]:
    return next((per_sm, rows) for widest, per_sm, rows in BWD_LAUNCH if n <= widest)


def _num_programs(device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * per_sm  # the interpreter: a handful, so that tests cross program boundaries


def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                      grad_x_extra: torch.Tensor | None = None, programs_per_sm: int | None = None,
                      block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_x_extra``: a gradient that also reaches ``x`` (its other readers), added in fp32
    before the one rounding (the backward of ``add_rms_norm_forward`` with ``x`` = its ``s``).
    ``programs_per_sm`` and ``block_m`` (rows per loop step, a power of two) override the
    launch shape; the defaults come from ``BWD_LAUNCH``."""
    n = x.shape[-1]
    x2 = _rows(x)
    dy = _rows(grad_out)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _, block_n, num_warps = _block_sizes(n)
    default_per_sm, default_m = _bwd_launch(n)
    block_m = block_m or default_m
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    per_sm = programs_per_sm or default_per_sm
    programs = max(1, min(_num_programs(x.device, per_sm), triton.cdiv(m, block_m)))
    rows_per_program = triton.cdiv(max(m, 1), programs)
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    ds = dy if grad_x_extra is None else _rows(grad_x_extra)
    _rms_norm_bwd[(programs,)](
        dy, ds, x2, weight.contiguous(), dx, partial, dy.stride(0), ds.stride(0), x2.stride(0), dx.stride(0),
        m, n, float(eps), rows_per_program, HAS_DS=grad_x_extra is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)
