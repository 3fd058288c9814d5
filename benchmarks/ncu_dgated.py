"""The MLP's backward (dgated) GEMM under Nsight Compute: where its warps stall.

Why: at Qwen2.5-0.5B's MLP (16384 x 896 -> 4864) this kernel runs at 58% of its bytes-and-FLOPs
floor on the H200 (0.337 against ~0.19-0.22 ms) and 77% on the H100; the C-prefetch depth and the
cluster took what they could (sessions 22-23). Before changing QuACK's epilogue (issuing the
``preact`` loads from the producer warp during the mainloop), the hardware counters say whether the
epilogue's warps wait on those loads (long scoreboard), on its named barriers, or on the TMA
stores, and how busy DRAM and the tensor cores are. The kernel runs exactly as in the training
step (``quack_gated_gemm.gated_backward``: the direct launch of our four-C-stage subclass on
Hopper); the first call (QuACK's public call beside ours, compared bit for bit) runs outside the
profiled range.

Usage (a GPU with QuACK and ncu; the device's Firecracker machines read the counters):
  ncu --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats python3 benchmarks/ncu_dgated.py
"""
from __future__ import annotations

import torch

from chronicals_compile.kernels import quack_gated_gemm

M, D, F = 16384, 896, 4864  # tokens, hidden, intermediate


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    w_down = torch.randn(D, F, device="cuda", dtype=torch.bfloat16, generator=gen) / D ** 0.5
    preact = torch.randn(M, 2 * F, device="cuda", dtype=torch.bfloat16, generator=gen)
    for _ in range(3):  # the first-launch comparison, then the direct launch, warm
        dpreact, postact = quack_gated_gemm.gated_backward(dy, w_down, preact, "swiglu")
    torch.cuda.synchronize()
    assert torch.isfinite(dpreact).all() and torch.isfinite(postact).all()
    torch.cuda.profiler.start()
    quack_gated_gemm.gated_backward(dy, w_down, preact, "swiglu")
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_dgated: profiled one backward GEMM on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
