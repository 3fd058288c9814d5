"""SwiGLU / GeGLU equivalence: output, da and db of the Triton kernels against float64.

The references are torch's own ops under autograd (``F.silu(a) * b``, ``F.gelu(a, "tanh") * b``),
not our hand-written formulas, so a shared mistake cannot hide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from .tolerance import Measurement, measure

NAME = "swiglu"
ACTS = ("silu", "gelu_tanh")
#: How ``a`` and ``b`` are laid out: separate contiguous tensors, the two halves of one fused
#: ``gate_up`` projection (row stride 2w), a column-strided view (forces the copy path), or 3-D.
LAYOUTS = ("contiguous", "chunk", "strided", "3d")


def cases(max_rows: int = 33, widths=(1, 7, 33, 100, 257, 896, 1000)) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "rows": st.integers(1, max_rows),
        "width": st.sampled_from(widths),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "act": st.sampled_from(ACTS),
        "layout": st.sampled_from(LAYOUTS),
        "seed": st.integers(0, 2**31 - 1),
    })


def torch_gated(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """The unfused graph, as transformers writes it."""
    if act == "silu":
        return F.silu(a) * b
    return F.gelu(a, approximate="tanh") * b


def make_inputs(rows: int, width: int, dtype: torch.dtype, layout: str, seed: int,
                device: str = "cpu", scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where used: CPU draws stall GPU runs

    def randn(*shape):
        return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    if layout == "chunk":
        a, b = randn(rows, 2 * width).chunk(2, dim=-1)
    elif layout == "strided":
        a, b = randn(rows, 2 * width)[:, ::2], randn(rows, 2 * width)[:, 1::2]
    elif layout == "3d":
        a, b = randn(1, rows, width), randn(1, rows, width)
    else:
        a, b = randn(rows, width), randn(rows, width)
    dy = randn(*a.shape)
    return a, b, dy


def check(rows: int, width: int, dtype: torch.dtype, act: str = "silu", layout: str = "contiguous",
          seed: int = 0, device: str = "cpu") -> list[Measurement]:
    from ..kernels.swiglu import GELU_TANH, SILU, gated_backward, gated_forward

    code = SILU if act == "silu" else GELU_TANH
    a, b, dy = make_inputs(rows, width, dtype, layout, seed, device)
    y = gated_forward(a, b, code)
    da, db = gated_backward(dy, a, b, code)

    def reference(ar, br, dyr):
        ar = ar.detach().clone().requires_grad_(True)
        br = br.detach().clone().requires_grad_(True)
        out = torch_gated(ar, br, act)
        ga, gb = torch.autograd.grad(out, (ar, br), dyr)
        return out, ga, gb

    ref = reference(a.double(), b.double(), dy.double())
    same = reference(a, b, dy)
    ours = (y, da, db)
    name = "swiglu" if act == "silu" else "geglu"
    return [_measure(f"{name}.{n}", o, s, r) for n, o, s, r in zip(("out", "da", "db"), ours, same, ref)]


def _measure(name: str, ours: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor) -> Measurement:
    """``measure``, failing outright when our dtype differs from torch's."""
    if ours.dtype != same.dtype:
        return Measurement(f"{name} (dtype {ours.dtype} != {same.dtype})", same.dtype,
                           float("inf"), float("inf"), False)
    return measure(name, ours, same, ref64)
