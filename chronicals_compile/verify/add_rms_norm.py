"""Residual add + RMSNorm equivalence: s, y, the shared input gradient and dweight of the Triton
kernels against float64, with a gradient arriving at s from its other readers as in a decoder."""
from __future__ import annotations

import torch

from ..ops.add_rms_norm import add_rms_norm_reference
from .rms_norm import cases  # noqa: F401 - the same shapes, dtypes and layouts as the plain norm
from .tolerance import Measurement, measure

NAME = "add_rms_norm"


def check(rows: int, hidden: int, dtype: torch.dtype, weight_dtype: str = "same",
          non_contiguous: bool = False, seed: int = 0, device: str = "cpu",
          eps: float = 1e-6) -> list[Measurement]:
    from ..kernels.rms_norm import add_rms_norm_forward, rms_norm_backward

    gen = torch.Generator(device=device).manual_seed(seed)

    def draw():
        if non_contiguous:  # every other column of a wider buffer: row stride != hidden
            return torch.randn(rows, 2 * hidden, generator=gen, device=device).to(dtype)[:, ::2]
        return torch.randn(rows, hidden, generator=gen, device=device).to(dtype)

    x, residual = draw(), draw()
    wdtype = dtype if weight_dtype == "same" else torch.float32
    w = (1 + 0.5 * torch.randn(hidden, generator=gen, device=device)).to(wdtype)
    out_dtype = torch.promote_types(dtype, wdtype)
    dy = torch.randn(rows, hidden, generator=gen, device=device).to(out_dtype)
    ds = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)

    s, y = add_rms_norm_forward(x, residual, w, eps)
    dx, dw = rms_norm_backward(dy, s, w, eps, grad_x_extra=ds)

    def reference(xr, rr, wr, dyr, dsr):
        xr, rr, wr = (t.detach().requires_grad_(True) for t in (xr, rr, wr))
        s_ref, y_ref = add_rms_norm_reference(xr, rr, wr, eps)
        gx, gw = torch.autograd.grad((s_ref, y_ref), (xr, wr), (dsr, dyr))
        return s_ref, y_ref, gx, gw

    ref = reference(x.double(), residual.double(), w.double(), dy.double(), ds.double())
    same = reference(x, residual, w, dy, ds)
    s64 = ref[0].detach()
    shat = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)
    dw_terms = (dy.double().abs() * shat.abs()).sum(0)
    names = ("s", "out", "dx", "dweight")
    return [measure(f"{NAME}.{n}", o, t, r, dtype=dtype, magnitude=m)
            for n, o, t, r, m in zip(names, (s, y, dx, dw), same, ref, (None, None, None, dw_terms))]
