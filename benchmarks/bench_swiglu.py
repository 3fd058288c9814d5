"""SwiGLU (and GeGLU) kernels, phase by phase: ours against eager, torch.compile (Inductor) and
Liger-Kernel (a missing variant when ``liger_kernel`` does not import).

Timing, rotation through input sets and every column: ``common.measure_phases``. Per phase:

* ``fwd``: ``act(a) * b``. eager: ``F.silu(a) * b`` (``F.gelu(a, approximate="tanh") * b``), as
  transformers writes it; torch.compile: that function compiled (inference graph); ours:
  ``kernels.swiglu.gated_forward`` (the launcher, no autograd); Liger: ``LigerSiLUMulFunction``
  (``LigerGELUMulFunction``) ``.forward`` called directly.
* ``bwd``: ``(da, db)`` from ``(dy, a, b)``. eager: the explicit formula
  ``ops.swiglu.gated_backward_reference`` (fp32 math, activation recomputed); torch.compile: that
  formula compiled by Inductor (the same math, fused as Inductor likes: the fair separate
  backward; AOTAutograd's own is what ``fwd+bwd`` measures); ours: ``kernels.swiglu.
  gated_backward``; Liger: its ``Function.backward`` on the context its forward filled (it writes
  da and db over a and b, its design: same bytes, no allocation).
* ``fwd+bwd``: autograd, ``torch.autograd.grad(f(a, b), leaves, dy)`` with f the eager function,
  its compiled form, ``torch.ops.chronicals.swiglu``/``geglu`` or the Liger Function's ``apply``.

Layouts: ``contiguous`` a and b; ``chunk``: both halves of one fused ``[M, 2N]`` gate_up output
(Phi-3 style), strided rows. In fwd+bwd the chunk's gradient is one ``[M, 2N]`` tensor: autograd
concatenates da and db into it (Inductor may fuse that into its backward; the others pay a copy,
in the time and not in the bytes).

Minimal bytes (element size s): fwd 3MNs (read a, b; write y); bwd 5MNs (read dy, a, b; write
da, db); fwd+bwd 8MNs. Every case moves >= 480 MB per call: several times any L2, and the sets
rotate besides.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import FakeCtx, Variant, autograd_grads  # noqa: E402

#: (rows = batch x seq, width = intermediate size): Qwen2.5-0.5B (4864), Qwen2.5-1.5B (8960),
#: Llama-3-8B (14336), Llama-2-7B (11008).
SHAPES = [(16384, 4864), (16384, 8960), (8192, 14336), (8192, 11008)]
#: Gemma-style GeGLU at one shape, and the halves of a fused gate_up projection (Phi-3 style).
EXTRA = [("geglu", "contiguous", (16384, 4864)), ("swiglu", "chunk", (16384, 4864))]
SMOKE_CASES = [("swiglu", "contiguous", (4, 40)), ("geglu", "contiguous", (4, 40)), ("swiglu", "chunk", (4, 40))]


def _silu_mul(a, b):
    return F.silu(a) * b


def _gelu_mul(a, b):
    return F.gelu(a, approximate="tanh") * b


def phase_bytes(m: int, n: int, dtype: torch.dtype) -> dict[str, int]:
    s = torch.finfo(dtype).bits // 8
    return {"fwd": 3 * m * n * s, "bwd": 5 * m * n * s, "fwd+bwd": 8 * m * n * s}


def _variants(kind: str, compile_fn, liger: bool = True) -> dict[str, Variant]:
    from chronicals_compile.kernels.swiglu import gated_backward, gated_forward
    from chronicals_compile.ops.swiglu import GELU_TANH, SILU, gated_backward_reference

    act = SILU if kind == "swiglu" else GELU_TANH
    eager = _silu_mul if kind == "swiglu" else _gelu_mul

    def ref_bwd(dy, a, b):
        return gated_backward_reference(dy, a, b, act)

    def impl(fwd, bwd, autograd_fwd, prepare=None):
        return Variant(fwd=lambda s: fwd(*s["ab"]()),
                       bwd=lambda s: bwd(s),
                       fwd_bwd=lambda s: autograd_grads(autograd_fwd(*s["ab"]()), s),
                       prepare=prepare)

    c_fwd, c_bwd, c_joint = compile_fn(eager), compile_fn(ref_bwd), compile_fn(eager)
    variants = {
        "eager": impl(eager, lambda s: ref_bwd(s["dy"], *s["ab"]()), eager),
        "torch.compile": impl(c_fwd, lambda s: c_bwd(s["dy"], *s["ab"]()), c_joint),
        "chronicals": impl(lambda a, b: gated_forward(a, b, act),
                           lambda s: gated_backward(s["dy"], *s["ab"](), act),
                           getattr(torch.ops.chronicals, kind)),
    }
    if liger:
        try:
            if kind == "swiglu":
                from liger_kernel.ops.swiglu import LigerSiLUMulFunction as L
            else:
                from liger_kernel.ops.geglu import LigerGELUMulFunction as L
        except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
            return variants

        def prepare(s):
            s["ctx"] = FakeCtx()
            L.forward(s["ctx"], *s["ab"]())

        variants["liger"] = impl(lambda a, b: L.forward(FakeCtx(), a, b),
                                 lambda s: L.backward(s["ctx"], s["dy"]), L.apply, prepare)
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0, *,
        shapes=None, timers=None, compile_fn=None, liger: bool = True, log=print) -> list[dict]:
    """``shapes``: cases ``(kind, layout, (M, N))``; default every SHAPES swiglu case plus EXTRA."""
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*

    compile_fn = compile_fn or (lambda f: torch.compile(f, dynamic=False))
    cases = shapes or [("swiglu", "contiguous", s) for s in SHAPES] + EXTRA
    rows = []
    for kind, layout, (m, n) in cases:
        torch._dynamo.reset()  # fresh compile per case: no recompile limit, no stale guards

        def make_set(seed, m=m, n=n, layout=layout):
            g = torch.Generator(device).manual_seed(seed)
            if layout == "chunk":
                gu = torch.randn(m, 2 * n, generator=g, device=device, dtype=dtype).requires_grad_()
                leaves, ab = (gu,), (lambda: gu.chunk(2, dim=-1))
            else:
                a = torch.randn(m, n, generator=g, device=device, dtype=dtype).requires_grad_()
                b = torch.randn(m, n, generator=g, device=device, dtype=dtype).requires_grad_()
                leaves, ab = (a, b), (lambda: (a, b))
            dy = torch.randn(m, n, generator=g, device=device, dtype=dtype)
            return {"ab": ab, "dy": dy, "leaves": leaves, "grads": (dy,)}

        label = {"op": kind, "shape": f"{m}x{n}" + (" (chunk)" if layout == "chunk" else "")}
        rows += common.measure_phases(label, make_set, _variants(kind, compile_fn, liger),
                                      phase_bytes(m, n, dtype), device=device, copy_gbps=copy_gbps,
                                      timers=timers, log=log)
    return rows


def main() -> None:
    common.bench_main(run, SMOKE_CASES)


if __name__ == "__main__":
    main()
