"""QK-RoPE forward+backward: ours (q and k in one launch) against eager transformers-style
``q*cos + rotate_half(q)*sin``, torch.compile of the same function, and Liger-Kernel (a missing
column when ``liger_kernel`` does not import).

Inputs are laid out as Dynamo hands them over: q and k are ``linear(...).view(B, S, H, D)
.transpose(1, 2)`` views of [B, S, H*D] leaves; cos/sin are [B, 1, S, D] (per-sequence positions,
as with packing). Bytes counted are the minimum: forward reads q, k, cos, sin and writes q_out,
k_out; backward reads the two incoming gradients, cos, sin and writes dq, dk.
"""
from __future__ import annotations

import torch

#: (B, S, Hq, Hk, D): Qwen2.5-0.5B, Llama-3-8B, and a D=256 model (Gemma-7B-like heads).
SHAPES = [(8, 2048, 14, 2, 64), (8, 2048, 32, 8, 128), (4, 2048, 16, 16, 256)]


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _eager(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _variants() -> dict:
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*

    variants = {
        "eager": _eager,
        "torch.compile": torch.compile(_eager, dynamic=False),
        "chronicals": torch.ops.chronicals.rope,
    }
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        # Liger takes cos/sin before the unsqueeze: [1 or B, S, D].
        variants["liger"] = lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos.squeeze(1), sin.squeeze(1))
    except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
        pass
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0) -> list[dict]:
    import triton.testing

    import chronicals_compile.ops  # noqa: F401

    rows = []
    for bsz, seq, hq, hk, d in SHAPES:
        size = torch.finfo(dtype).bits // 8
        qk = bsz * seq * (hq + hk) * d * size
        cs = bsz * seq * d * size  # one of cos/sin
        nbytes = 2 * (2 * qk) + 2 * (2 * cs)  # (read + write) of q,k in each pass; cos, sin each pass
        label = {"op": "rope", "shape": f"B{bsz} S{seq} Hq{hq} Hk{hk} D{d}"}
        for name, fn in _variants().items():
            # Fresh inputs per variant (Liger's backward writes into its gradient buffers).
            q_leaf = torch.randn(bsz, seq, hq * d, device=device, dtype=dtype, requires_grad=True)
            k_leaf = torch.randn(bsz, seq, hk * d, device=device, dtype=dtype, requires_grad=True)
            pos = torch.arange(seq, device=device, dtype=torch.float32).expand(bsz, seq)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
            emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
            cos, sin = emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)
            gq = torch.randn(bsz, hq, seq, d, device=device, dtype=dtype)
            gk = torch.randn(bsz, hk, seq, d, device=device, dtype=dtype)

            def step():
                q_leaf.grad = k_leaf.grad = None
                q = q_leaf.view(bsz, seq, hq, d).transpose(1, 2)
                k = k_leaf.view(bsz, seq, hk, d).transpose(1, 2)
                q_out, k_out = fn(q, k, cos, sin)
                torch.autograd.backward((q_out, k_out), (gq, gk))

            try:
                ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
            except Exception as err:  # noqa: BLE001
                rows.append({**label, "variant": name, "error": repr(err)[:80]})
                continue
            gbps = nbytes / ms / 1e6
            rows.append({**label, "variant": name, "ms": round(ms, 4), "GB/s": round(gbps),
                         "%copy": round(100 * gbps / copy_gbps, 1)})
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    from table import markdown

    print(markdown(run()))


if __name__ == "__main__":
    main()
