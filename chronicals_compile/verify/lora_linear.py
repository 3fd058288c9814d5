"""``chronicals::lora_linear`` equivalence: output and every gradient (x, a trainable or frozen
base weight and bias, lora_A, lora_B) against float64, beside peft's own three GEMMs and add in
the same dtype.

The reference is ``lora_linear_reference`` (``F.linear`` three times and an add, as peft writes it)
under autograd. GEMM outputs are sums, so each tensor's slack is relative to the same computation
on absolute values (a sum that cancels to near zero keeps its terms' rounding).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from .tolerance import Measurement, measure

NAME = "lora_linear"
NAMES = ("out", "dx", "dweight", "dbias", "dlora_A", "dlora_B")


def cases(max_rows: int = 33, widths=(1, 7, 33, 64, 100)) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "rows": st.integers(1, max_rows),
        "width": st.sampled_from(widths),
        "widening": st.sampled_from([1, 2, 5]),
        "r": st.sampled_from([1, 4, 16]),
        "bias": st.booleans(),
        "frozen_base": st.booleans(),
        "scale": st.sampled_from([2.0, 0.5, 1.0 / 3.0]),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
        "seed": st.integers(0, 2**31 - 1),
    })


def _run(fn, tensors, needs, dy):
    leaves = [t.detach().clone().requires_grad_(n) if t is not None else None for t, n in zip(tensors, needs)]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach(), *[t.grad if t is not None else None for t in leaves]]


def check(rows: int, width: int, widening: int, r: int, bias: bool, frozen_base: bool, scale: float,
          dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> list[Measurement]:
    import chronicals_compile.ops  # noqa: F401 - registers the op
    from ..ops.lora_linear import lora_linear_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    out = width * widening

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, device=device)).to(dtype)

    x, w = randn(rows, width), randn(out, width, std=width ** -0.5)
    b = randn(out) if bias else None
    a, lb = randn(r, width, std=width ** -0.5), randn(out, r, std=0.5)
    dy = randn(rows, out)
    tensors, needs = (x, w, b, a, lb), (True, not frozen_base, not frozen_base, True, True)
    ours = _run(lambda *t: torch.ops.chronicals.lora_linear(*t, scale)[0], tensors, needs, dy)
    same = _run(lambda *t: lora_linear_reference(*t, scale), tensors, needs, dy)
    wide = [t.double() if t is not None else None for t in tensors]
    ref = _run(lambda *t: lora_linear_reference(*t, scale), wide, needs, dy.double())
    mag = _run(lambda *t: lora_linear_reference(*t, scale),
               [t.abs() if t is not None else None for t in wide], needs, dy.double().abs())
    found = []
    for name, o, s, rf, m in zip(NAMES, ours, same, ref, mag):
        if rf is None:
            if o is not None:
                found.append(Measurement(f"lora_linear.{name} (a gradient nobody asked for)", dtype,
                                         float("inf"), float("inf"), False))
            continue
        found.append(measure(f"lora_linear.{name}", o, s, rf, magnitude=m))
    return found
