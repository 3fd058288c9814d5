"""``chronicals::flash_attention``: causal, unmasked, dropout-free attention with grouped heads,
``sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=True)`` exactly, on flash-attn-4's kernels.

Why an op of ours and not SDPA's backend choice: SDPA cannot be pointed at FA4, and the compiled
graph must see one opaque node whose backward is FA4's too. What is saved for backward is what
SDPA's flash backends save: q, k, v, the output and the fp32 log-sum-exp.

CUDA with FA4 (``kernels.flash_attention4``) runs its kernels; elsewhere the op runs SDPA's math,
the specification the GPU path is tested against, so CPU tests of the pass exercise the same op.
A second derivative (``create_graph=True``) differentiates the same math in plain ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import flash_attention4


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _twice_differentiable(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The same function in plain ops, for ``create_graph=True`` (SDPA's CPU kernels have no
    second derivative)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    return torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1) @ v


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"chronicals::flash_attention: q, k, v must be [B, H, S, D] with k and v alike, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"chronicals::flash_attention: key/value {tuple(k.shape)} do not fit query {tuple(q.shape)} "
                         "(same batch, length and head dim; query heads a multiple of key heads)")


def _fast(q: Tensor, k: Tensor, v: Tensor) -> bool:
    return (q.dtype == k.dtype == v.dtype and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and flash_attention4.unavailable_reason(q.device, q.dtype, q.shape[-1]) is None)


def _bshd_empty(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[B, H, S, D] viewing fresh [B, S, H, D] memory: FA4's output layout."""
    b, h, s, d = like.shape
    return like.new_empty((b, s, h, d), dtype=dtype or like.dtype).transpose(1, 2)


def _probabilities(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """The math of the op's portable path, in fp32 at least: causal softmax probabilities with k and
    v repeated over each group of query heads, the log-sum-exp, and the upcast q, k, v."""
    c = torch.promote_types(q.dtype, torch.float32)
    groups = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(c), k.to(c).repeat_interleave(groups, 1), v.to(c).repeat_interleave(groups, 1)
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp(), lse, (qc, kc, vc)


@torch.library.custom_op("chronicals::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; lse ([B, H, S], fp32) is an output only so that autograd saves it."""
    _check(q, k, v)
    if _fast(q, k, v):
        return flash_attention4.forward(q, k, v, scale)
    probs, lse, (qc, kc, vc) = _probabilities(q, k, v, scale)
    out = _bshd_empty(q)
    out.copy_(probs @ vc)
    return out, lse.float()


@flash_attention.register_fake
def _(q, k, v, scale):
    b, h, s, _ = q.shape
    return _bshd_empty(q), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("chronicals::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if _fast(q, k, v) and grad.dtype == q.dtype and grad.stride(-1) == 1:
        return flash_attention4.backward(grad, q, k, v, out, lse, scale)
    probs, _, (qc, kc, vc) = _probabilities(q, k, v, scale)
    g = grad.to(qc.dtype)
    dp = g @ vc.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    groups = q.shape[1] // k.shape[1]

    def fold(t):  # a key/value head's gradient sums over its group of query heads
        return t.unflatten(1, (k.shape[1], groups)).sum(2)

    got = (ds @ kc * scale, fold(ds.transpose(-1, -2) @ qc * scale), fold(probs.transpose(-1, -2) @ g))
    results = []
    for t, like in zip(got, (q, k, v)):
        r = _bshd_empty(like)
        r.copy_(t)
        results.append(r)
    return tuple(results)


@flash_attention_backward.register_fake
def _(grad, q, k, v, out, lse, scale):
    return _bshd_empty(q), _bshd_empty(k), _bshd_empty(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, grad_out: Tensor, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: plain ops, differentiable as written
        with torch.enable_grad():
            got = torch.autograd.grad(_twice_differentiable(q, k, v, ctx.scale), (q, k, v), grad_out,
                                      create_graph=True)
        return (*got, None)
    return (*flash_attention_backward(grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out,
                                      q, k, v, out, lse, ctx.scale), None)


flash_attention.register_autograd(_backward, setup_context=_setup_context)
