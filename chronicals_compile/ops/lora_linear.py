"""``chronicals::lora_linear``: a LoRA-adapted linear, base and adapter in one GEMM.

``y = x W^T + b + s (x A^T) B^T`` is what peft's ``Linear`` computes in three GEMMs and an add:
the base output and the adapter's output are each written in full ([tokens, out]) and read back
by the add (Inductor fuses it into the next pointwise kernel, which then reads both), and in
backward the incoming gradient is read once for the base's input gradient and twice more for the
adapter. Stacking the adapter along the reduction dimension, ``[x, t] [W, s B]^T`` with
``t = x A^T``, gives one GEMM whose output is written once; in backward ``g [W, s B]`` gives the
base's input gradient and the adapter's ``dt`` from one read of ``g``. It pays where the output is
wide (an MLP's gate and up: 4864 columns against 896 inputs at Qwen2.5-0.5B): the copy of ``x``
into ``[x, t]`` costs ``in + r`` columns, the saved traffic ``3 x out``.

Weight gradients are computed only for the tensors that need them, so a frozen base weight never
gets the full ``g^T x`` GEMM LoRA exists to avoid (why this is a custom op with its own backward:
autograd through ``cat([W, s B])`` would compute it). ``s t`` is the op's second output, kept for
the adapter's weight gradient. GEMMs run in the inputs' dtype with fp32 accumulation (cuBLAS, or
the CPU's), on every device.

Both ops are ``triton_op``s although they hold no Triton kernel: Dynamo and our passes see one
opaque op (and its backward is ours), but AOTAutograd decomposes the body into aten ops, so
Inductor launches the GEMMs and writes the concatenations itself. Why: an opaque op costs a
Python call through the custom-op dispatcher each time (tens of microseconds, measured on the
CPU), and the LoRA step on the H200 is bound by the host's launches (a 16.5 ms gap in a 117 ms
step, session 7); inside Inductor's wrapper each GEMM costs one extern-kernel call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def lora_linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                          scale: float) -> Tensor:
    """What the op equals: peft's three GEMMs and an add (tests compare against this)."""
    base = torch.nn.functional.linear(x, weight, bias)
    return base + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b) * scale


@torch.library.triton_op("chronicals::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float) -> tuple[Tensor, Tensor]:
    x2 = _rows(x)
    t = x2 @ lora_a.t()
    stacked_w = torch.cat([weight, lora_b * scale], dim=1)
    stacked_x = torch.cat([x2, t], dim=1)
    y = torch.addmm(bias, stacked_x, stacked_w.t()) if bias is not None else stacked_x @ stacked_w.t()
    # The second output is s * t, made here: Inductor writes t straight into stacked_x's buffer,
    # so anything computed from t later keeps that whole [tokens, in + r] buffer alive. When
    # the backward scaled t itself, the partition computed s * t at the end of the forward and
    # every layer's stacked_x lived until then: 1.3 GiB more peak at Qwen0.5B 8x2048 (session 8).
    return y.reshape(*x.shape[:-1], weight.shape[0]), t * scale


def _backward_math(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaled_t: Tensor,
                   scale: float, needs: list[bool]) -> tuple[Tensor, ...]:
    """The gradients in torch ops: the backward op's body, and differentiable as written when a
    caller asks for a second derivative (``create_graph=True``). ``scaled_t`` = s x A^T."""
    need_x, need_w, need_b, need_a, need_lb = needs
    g2, x2 = _rows(grad), _rows(x)
    dx, dw, db, da, dlb = (grad.new_empty((0,)) for _ in range(5))  # distinct: outputs may not alias
    if need_x or need_a:
        if need_x:
            # one read of g for the base's input gradient and the adapter's dt; [W, B] unscaled,
            # unlike the forward's [W, sB], so that no partition saves the forward's concatenation
            # for this (a copy of the frozen weight held to backward: 0.43 GiB at Qwen0.5B)
            dstacked = g2 @ torch.cat([weight, lora_b], dim=1)
            dt = dstacked[:, weight.shape[1]:] * scale
            dx = torch.addmm(dstacked[:, : weight.shape[1]], dt, lora_a).reshape(x.shape)
        else:
            dt = (g2 @ lora_b) * scale
        if need_a:
            da = dt.t() @ x2
    if need_lb:
        dlb = g2.t() @ scaled_t
    if need_w:
        dw = g2.t() @ x2
    if need_b:
        db = g2.sum(0)
    return dx, dw, db, da, dlb


@torch.library.triton_op("chronicals::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                         scaled_t: Tensor, scale: float,
                         needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``needs``: (x, weight, bias, lora_a, lora_b); a gradient not needed comes back empty."""
    return _backward_math(grad, x, weight, lora_a, lora_b, scaled_t, scale, needs)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])


def _backward(ctx, grad_y: Tensor, grad_t: Optional[Tensor]):
    x, weight, lora_a, lora_b, scaled_t = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    needs[2] = needs[2] and ctx.has_bias
    # a second derivative (create_graph=True) differentiates the same math in torch ops: s t is
    # rebuilt from x so that the adapter's gradient stays connected to lora_A
    if torch.is_grad_enabled():
        scaled_t = (_rows(x) @ lora_a.t()) * ctx.scale
        dx, dw, db, da, dlb = _backward_math(grad_y, x, weight, lora_a, lora_b, scaled_t, ctx.scale, needs)
    else:
        dx, dw, db, da, dlb = lora_linear_backward(grad_y, x, weight, lora_a, lora_b, scaled_t, ctx.scale, needs)
    grads = [g if need else None for g, need in zip((dx, dw, db, da, dlb), needs)]
    return (*grads, None)


lora_linear.register_autograd(_backward, setup_context=_setup_context)
