"""RMSNorm kernels, phase by phase: ours against eager, torch.compile (Inductor) and Liger-Kernel.

Timing, rotation through input sets and every column: ``common.measure_phases``. Per phase:

* ``fwd``: ``y = rms_norm(x, w)``. eager: ``ops.rms_norm.rms_norm_reference``; torch.compile: that
  function compiled (an inference graph: no grad mode); ours: ``kernels.rms_norm.rms_norm_forward``
  (the launcher, no autograd, no custom op); Liger: ``LigerRMSNormFunction.forward`` called
  directly (llama casting; it also writes its fp32 rstd, M x 4 bytes).
* ``bwd``: ``(dx, dw)`` from ``(dy, x, w)``. eager: the explicit formula
  ``ops.rms_norm.rms_norm_backward_reference`` (the derivative of the reference, rstd recomputed
  from x as our kernel does); torch.compile: that same formula compiled by Inductor. This is the
  fair separate backward: the same math, Inductor free to fuse it as it likes; AOTAutograd's own
  backward would read a saved rstd instead (M x 4 bytes, noise) and is what ``fwd+bwd`` measures.
  ours: ``kernels.rms_norm.rms_norm_backward``; Liger: ``LigerRMSNormFunction.backward`` on the
  context its forward filled (``in_place=True``, its default: dx overwrites dy).
* ``fwd+bwd``: autograd, ``torch.autograd.grad(f(x, w), (x, w), dy)`` with f the reference, the
  compiled reference (AOTAutograd's forward and backward graphs), ``torch.ops.chronicals.rms_norm``
  or ``LigerRMSNormFunction.apply``.

Minimal bytes (element size s): fwd (2MN + N)s (read x, w; write y); bwd (3MN + 2N)s (read dy,
x, w; write dx, dw); fwd+bwd their sum. Every shape moves >= 58 MB per call and the sets rotate
past 4x L2, so no figure is an L2 figure.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import FakeCtx, Variant, autograd_grads  # noqa: E402

SHAPES = [(16384, 896), (8192, 2048), (8192, 4096), (4096, 5120), (16384, 4096)]
SMOKE_SHAPES = [(8, 48)]
EPS = 1e-6


def phase_bytes(m: int, n: int, dtype: torch.dtype) -> dict[str, int]:
    s = torch.finfo(dtype).bits // 8
    fwd, bwd = (2 * m * n + n) * s, (3 * m * n + 2 * n) * s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _variants(compile_fn, liger: bool = True) -> dict[str, Variant]:
    from chronicals_compile.kernels import rms_norm as K
    from chronicals_compile.ops.rms_norm import rms_norm_backward_reference as ref_bwd
    from chronicals_compile.ops.rms_norm import rms_norm_reference as ref

    def impl(fwd, bwd, autograd_fwd, prepare=None):
        return Variant(fwd=lambda s: fwd(s["x"], s["w"], EPS),
                       bwd=lambda s: bwd(s),
                       fwd_bwd=lambda s: autograd_grads(autograd_fwd(s["x"], s["w"], EPS), s),
                       prepare=prepare)

    c_fwd, c_bwd, c_joint = compile_fn(ref), compile_fn(ref_bwd), compile_fn(ref)
    variants = {
        "eager": impl(ref, lambda s: ref_bwd(s["dy"], s["x"], s["w"], EPS), ref),
        "torch.compile": impl(c_fwd, lambda s: c_bwd(s["dy"], s["x"], s["w"], EPS), c_joint),
        "chronicals": impl(K.rms_norm_forward, lambda s: K.rms_norm_backward(s["dy"], s["x"], s["w"], EPS),
                           lambda x, w, eps: torch.ops.chronicals.rms_norm(x, w, eps)),
    }
    if liger:
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction as L
        except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
            return variants

        def prepare(s):
            s["ctx"] = FakeCtx()
            L.forward(s["ctx"], s["x"], s["w"], EPS, 0.0, "llama", True)

        variants["liger"] = impl(lambda x, w, eps: L.forward(FakeCtx(), x, w, eps, 0.0, "llama", True),
                                 lambda s: L.backward(s["ctx"], s["dy"]),
                                 lambda x, w, eps: L.apply(x, w, eps, 0.0, "llama", True), prepare)
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0, *,
        shapes=None, timers=None, compile_fn=None, liger: bool = True, log=print) -> list[dict]:
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*

    compile_fn = compile_fn or (lambda f: torch.compile(f, dynamic=False))
    rows = []
    for m, n in shapes or SHAPES:
        torch._dynamo.reset()  # fresh compile per shape: no recompile limit, no stale guards

        def make_set(seed, m=m, n=n):
            g = torch.Generator(device).manual_seed(seed)
            x = torch.randn(m, n, generator=g, device=device, dtype=dtype).requires_grad_()
            w = (1 + 0.1 * torch.randn(n, generator=g, device=device, dtype=dtype)).requires_grad_()
            dy = torch.randn(m, n, generator=g, device=device, dtype=dtype)
            return {"x": x, "w": w, "dy": dy, "leaves": (x, w), "grads": (dy,)}

        rows += common.measure_phases({"op": "rms_norm", "shape": f"{m}x{n}"}, make_set,
                                      _variants(compile_fn, liger), phase_bytes(m, n, dtype),
                                      device=device, copy_gbps=copy_gbps, timers=timers, log=log)
    return rows


#: (programs per SM, rows per loop step) tried by --sweep-bwd; block_m None = the launcher's choice.
BWD_CONFIGS = [(p, m) for p in (1, 2, 4, 8, 16) for m in (None, 1, 4)]


def sweep_bwd(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0, *,
              shapes=None, configs=None, timers=None, compile_fn=None, log=print) -> list[dict]:
    """The backward alone, eager and Inductor beside our kernel at each launch shape: the figures
    that pick ``kernels.rms_norm.BWD_LAUNCH`` (programs per SM and rows per step by hidden size)."""
    from chronicals_compile.kernels import rms_norm as K

    compile_fn = compile_fn or (lambda f: torch.compile(f, dynamic=False))
    rows = []
    for m, n in shapes or SHAPES:
        torch._dynamo.reset()
        base = _variants(compile_fn, liger=False)
        variants = {"eager": base["eager"], "torch.compile": base["torch.compile"]}
        for per_sm, block_m in configs or BWD_CONFIGS:
            variants[f"ours p{per_sm} m{block_m or 'auto'}"] = common.Variant(
                fwd=None, fwd_bwd=None,
                bwd=lambda s, p=per_sm, b=block_m: K.rms_norm_backward(s["dy"], s["x"], s["w"], EPS,
                                                                       programs_per_sm=p, block_m=b))

        def make_set(seed, m=m, n=n):
            g = torch.Generator(device).manual_seed(seed)
            x = torch.randn(m, n, generator=g, device=device, dtype=dtype)
            w = 1 + 0.1 * torch.randn(n, generator=g, device=device, dtype=dtype)
            return {"x": x, "w": w, "dy": torch.randn(m, n, generator=g, device=device, dtype=dtype)}

        rows += common.measure_phases({"op": "rms_norm bwd sweep", "shape": f"{m}x{n}"}, make_set, variants,
                                      phase_bytes(m, n, dtype), device=device, copy_gbps=copy_gbps,
                                      timers=timers, log=log, phases=("bwd",))
    return rows


def main() -> None:
    if "--sweep-bwd" in sys.argv:  # python benchmarks/bench_rms_norm.py --sweep-bwd (GPU)
        from table import markdown

        print(markdown(sweep_bwd()))
        return
    common.bench_main(run, SMOKE_SHAPES)


if __name__ == "__main__":
    main()
