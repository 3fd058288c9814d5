"""Grouped-query causal attention, forward + backward: expanded k/v (what transformers hands SDPA
under compile, the ``repeat_kv`` copy and its backward reduction included) against SDPA reading
the unexpanded k/v with ``enable_gqa=True`` (what the ``gqa_attention`` pass produces), under
SDPA's own kernel choice and under each backend forced.

Decides ``config.OFF_BY_DEFAULT["gqa_attention"]``: the pass is worth turning on only if
``enable_gqa`` under the default choice is faster than the expanded path under the default choice
(ARCHITECTURE.md: cuDNN took 1.04 ms a layer, flash 1.39, at the Qwen shape). A combination a
backend refuses prints ``n/a``. CUDA only; ``triton.testing.do_bench`` medians.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: (B, S, Hq, Hkv, D): Qwen2.5-0.5B and Llama-3-8B at 8 x 2048.
SHAPES = [(8, 2048, 14, 2, 64), (8, 2048, 32, 8, 128)]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def expanded(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), is_causal=True)


def grouped(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _inputs(b, s, hq, hkv, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def leaf(h):  # [B, S, H, D] memory seen as [B, H, S, D], as after transformers' transpose
        return torch.randn(b, s, h, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    return leaf(hq), leaf(hkv), leaf(hkv), torch.randn(b, hq, s, d, device="cuda", generator=g, dtype=torch.bfloat16)


def run(shapes=None) -> list[dict]:
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for b, s, hq, hkv, d in shapes or SHAPES:
        q, k, v, go = _inputs(b, s, hq, hkv, d)
        flops = 3.5 * 4 * b * hq * s * s * d / 2  # causal forward (2 matmuls) + backward (2.5x)
        ref = None
        for fname, fn in (("expanded k/v", expanded), ("enable_gqa", grouped)):
            for bname, backend in backends.items():
                row = {"shape (B, S, Hq, Hkv, D)": f"{b}, {s}, {hq}, {hkv}, {d}", "k/v": fname, "backend": bname}

                def step():
                    out = fn(q, k, v)
                    return torch.autograd.grad(out, (q, k, v), go)

                try:
                    if backend is None:
                        grads = step()
                        ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
                    else:
                        with sdpa_kernel([backend]):
                            grads = step()
                            ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="median")
                    if ref is None:
                        ref = grads
                    err = max(float((a.float() - r.float()).abs().max()) for a, r in zip(grads, ref))
                    row.update({"fwd+bwd ms": round(ms, 3), "TFLOP/s": round(flops / ms / 1e9),
                                "max |grad - first row's|": f"{err:.2e}"})
                except Exception as exc:  # noqa: BLE001 - a refused combination is a row, not a crash
                    row["fwd+bwd ms"] = f"n/a ({type(exc).__name__})"
                rows.append(row)
                print(row, flush=True)
        del q, k, v, go
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from table import markdown

    print(markdown(run()))


if __name__ == "__main__":
    main()
