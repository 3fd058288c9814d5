"""Where the 62 us idle before each of QuACK's forward gated GEMMs comes from (session 16's CUDA-only
trace: 1.48 ms a step at Qwen2.5-0.5B, with the host 31 ms ahead of the GPU).

Each case runs the same QuACK GEMM 20 times after a long ``torch.cuda._sleep`` (so the host is
far ahead and the queue never drains) and reports, from a CUDA-only profiler trace, the idle time
between the kernel before and the QuACK kernel. Cases: after the weight interleave (as in the
step), back to back, after a small elementwise kernel, and the backward's dgated GEMM. If the hole
shows back to back, it is the kernel's own launch cost on the GPU, not anything our op does; the
forward's other configs (the dynamic scheduler the backward uses, other clusters and tiles) then
say whether a pinned forward config avoids it, by idle + kernel time together.
CUDA with QuACK only.
"""
from __future__ import annotations

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from chronicals_compile.kernels import quack_gated_gemm
from chronicals_compile.ops.gated_mlp import _interleave

M, D, F = 16384, 896, 4864
REPS = 20


def _holes(prof, name_part: str) -> tuple[float, float, int]:
    """(median idle us before kernels whose name has ``name_part``, their median duration us, count)."""
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    gaps, durations = [], []
    for before, after in zip(events, events[1:]):
        if name_part in after.name.lower():
            gaps.append(after.time_range.start - before.time_range.end)
            durations.append(after.time_range.end - after.time_range.start)
    if not gaps:
        return float("nan"), float("nan"), 0
    return statistics.median(gaps), statistics.median(durations), len(gaps)


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, D, device=dev, generator=g, dtype=torch.bfloat16)
    wg, wu = (torch.randn(F, D, device=dev, generator=g, dtype=torch.bfloat16) * 0.03 for _ in range(2))
    wd = torch.randn(D, F, device=dev, generator=g, dtype=torch.bfloat16) * 0.03
    dy = torch.randn(M, D, device=dev, generator=g, dtype=torch.bfloat16)
    w1 = _interleave(wg, wu)
    preact, _ = quack_gated_gemm.gated_forward(x, w1, "swiglu")
    quack_gated_gemm.gated_backward(dy, wd, preact, "swiglu")
    small = torch.randn(4096, device=dev)
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import gemm_gated_tuned

    def forward_with(config: GemmConfig, dynamic: bool):
        preact = torch.empty((M, 2 * F), dtype=x.dtype, device=dev)
        postact = torch.empty((M, F), dtype=x.dtype, device=dev)
        gemm_gated_tuned.fn(x, w1.t(), preact, postact, activation="swiglu", dynamic_scheduler=dynamic,
                            config=config)

    cases = {
        "interleave, then forward": lambda: quack_gated_gemm.gated_forward(x, _interleave(wg, wu), "swiglu"),
        "forward back to back": lambda: quack_gated_gemm.gated_forward(x, w1, "swiglu"),
        "small add, then forward": lambda: (small.add_(1.0), quack_gated_gemm.gated_forward(x, w1, "swiglu")),
        "backward (dgated) back to back": lambda: quack_gated_gemm.gated_backward(dy, wd, preact, "swiglu"),
        "forward, default config + dynamic scheduler": lambda: forward_with(GemmConfig(), True),
        "forward, 128x192 pingpong cluster 1x1": lambda: forward_with(GemmConfig(cluster_m=1), False),
        "forward, 128x192 pingpong cluster 1x2": lambda: forward_with(GemmConfig(cluster_m=1, cluster_n=2), False),
        "forward, 128x128 pingpong cluster 1x2 dynamic": lambda: forward_with(
            GemmConfig(tile_n=128, cluster_m=1, cluster_n=2), True),
        "forward, 256x192 cooperative cluster 2x1": lambda: forward_with(GemmConfig(tile_m=256, pingpong=False), False),
    }
    print("| case | idle before QuACK's kernel us (median) | kernel us (median) | idle + kernel us | kernels |")
    print("|---|---|---|---|---|")
    for name, fn in cases.items():
        try:
            for _ in range(3):
                fn()
        except Exception as err:  # noqa: BLE001 - a config QuACK rejects is a row, not the end of the run
            print(f"| {name} | n/a ({type(err).__name__}: {str(err)[:80]}) | | | |", flush=True)
            continue
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(200_000_000)  # ~0.1 s: the host queues every rep before the GPU gets there
            for _ in range(REPS):
                fn()
            torch.cuda.synchronize()
        gap, dur, n = _holes(prof, "quack")
        print(f"| {name} | {gap:.1f} | {dur:.1f} | {gap + dur:.1f} | {n} |", flush=True)


if __name__ == "__main__":
    main()
