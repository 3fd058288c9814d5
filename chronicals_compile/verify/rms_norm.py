"""RMSNorm equivalence: output, dx and dweight of the Triton kernel against float64."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..ops.rms_norm import rms_norm_reference
from .tolerance import Measurement, measure

NAME = "rms_norm"


def cases(max_rows: int = 33, hiddens=(1, 7, 64, 100, 896, 1000)) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "rows": st.integers(1, max_rows),
        "hidden": st.sampled_from(hiddens),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "weight_dtype": st.sampled_from(["same", "float32"]),
        "non_contiguous": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    })


def check(rows: int, hidden: int, dtype: torch.dtype, weight_dtype: str = "same",
          non_contiguous: bool = False, seed: int = 0, device: str = "cpu",
          eps: float = 1e-6) -> list[Measurement]:
    from ..kernels.rms_norm import rms_norm_backward, rms_norm_forward

    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where used: CPU draws stall GPU runs
    wdtype = dtype if weight_dtype == "same" else torch.float32
    if non_contiguous:  # every other column of a wider buffer: row stride != hidden
        base = torch.randn(rows, 2 * hidden, generator=gen, device=device).to(dtype)
        x = base[:, ::2]
    else:
        x = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden, generator=gen, device=device)).to(wdtype)
    out_dtype = torch.promote_types(dtype, wdtype)
    dy = torch.randn(rows, hidden, generator=gen, device=device).to(out_dtype)

    y = rms_norm_forward(x, w, eps)
    dx, dw = rms_norm_backward(dy, x, w, eps)

    def reference(xr, wr, dyr):
        xr = xr.detach().requires_grad_(True)
        wr = wr.detach().requires_grad_(True)
        out = rms_norm_reference(xr, wr, eps)
        gx, gw = torch.autograd.grad(out, (xr, wr), dyr)
        return out, gx, gw

    ref = reference(x.double(), w.double(), dy.double())
    same = reference(x, w, dy)
    # Slack follows the input dtype: the normalised value is rounded to it before the weight
    # multiplies, so one ulp of x's dtype can move any output. dweight sums rows of dy * xhat:
    # its slack is relative to the sum of those terms' magnitudes.
    xd = x.double()
    xhat = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    dw_terms = (dy.double().abs() * xhat.abs()).sum(0)
    return [measure(f"{NAME}.{n}", o, s, r, dtype=dtype, magnitude=m)
            for n, o, s, r, m in zip(("out", "dx", "dweight"), (y, dx, dw), same, ref, (None, None, dw_terms))]
