"""RMSNorm forward+backward: ours against eager, torch.compile of the same function, and Liger.

Bytes counted are the minimum any implementation must move: x read twice (forward and
backward), dy read once, y and dx written once, the weight and its gradient (negligible).
"""
from __future__ import annotations

import torch

SHAPES = [(16384, 896), (8192, 2048), (8192, 4096), (4096, 5120), (16384, 4096)]
EPS = 1e-6


def _variants():
    from chronicals_compile.ops.rms_norm import rms_norm_reference

    variants = {
        "eager": rms_norm_reference,
        "torch.compile": torch.compile(rms_norm_reference, dynamic=False),
        "chronicals": lambda x, w, eps: torch.ops.chronicals.rms_norm(x, w, eps),
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        variants["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
        pass
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0) -> list[dict]:
    import triton.testing

    import chronicals_compile.ops  # noqa: F401

    rows = []
    for m, n in SHAPES:
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(n, device=device, dtype=dtype)).requires_grad_(True)
        dy = torch.randn(m, n, device=device, dtype=dtype)
        nbytes = 5 * m * n * x.element_size()
        for name, fn in _variants().items():
            def step():
                x.grad = w.grad = None
                fn(x, w, EPS).backward(dy)
            try:
                ms = triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")
            except Exception as err:  # noqa: BLE001
                rows.append({"op": "rms_norm", "shape": f"{m}x{n}", "variant": name, "error": repr(err)[:80]})
                continue
            gbps = nbytes / ms / 1e6
            rows.append({"op": "rms_norm", "shape": f"{m}x{n}", "variant": name, "ms": round(ms, 4),
                         "GB/s": round(gbps), "%copy": round(100 * gbps / copy_gbps, 1)})
    return rows


def main() -> None:
    from table import markdown

    print(markdown(run()))


if __name__ == "__main__":
    main()
