"""QK-RoPE equivalence: q_out, k_out, dq and dk of the one-launch Triton kernel against float64.

The reference is transformers' own formula (``x * cos + rotate_half(x) * sin``) under autograd,
with torch's type promotion: with fp32 cos/sin and bf16 q the outputs are fp32, the gradients bf16.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from .tolerance import Measurement, measure

NAME = "rope"
#: ``hf``: q/k as Dynamo records them, ``linear(...).view(B, S, H, D).transpose(1, 2)``;
#: ``contiguous``: plain ``[B, H, S, D]``; ``partial``: the rotated first D of a wider head
#: (partial rotary), row stride larger than D.
LAYOUTS = ("hf", "contiguous", "partial")
HEAD_DIMS = (2, 8, 16, 64, 80, 96, 128, 256)


def cases(max_batch: int = 2, max_seq: int = 7, head_dims=HEAD_DIMS) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "batch": st.integers(1, max_batch),
        "seq": st.integers(1, max_seq),
        "kv_heads": st.integers(1, 3),
        "group": st.sampled_from([1, 2, 3, 7]),
        "head_dim": st.sampled_from(head_dims),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "cos_dtype": st.sampled_from(["same", "float32"]),
        "layout": st.sampled_from(LAYOUTS),
        "cos_batch": st.booleans(),
        "cos_kind": st.sampled_from(["rotary", "random"]),
        "interleaved": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    })


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    if interleaved:  # GLM's: pairs (2j, 2j + 1)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def torch_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False):
    """transformers' ``apply_rotary_pos_emb`` after ``cos.unsqueeze(1)``."""
    return (q * cos + rotate_half(q, interleaved) * sin, k * cos + rotate_half(k, interleaved) * sin)


def make_inputs(batch: int, seq: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
                cos_dtype: str = "same", layout: str = "hf", cos_batch: bool = False,
                cos_kind: str = "rotary", seed: int = 0, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where used: CPU draws stall GPU runs
    hq, hk, d = kv_heads * group, kv_heads, head_dim

    def head_tensor(heads):
        if layout == "hf":
            return torch.randn(batch, seq, heads * d, generator=gen, device=device).view(batch, seq, heads, d).transpose(1, 2)
        if layout == "partial":
            return torch.randn(batch, heads, seq, 2 * d, generator=gen, device=device)[..., :d]
        return torch.randn(batch, heads, seq, d, generator=gen, device=device)

    q = head_tensor(hq).to(dtype)
    k = head_tensor(hk).to(dtype)
    cb = batch if cos_batch else 1
    if cos_kind == "rotary":
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        pos = torch.randint(0, 4096, (cb, seq), generator=gen, device=device).float()
        freqs = pos[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
    else:
        cos, sin = torch.randn(cb, seq, d, generator=gen, device=device), torch.randn(cb, seq, d, generator=gen, device=device)
    cdt = dtype if cos_dtype == "same" else torch.float32
    cos, sin = cos.to(cdt).unsqueeze(1).to(device), sin.to(cdt).unsqueeze(1).to(device)
    out_dtype = torch.promote_types(dtype, cdt)
    shape_q, shape_k = (batch, hq, seq, d), (batch, hk, seq, d)
    dq_out = torch.randn(*shape_q, generator=gen, device=device).to(out_dtype)
    dk_out = torch.randn(*shape_k, generator=gen, device=device).to(out_dtype)
    return q, k, cos, sin, dq_out, dk_out


def launches_side_by_side(inputs: tuple, first: dict, second: dict, interleaved: bool = False):
    """For the forward and then the backward launch: ``((q_out, k_out) with ``first``, (q_out, k_out)
    with ``second``)``, ``first``/``second`` being ``rope_launch`` options (offset width, tiling)
    whose outputs must agree bit for bit. ``inputs``: :func:`make_inputs`'s tuple."""
    from ..kernels.rope import rope_launch

    q, k, cos, sin, dq_out, dk_out = inputs
    for backward, (x, y) in ((False, (q, k)), (True, (dq_out, dk_out))):
        outs = []
        for options in (first, second):
            xo, yo = torch.empty_like(x), torch.empty_like(y)
            rope_launch(x, y, cos, sin, xo, yo, backward=backward, interleaved=interleaved, **options)
            outs.append((xo, yo))
        yield outs[0], outs[1]


def check(batch: int, seq: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
          cos_dtype: str = "same", layout: str = "hf", cos_batch: bool = False, cos_kind: str = "rotary",
          interleaved: bool = False, seed: int = 0, device: str = "cpu") -> list[Measurement]:
    from ..kernels.rope import rope_backward, rope_forward

    q, k, cos, sin, dq_out, dk_out = make_inputs(batch, seq, kv_heads, group, head_dim, dtype, cos_dtype,
                                                 layout, cos_batch, cos_kind, seed, device)
    q_out, k_out = rope_forward(q, k, cos, sin, interleaved=interleaved)
    dq, dk = rope_backward(dq_out, dk_out, cos, sin, q.dtype, k.dtype, interleaved=interleaved)

    def reference(qr, kr, cr, sr, gq, gk):
        qr = qr.detach().clone().requires_grad_(True)
        kr = kr.detach().clone().requires_grad_(True)
        qo, ko = torch_rope(qr, kr, cr, sr, interleaved)
        gq_, gk_ = torch.autograd.grad((qo, ko), (qr, kr), (gq.to(qo.dtype), gk.to(ko.dtype)))
        return qo, ko, gq_, gk_

    ref = reference(q.double(), k.double(), cos.double(), sin.double(), dq_out.double(), dk_out.double())
    same = reference(q, k, cos, sin, dq_out, dk_out)
    ours = (q_out, k_out, dq, dk)
    names = ("q_out", "k_out", "dq", "dk")
    return [_measure(f"{NAME}.{n}", o, s, r) for n, o, s, r in zip(names, ours, same, ref)]


def _measure(name: str, ours: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor) -> Measurement:
    """``measure``, failing outright when our dtype differs from torch's."""
    if ours.dtype != same.dtype:
        return Measurement(f"{name} (dtype {ours.dtype} != {same.dtype})", same.dtype,
                           float("inf"), float("inf"), False)
    return measure(name, ours, same, ref64)
