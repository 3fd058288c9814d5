"""The cut cross-entropy's row kernel alone and in the whole fused op: ours (two reads and a write of
each [C, V] chunk row) against QuACK's (the row held in a CTA cluster's shared memory: one read,
one write), at Qwen2.5-0.5B's training call (16384 x 896 x 151936, bf16: five 3328-row chunks).

Prints ms and the HBM rate counting each kernel's own passes (ours 3, QuACK's 2) and the fused op's
forward (loss, dh, dW in fp32) per row kernel. CUDA with QuACK only.
"""
from __future__ import annotations

import torch
from triton.testing import do_bench

from chronicals_compile.kernels import linear_cross_entropy as k
from chronicals_compile.kernels import quack_cross_entropy
from chronicals_compile.verify import linear_cross_entropy as case

N, D, V, CHUNK = 16384, 896, 151936, 3328


def main() -> None:
    reason = quack_cross_entropy.unavailable_reason(torch.device("cuda"), torch.bfloat16)
    if reason:
        raise SystemExit(reason)
    h, w, t, _ = case.make_inputs(N, D, V, torch.bfloat16, "some", 0, "cuda")
    z0 = (h[:CHUNK] @ w.t()).contiguous()
    z = z0.clone()
    tc = t[:CHUNK].contiguous()
    row_w = torch.ones(CHUNK, device="cuda")
    loss = torch.empty(CHUNK, device="cuda")
    tiles = k.default_tiles(torch.bfloat16, h.device)
    safe = quack_cross_entropy.safe_targets(tc, V, -100)
    chunk_bytes = CHUNK * V * 2

    def ours():
        z.copy_(z0)
        k.launch_rows(z, tc, row_w, tiles)

    def quack():
        z.copy_(z0)
        quack_cross_entropy.rows_in_place(z, safe, -100, loss)

    copy_ms = do_bench(lambda: z.copy_(z0), warmup=10, rep=100)
    print(f"| [{CHUNK}, {V}] bf16 chunk | ms (copy of the chunk subtracted) | GB/s counting its passes |")
    print("|---|---|---|")
    print(f"| copy | {copy_ms:.3f} | {2 * chunk_bytes / copy_ms / 1e6:.0f} |")
    for name, fn, passes in (("ours (Triton)", ours, 3), ("QuACK", quack, 2)):
        ms = do_bench(fn, warmup=10, rep=100) - copy_ms
        print(f"| {name} | {ms:.3f} | {passes * chunk_bytes / ms / 1e6:.0f} |", flush=True)

    print(f"\n| fused op forward at ({N}, {D}, {V}) | ms | peak extra GiB |")
    print("|---|---|---|")
    for rows in ("triton", "quack"):
        fn = lambda: k.fused(h, w, t, keep_fp32=True, defer_weight=True, rows=rows)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(fn, warmup=3, rep=50)
        print(f"| rows={rows} | {ms:.2f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
