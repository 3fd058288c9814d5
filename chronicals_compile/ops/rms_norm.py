"""``chronicals::rms_norm``: the op the RMSNorm pass swaps in.

Opaque to the compiler on purpose: Inductor cannot see inside it and so cannot undo the fusion,
and AOTAutograd joins our registered backward (itself an op) to the joint graph. CUDA runs the
Triton kernel; every other device runs the torch reference, which is also the specification.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@torch.library.custom_op("chronicals::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_kernel("cuda")
def _rms_norm_cuda(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    from ..kernels.rms_norm import rms_norm_forward

    return rms_norm_forward(x, weight, eps)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def rms_norm_backward_reference(grad_out: Tensor, x: Tensor, weight: Tensor,
                                eps: float) -> tuple[Tensor, Tensor]:
    """``(dx, dweight)`` of :func:`rms_norm_reference`, written out (autograd does not record
    inside a custom op's implementation); ``rstd`` is recomputed from ``x``, as the kernel does."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    g = grad_out.float()
    dw = (g * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    gn = g * weight.float()
    dx = rstd * (gn - xhat * (gn * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw.to(weight.dtype)


@torch.library.custom_op("chronicals::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return rms_norm_backward_reference(grad_out, x, weight, eps)


@rms_norm_backward.register_kernel("cuda")
def _rms_norm_backward_cuda(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels.rms_norm import rms_norm_backward as launch

    return launch(grad_out.contiguous(), x, weight, eps)


@rms_norm_backward.register_fake
def _(grad_out: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx, grad_out: Tensor):
    x, weight = ctx.saved_tensors
    dx, dw = rms_norm_backward(grad_out, x, weight, ctx.eps)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if ctx.needs_input_grad[1] else None, None)


rms_norm.register_autograd(_backward, setup_context=_setup_context)
