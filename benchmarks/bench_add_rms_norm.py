"""Residual add + RMSNorm, phase by phase: ours against eager, torch.compile (Inductor) and
Liger-Kernel's fused add RMSNorm. The figures decide whether a pass swaps ``chronicals::add_rms_norm``
in (issue: only where it measures faster than Inductor's own fusion of the same chain).

Per phase (timing and columns: ``common.measure_phases``), outputs in the order (s, y):

* ``fwd``: ``s = x + r; y = rms_norm(s, w)``. eager: ``ops.add_rms_norm.add_rms_norm_reference``;
  torch.compile: that function compiled; ours: ``kernels.rms_norm.add_rms_norm_forward``; Liger:
  ``LigerFusedAddRMSNormFunction.forward`` (it also writes an fp32 rstd, M x 4 bytes).
* ``bwd``: ``(ds_total, dw)`` from ``(dy, ds, s, w)``, ds being the gradient s gets from the
  residual stream. eager: ``add_rms_norm_backward_reference``; torch.compile: it compiled; ours:
  ``kernels.rms_norm.rms_norm_backward(..., grad_x_extra=ds)``; Liger: its backward (dX; dR is the
  same tensor's copy).
* ``fwd+bwd``: ``torch.autograd.grad((s, y), (x, r, w), (ds, dy))`` through each implementation.

Minimal bytes (element size e): fwd (4MN + N)e (read x, r, w; write s, y); bwd (4MN + 2N)e (read
dy, ds, s, w; write dx, dw); fwd+bwd their sum.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import FakeCtx, Variant, autograd_grads  # noqa: E402

SHAPES = [(16384, 896), (8192, 2048), (8192, 4096), (16384, 4096)]
SMOKE_SHAPES = [(8, 48)]
EPS = 1e-6


def phase_bytes(m: int, n: int, dtype: torch.dtype) -> dict[str, int]:
    e = torch.finfo(dtype).bits // 8
    fwd, bwd = (4 * m * n + n) * e, (4 * m * n + 2 * n) * e
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _variants(compile_fn, liger: bool = True) -> dict[str, Variant]:
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*
    from chronicals_compile.kernels import rms_norm as K
    from chronicals_compile.ops.add_rms_norm import add_rms_norm_backward_reference as ref_bwd
    from chronicals_compile.ops.add_rms_norm import add_rms_norm_reference as ref

    def impl(fwd, bwd, autograd_fwd, prepare=None):
        return Variant(fwd=lambda s: fwd(s["x"], s["r"], s["w"], EPS), bwd=bwd,
                       fwd_bwd=lambda s: autograd_grads(autograd_fwd(s["x"], s["r"], s["w"], EPS), s),
                       prepare=prepare)

    c_fwd, c_bwd, c_joint = compile_fn(ref), compile_fn(ref_bwd), compile_fn(ref)
    variants = {
        "eager": impl(ref, lambda s: ref_bwd(s["dy"], s["ds"], s["s"], s["w"], EPS), ref),
        "torch.compile": impl(c_fwd, lambda s: c_bwd(s["dy"], s["ds"], s["s"], s["w"], EPS), c_joint),
        "chronicals": impl(K.add_rms_norm_forward,
                           lambda s: K.rms_norm_backward(s["dy"], s["s"], s["w"], EPS, grad_x_extra=s["ds"]),
                           lambda x, r, w, eps: torch.ops.chronicals.add_rms_norm(x, r, w, eps)),
    }
    if liger:
        try:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction as L
        except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
            return variants

        def prepare(s):
            s["ctx"] = FakeCtx()
            L.forward(s["ctx"], s["x"], s["r"], s["w"], EPS, 0.0, "llama", False)

        def liger_bwd(s):
            dx, _, dw = L.backward(s["ctx"], s["dy"], s["ds"])[:3]
            return dx, dw

        variants["liger"] = impl(lambda x, r, w, eps: L.forward(FakeCtx(), x, r, w, eps, 0.0, "llama", False)[::-1],
                                 liger_bwd,
                                 lambda x, r, w, eps: L.apply(x, r, w, eps, 0.0, "llama", False)[::-1], prepare)
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0, *,
        shapes=None, timers=None, compile_fn=None, liger: bool = True, log=print) -> list[dict]:
    compile_fn = compile_fn or (lambda f: torch.compile(f, dynamic=False))
    rows = []
    for m, n in shapes or SHAPES:
        torch._dynamo.reset()

        def make_set(seed, m=m, n=n):
            g = torch.Generator(device).manual_seed(seed)
            x = torch.randn(m, n, generator=g, device=device, dtype=dtype).requires_grad_()
            r = torch.randn(m, n, generator=g, device=device, dtype=dtype).requires_grad_()
            w = (1 + 0.1 * torch.randn(n, generator=g, device=device, dtype=dtype)).requires_grad_()
            ds = torch.randn(m, n, generator=g, device=device, dtype=dtype)
            dy = torch.randn(m, n, generator=g, device=device, dtype=dtype)
            with torch.no_grad():
                s = x + r
            return {"x": x, "r": r, "w": w, "s": s, "ds": ds, "dy": dy, "leaves": (x, r, w), "grads": (ds, dy)}

        rows += common.measure_phases({"op": "add_rms_norm", "shape": f"{m}x{n}"}, make_set,
                                      _variants(compile_fn, liger), phase_bytes(m, n, dtype),
                                      device=device, copy_gbps=copy_gbps, timers=timers, log=log)
    return rows


def main() -> None:
    common.bench_main(run, SMOKE_SHAPES)


if __name__ == "__main__":
    main()
