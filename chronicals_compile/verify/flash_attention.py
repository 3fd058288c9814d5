"""``chronicals::flash_attention`` against float64, output and every gradient: one case builder
shared by the CPU suite (the op's SDPA-math path) and the GPU suite (flash-attn-4's kernels).

Each output row is a softmax-weighted sum: its magnitude for the slack is the sum of the terms'
absolute values (``P @ |V|`` for the output), so a row that cancels to near zero gets slack
relative to its terms, as rounding one term moves the sum by that term's ulp.
"""
from __future__ import annotations

import torch

from .tolerance import Measurement, measure

NAMES = ("out", "dq", "dk", "dv")


def check(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, *,
          device: str = "cpu", seed: int = 0, scale: float | None = None) -> list[Measurement]:
    """Inputs are [B, H, S, D] views of [B, S, H, D] memory, as transformers hands them to SDPA."""
    from ..ops.flash_attention import attention_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    scale = head_dim ** -0.5 if scale is None else scale

    def leaf(h):
        return torch.randn(batch, seq, h, head_dim, device=device, dtype=dtype, generator=gen).transpose(1, 2)

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    go = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, go.to(cast))]

    ours = run(lambda *a: torch.ops.chronicals.flash_attention(*a, scale)[0], dtype)
    same = run(lambda *a: attention_reference(*a, scale), dtype)
    ref = run(lambda *a: attention_reference(*a, scale), torch.float64)
    q64, k64, v64, go64 = (t.double() for t in (q, k, v, go))
    groups = heads // kv_heads
    k64, v64 = k64.repeat_interleave(groups, 1), v64.repeat_interleave(groups, 1)
    p = torch.softmax((q64 @ k64.transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(seq, seq, dtype=torch.bool, device=device).tril(), float("-inf")), -1)
    dp = go64 @ v64.transpose(-1, -2)
    ds = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())  # |terms| of P * (dP - rowsum(P dP))

    def fold(t):  # [B, Hq, ...] -> [B, Hkv, ...]: a key/value head's gradient sums its group's
        return t.unflatten(1, (kv_heads, groups)).sum(2)

    magnitudes = [p @ v64.abs(), ds @ k64.abs() * scale, fold(ds.transpose(-1, -2) @ q64.abs() * scale),
                  fold(p.transpose(-1, -2) @ go64.abs())]
    return [measure(n, o, s, r, dtype=dtype, magnitude=m)
            for n, o, s, r, m in zip(NAMES, ours, same, ref, magnitudes)]
