"""``chronicals::add_rms_norm``: the decoder's residual add and the RMSNorm after it, one op.

``s = x + residual`` is the residual stream (read again by the next residual add) and
``y = rms_norm(s)`` feeds the next projection, so the op returns both. Its backward takes the
gradient of ``y`` and the gradient ``s`` receives from its other readers, and gives ``x`` and
``residual`` the same total gradient. No pass swaps it in yet: Inductor already fuses the add
into its own RMSNorm kernel, and ours goes in only where the H200 microbenchmark
(``benchmarks/bench_add_rms_norm.py``) shows it faster.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rms_norm import rms_norm_backward_reference, rms_norm_reference


def add_rms_norm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return s, rms_norm_reference(s, weight, eps)


def _check(x: Tensor, residual: Tensor) -> None:
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"chronicals::add_rms_norm: x and residual must have one shape and dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}")


@torch.library.custom_op("chronicals::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check(x, residual)
    s, y = add_rms_norm_reference(x, residual, weight, eps)
    return s, y


@add_rms_norm.register_kernel("cuda")
def _add_rms_norm_cuda(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels.rms_norm import add_rms_norm_forward

    return add_rms_norm_forward(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check(x, residual)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def add_rms_norm_backward_reference(grad_y: Tensor, grad_s: Tensor, s: Tensor, weight: Tensor,
                                    eps: float) -> tuple[Tensor, Tensor]:
    """``(d s, d weight)``: the norm's input gradient plus what ``s``'s other readers sent back,
    summed in fp32 and rounded once (as the kernel does)."""
    dx, dw = rms_norm_backward_reference(grad_y, s, weight, eps)
    return (dx.float() + grad_s.float()).to(s.dtype), dw


@torch.library.custom_op("chronicals::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward(grad_y: Tensor, grad_s: Tensor, s: Tensor, weight: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
    return add_rms_norm_backward_reference(grad_y, grad_s, s, weight, eps)


@add_rms_norm_backward.register_kernel("cuda")
def _add_rms_norm_backward_cuda(grad_y: Tensor, grad_s: Tensor, s: Tensor, weight: Tensor,
                                eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels.rms_norm import rms_norm_backward

    return rms_norm_backward(grad_y.contiguous(), s, weight, eps, grad_x_extra=grad_s.contiguous())


@add_rms_norm_backward.register_fake
def _(grad_y: Tensor, grad_s: Tensor, s: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return s.new_empty(s.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, _, weight, eps = inputs
    s, _ = output
    ctx.save_for_backward(s, weight)  # s, not x and residual: one tensor saved instead of two
    ctx.eps = eps


def _backward(ctx, grad_s: Tensor, grad_y: Tensor):
    s, weight = ctx.saved_tensors
    ds, dw = add_rms_norm_backward(grad_y, grad_s, s, weight, ctx.eps)
    return (ds if ctx.needs_input_grad[0] else None, ds if ctx.needs_input_grad[1] else None,
            dw if ctx.needs_input_grad[2] else None, None)


add_rms_norm.register_autograd(_backward, setup_context=_setup_context)
