"""``chronicals::rope(q, k, cos, sin) -> (q_out, k_out)``: QK rotary embedding in one launch.

``q`` is ``[B, Hq, S, D]`` and ``k`` is ``[B, Hk, S, D]`` (any strides; GQA: ``Hk`` may be
smaller), ``cos``/``sin`` broadcast to ``[B, 1, S, D]``. Each output equals transformers'
``x * cos + rotate_half(x) * sin`` with torch's type promotion: its dtype is
``promote(x, cos, sin)`` (fp32 when cos/sin are fp32 and q is bf16), computed in fp32 and rounded
once. Outputs keep their input's memory layout (``empty_like``), so the ``transpose`` views
Dynamo records cost no copy on either side.

Both are ``triton_op``s: under compile AOTAutograd traces the body, so Inductor launches the
Triton kernel from its own wrapper; as opaque custom ops each call cost the host a trip through
the dispatcher and Triton's Python launcher (the profiled H200 step showed the GPU waiting right
after every layer's rope, results/2026-12-04-h200-session14/call2, call4).

Backward is ``chronicals::rope_backward``, the inverse rotation of the incoming gradients; it
saves only cos and sin. cos/sin are not differentiated: the pass refuses matches where they
require grad, and the autograd formula raises rather than return a wrong (zero) gradient.

``chronicals::rope_interleaved`` (and its ``_backward``) is the same for GLM's ``rotate_half``,
which pairs element 2j with 2j + 1 instead of j with j + D/2.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _out_dtype(x: torch.dtype, cos: torch.dtype, sin: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x, cos), sin)


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype, backward: bool,
            interleaved: bool = False) -> Tensor:
    c = _compute(torch.promote_types(_out_dtype(out_dtype, cos.dtype, sin.dtype), x.dtype))
    xc, cc, sc = x.to(c), cos.to(c), sin.to(c)
    h = x.shape[-1] // 2
    if interleaved:  # GLM: pairs (2j, 2j + 1); rot = stack((-x[1::2], x[0::2]), -1).flatten(-2)
        if backward:
            gs = xc * sc
            value = xc * cc + torch.stack((gs[..., 1::2], -gs[..., 0::2]), dim=-1).flatten(-2)
        else:
            value = xc * cc + torch.stack((-xc[..., 1::2], xc[..., 0::2]), dim=-1).flatten(-2) * sc
    elif backward:  # transpose of rotate_half, applied to g * sin
        gs = xc * sc
        value = xc * cc + torch.cat((gs[..., h:], -gs[..., :h]), dim=-1)
    else:
        value = xc * cc + torch.cat((-xc[..., h:], xc[..., :h]), dim=-1) * sc
    out = torch.empty_like(x, dtype=out_dtype)
    out.copy_(value)
    return out


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                   interleaved: bool = False) -> tuple[Tensor, Tensor]:
    return (_rotate(q, cos, sin, _out_dtype(q.dtype, cos.dtype, sin.dtype), False, interleaved),
            _rotate(k, cos, sin, _out_dtype(k.dtype, cos.dtype, sin.dtype), False, interleaved))


def rope_backward_reference(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor,
                            q_dtype: torch.dtype, k_dtype: torch.dtype,
                            interleaved: bool = False) -> tuple[Tensor, Tensor]:
    return (_rotate(dq_out, cos, sin, q_dtype, True, interleaved),
            _rotate(dk_out, cos, sin, k_dtype, True, interleaved))


def rope_interleaved_backward_reference(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor,
                                        q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return rope_backward_reference(dq_out, dk_out, cos, sin, q_dtype, k_dtype, interleaved=True)


def _triton_ok(*tensors: Tensor) -> bool:
    return all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors)


def _check_shapes(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "chronicals::rope: q and k must be 4-D [B, H, S, D]")
    torch._check(q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3],
                 lambda: "chronicals::rope: q and k differ in batch, length or head dim")
    torch._check(q.shape[3] % 2 == 0, lambda: "chronicals::rope: head dim must be even")


def _define(name: str, interleaved: bool):
    """``chronicals::<name>`` and ``chronicals::<name>_backward`` with their kernels, fakes and
    autograd: the plain rotation (pairs j, j + D/2) and GLM's interleaved one (pairs 2j, 2j + 1)
    are the same ops but for the pair addresses."""

    @torch.library.triton_op(f"chronicals::{name}", mutates_args=())
    def forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        if q.device.type != "cuda" or not _triton_ok(q, k, cos, sin):
            return rope_reference(q, k, cos, sin, interleaved)
        from ..kernels.rope import rope_forward

        return rope_forward(q, k, cos, sin, interleaved=interleaved, wrap=True)

    @forward.register_fake
    def _(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        _check_shapes(q, k, cos, sin)
        return (torch.empty_like(q, dtype=_out_dtype(q.dtype, cos.dtype, sin.dtype)),
                torch.empty_like(k, dtype=_out_dtype(k.dtype, cos.dtype, sin.dtype)))

    @torch.library.triton_op(f"chronicals::{name}_backward", mutates_args=())
    def backward(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor,
                 q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if (dq_out.device.type != "cuda" or not _triton_ok(dq_out, dk_out, cos, sin)
                or torch.float64 in (q_dtype, k_dtype)):
            return rope_backward_reference(dq_out, dk_out, cos, sin, q_dtype, k_dtype, interleaved)
        from ..kernels.rope import rope_backward as launch

        return launch(dq_out, dk_out, cos, sin, q_dtype, k_dtype, interleaved=interleaved, wrap=True)

    @backward.register_fake
    def _(dq_out: Tensor, dk_out: Tensor, cos: Tensor, sin: Tensor,
          q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.empty_like(dq_out, dtype=q_dtype), torch.empty_like(dk_out, dtype=k_dtype)

    def setup_context(ctx, inputs, output) -> None:
        q, k, cos, sin = inputs
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)

    def grad(ctx, dq_out: Tensor, dk_out: Tensor):
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError(
                f"chronicals::{name} does not differentiate cos/sin; the rope pass should have refused "
                "this match (cos/sin require grad). Disable it with chronicals.disable=['rope'].")
        cos, sin = ctx.saved_tensors
        dq, dk = backward(dq_out, dk_out, cos, sin, *ctx.dtypes)
        return (dq if ctx.needs_input_grad[0] else None,
                dk if ctx.needs_input_grad[1] else None, None, None)

    forward.register_autograd(grad, setup_context=setup_context)
    return forward, backward


rope, rope_backward = _define("rope", interleaved=False)
rope_interleaved, rope_interleaved_backward = _define("rope_interleaved", interleaved=True)
