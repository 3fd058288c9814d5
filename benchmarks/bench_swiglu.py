"""SwiGLU (and GeGLU) forward+backward: ours against eager, torch.compile of the same function,
and Liger-Kernel (a missing column when ``liger_kernel`` does not import).

Bytes counted are the minimum any implementation must move: forward reads a and b and writes
the product (3 tensors), backward reads the incoming gradient, a and b and writes da and db
(5 tensors): 8 x rows x width x element size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: (rows = batch x seq, width = intermediate size): Qwen2.5-0.5B (4864), Qwen2.5-1.5B (8960),
#: Llama-3-8B (14336), Llama-2-7B (11008).
SHAPES = [(16384, 4864), (16384, 8960), (8192, 14336), (8192, 11008)]
#: Gemma-style GeGLU at one shape, and the halves of a fused gate_up projection (Phi-3 style).
EXTRA = [("geglu", "contiguous", (16384, 4864)), ("swiglu", "chunk", (16384, 4864))]


def _silu_mul(a, b):
    return F.silu(a) * b


def _gelu_mul(a, b):
    return F.gelu(a, approximate="tanh") * b


def _variants(kind: str) -> dict:
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*

    eager = _silu_mul if kind == "swiglu" else _gelu_mul
    variants = {
        "eager": eager,
        "torch.compile": torch.compile(eager, dynamic=False),
        "chronicals": getattr(torch.ops.chronicals, kind),
    }
    try:
        if kind == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as Liger
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as Liger
        variants["liger"] = lambda a, b: Liger.apply(a, b)
    except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
        pass
    return variants


def _inputs(m: int, n: int, layout: str, device: str, dtype: torch.dtype):
    """Fresh leaves: two tensors, or one fused [m, 2n] projection output split in halves."""
    if layout == "chunk":
        gu = torch.randn(m, 2 * n, device=device, dtype=dtype, requires_grad=True)
        return [gu], lambda: gu.chunk(2, dim=-1)
    a = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
    return [a, b], lambda: (a, b)


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0) -> list[dict]:
    import triton.testing

    import chronicals_compile.ops  # noqa: F401

    cases = [("swiglu", "contiguous", s) for s in SHAPES] + EXTRA
    rows = []
    for kind, layout, (m, n) in cases:
        nbytes = 8 * m * n * torch.finfo(dtype).bits // 8
        label = {"op": kind, "shape": f"{m}x{n}" + (" (chunk)" if layout == "chunk" else "")}
        for name, fn in _variants(kind).items():
            leaves, split = _inputs(m, n, layout, device, dtype)  # fresh inputs per variant
            dy = torch.randn(m, n, device=device, dtype=dtype)

            def step():
                for t in leaves:
                    t.grad = None
                a, b = split()
                fn(a, b).backward(dy)

            try:
                ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
            except Exception as err:  # noqa: BLE001
                rows.append({**label, "variant": name, "error": repr(err)[:80]})
                continue
            gbps = nbytes / ms / 1e6
            rows.append({**label, "variant": name, "ms": round(ms, 4), "GB/s": round(gbps),
                         "%copy": round(100 * gbps / copy_gbps, 1)})
            del leaves, dy
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    from table import markdown

    print(markdown(run()))


if __name__ == "__main__":
    main()
