"""``chronicals::swiglu`` and ``chronicals::geglu``: ``act(a) * b`` as one opaque op each.

``swiglu(a, b) = silu(a) * b`` (Llama, Qwen2, Mistral MLPs); ``geglu(a, b) = gelu_tanh(a) * b``
(Gemma's ``gelu_pytorch_tanh`` gate). Same kernel family, one ``ACT`` switch. ``a`` and ``b``
must have the same shape and dtype (the pass refuses anything else); the result has that dtype
and a contiguous layout. Backward saves only ``a`` and ``b`` and recomputes the activation.

CUDA runs the Triton kernels; every other device runs the torch reference below, which computes
in fp32 (fp64 stays fp64) and rounds once: the specification of what the kernels compute.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Activation codes, the same as ``kernels.swiglu``'s (not imported: Triton loads lazily).
SILU, GELU_TANH = 0, 1

_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _act(a: Tensor, act: int) -> Tensor:
    return F.silu(a) if act == SILU else F.gelu(a, approximate="tanh")


def _act_and_grad(a: Tensor, act: int) -> tuple[Tensor, Tensor]:
    """``act(a)`` and ``act'(a)``, written out (autograd does not record inside an op)."""
    if act == SILU:
        s = torch.sigmoid(a)
        return a * s, s * (1 + a * (1 - s))
    t = torch.tanh(_K * (a + _C * a * a * a))
    dinner = _K * (1 + 3 * _C * a * a)
    return 0.5 * a * (1 + t), 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * dinner


def gated_reference(a: Tensor, b: Tensor, act: int) -> Tensor:
    c = _compute_dtype(a.dtype)
    return (_act(a.to(c), act) * b.to(c)).to(a.dtype).contiguous()


def gated_backward_reference(grad: Tensor, a: Tensor, b: Tensor, act: int) -> tuple[Tensor, Tensor]:
    c = _compute_dtype(a.dtype)
    g, af, bf = grad.to(c), a.to(c), b.to(c)
    value, slope = _act_and_grad(af, act)
    return (g * bf * slope).to(a.dtype).contiguous(), (g * value).to(b.dtype).contiguous()


def swiglu_reference(a: Tensor, b: Tensor) -> Tensor:
    return gated_reference(a, b, SILU)


def geglu_reference(a: Tensor, b: Tensor) -> Tensor:
    return gated_reference(a, b, GELU_TANH)


def _triton_ok(*tensors: Tensor) -> bool:
    """The kernels compute in fp32: float64 (or a dtype mix the pass never produces) takes the
    reference path, which is exact for it."""
    return all(t.dtype == tensors[0].dtype for t in tensors) and \
        tensors[0].dtype in (torch.float32, torch.bfloat16, torch.float16)


def _register(name: str, act: int):
    """Define ``chronicals::{name}`` and ``chronicals::{name}_backward`` for one activation."""

    @torch.library.custom_op(f"chronicals::{name}", mutates_args=())
    def forward(a: Tensor, b: Tensor) -> Tensor:
        return gated_reference(a, b, act)

    @forward.register_kernel("cuda")
    def _(a: Tensor, b: Tensor) -> Tensor:
        if not _triton_ok(a, b):
            return gated_reference(a, b, act)
        from ..kernels.swiglu import gated_forward

        return gated_forward(a, b, act)

    @forward.register_fake
    def _(a: Tensor, b: Tensor) -> Tensor:
        torch._check(a.dim() == b.dim(), lambda: f"chronicals::{name}: a and b shapes differ")
        for x, y in zip(a.shape, b.shape):
            torch._check(x == y, lambda: f"chronicals::{name}: a and b shapes differ")
        return a.new_empty(a.shape)

    @torch.library.custom_op(f"chronicals::{name}_backward", mutates_args=())
    def backward(grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return gated_backward_reference(grad, a, b, act)

    @backward.register_kernel("cuda")
    def _(grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if not _triton_ok(grad, a, b):
            return gated_backward_reference(grad, a, b, act)
        from ..kernels.swiglu import gated_backward

        return gated_backward(grad, a, b, act)

    @backward.register_fake
    def _(grad: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return a.new_empty(a.shape), b.new_empty(b.shape)

    def setup_context(ctx, inputs, output) -> None:
        a, b = inputs
        ctx.save_for_backward(a, b)

    def autograd_backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        da, db = backward(grad, a, b)
        return (da if ctx.needs_input_grad[0] else None,
                db if ctx.needs_input_grad[1] else None)

    forward.register_autograd(autograd_backward, setup_context=setup_context)
    return forward, backward


swiglu, swiglu_backward = _register("swiglu", SILU)
geglu, geglu_backward = _register("geglu", GELU_TANH)
