"""``chronicals::gated_mlp`` against float64, output and every gradient: one case builder shared by
the CPU suite (the op's torch path) and the GPU suite (QuACK's epilogue GEMMs).

Every output is a sum that cancels (over the intermediate width for y and dx, over every token
for the weight gradients): each gets the sum of its terms'
absolute values as the magnitude its slack scales with (the tolerance rule's ``magnitude``), as
rounding one term moves the sum by that term's ulp, not the sum's.
"""
from __future__ import annotations

import torch

from .tolerance import Measurement, measure

NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down")


def check(shape: tuple[int, ...], f: int, dtype: torch.dtype, activation: str = "swiglu", *,
          device: str = "cpu", seed: int = 0, transposed_x: bool = False) -> list[Measurement]:
    from ..ops.gated_mlp import _dpreact_reference, _interleave, gated_mlp_reference

    gen = torch.Generator(device=device).manual_seed(seed)
    *lead, d = shape
    if transposed_x:  # a non-contiguous input
        x = torch.randn(*lead[:-1], d, lead[-1], device=device, dtype=dtype, generator=gen).transpose(-1, -2)
    else:
        x = torch.randn(*shape, device=device, dtype=dtype, generator=gen)
    ws = [torch.randn(f, d, device=device, dtype=dtype, generator=gen) / d ** 0.5,
          torch.randn(f, d, device=device, dtype=dtype, generator=gen) / d ** 0.5,
          torch.randn(d, f, device=device, dtype=dtype, generator=gen) / f ** 0.5]
    dy = torch.randn(*lead, d, device=device, dtype=dtype, generator=gen)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, *ws)]
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(cast))]

    ours = run(lambda *a: torch.ops.chronicals.gated_mlp(*a, activation)[0], dtype)
    same = run(lambda *a: gated_mlp_reference(*a, activation), dtype)
    ref = run(lambda *a: gated_mlp_reference(*a, activation), torch.float64)
    x2, dy2 = x.reshape(-1, d).double(), dy.reshape(-1, d).double()
    w64 = [w.double() for w in ws]
    dpre, h = _dpreact_reference(dy2 @ w64[2], x2 @ _interleave(w64[0], w64[1]).t(), activation)
    dg, du = dpre[:, 0::2], dpre[:, 1::2]
    w1 = _interleave(w64[0], w64[1])
    magnitudes = [(h.abs() @ w64[2].abs().t()).reshape(ref[0].shape), (dpre.abs() @ w1.abs()).reshape(ref[1].shape),
                  dg.abs().t() @ x2.abs(), du.abs().t() @ x2.abs(), dy2.abs().t() @ h.abs()]
    return [measure(n, o, s, r, dtype=dtype, magnitude=m)
            for n, o, s, r, m in zip(NAMES, ours, same, ref, magnitudes)]
