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


def flash4(q, k, v):
    """flash-attn-4's CuTe-DSL kernels (Hopper forward and backward), reading [B, S, H, D] with
    grouped heads natively: the leaves are [B, S, H, D] memory, so the transposes are free."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def _reference_grads(q, k, v, go):
    """float32 math of the same inputs: what every row's error is measured against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    return torch.autograd.grad(out, leaves, go.float())


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
        ref = _reference_grads(q, k, v, go)
        for fname, fn, names in (("expanded k/v", expanded, backends), ("enable_gqa", grouped, backends),
                                 ("native GQA", flash4, {"flash-attn-4": None})):
            for bname in names:
                backend = names[bname]
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
                    err = max(float((a.float() - r).abs().max()) for a, r in zip(grads, ref))
                    fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=20, rep=100, return_mode="median") \
                        if backend is None else float("nan")
                    row.update({"fwd+bwd ms": round(ms, 3), "TFLOP/s": round(flops / ms / 1e9),
                                "fwd ms": round(fwd, 3), "max |grad - fp32|": f"{err:.2e}"})
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

    shapes = SHAPES[:1] if "--qwen-only" in sys.argv else None  # the e2e shape alone: FA4 compiles per shape
    print(markdown(run(shapes)))


if __name__ == "__main__":
    main()
