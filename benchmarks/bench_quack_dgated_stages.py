"""QuACK's dgated GEMM (``dy @ W_down`` with the SwiGLU backward in its epilogue) by the depth of its
epilogue's C prefetch, at Qwen2.5-0.5B's MLP (16384 x 896 -> 4864).

Why: in the step this kernel runs at about half the speed its bytes and FLOPs allow (H100: 9.46 ms
a step at 362 TFLOP/s, ~6.4 ms if its epilogue overlapped the mainloop; session 19's profile).
Its epilogue reads ``preact`` (C) through TMA loads issued only when the epilogue starts, two
subtiles ahead (``epi_c_stage = 2``), so each CTA tile may wait on DRAM latency subtile by subtile.
This measures whether a deeper prefetch (more C stages, paid for with A/B or D stages in shared
memory) helps, before anyone changes the kernel. QuACK's ``_compute_stages`` is patched in this
process only (the package never does this); every output must equal the unpatched kernel's bit
for bit.

Usage (GPU with QuACK 0.3.0): python benchmarks/bench_quack_dgated_stages.py [--c-stages 2,4,6,8] [--tiles pinned,...]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("QUACK_CACHE_ENABLED", "0")  # each stage count compiles afresh (one cache key)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M, K, N = 16384, 896, 4864  # rows, hidden, intermediate (Qwen2.5-0.5B at 8 x 2048)
TILES = {
    # "pinned": the H200's autotuned tile (session 12), the package's backward tile outside H100s;
    # "pp128x128-c2x1": the package's backward tile on H100s since session 23 (0.363 against 0.379 ms)
    "pinned": dict(tile_m=128, tile_n=128, pingpong=True, cluster_m=1, cluster_n=2, swap_ab=True),
    "quack-default": None,
    # neighbours of the pinned tile that a deeper C prefetch might favour (session 12's autotune ran at 2)
    "pp128x128-c2x1": dict(tile_m=128, tile_n=128, pingpong=True, cluster_m=2, cluster_n=1, swap_ab=True),
    "pp128x192": dict(tile_m=128, tile_n=192, pingpong=True, cluster_m=1, cluster_n=2, swap_ab=True),
    "pp192x128": dict(tile_m=192, tile_n=128, pingpong=True, cluster_m=1, cluster_n=2, swap_ab=True),
    "coop256x128": dict(tile_m=256, tile_n=128, pingpong=False, cluster_m=1, cluster_n=2, swap_ab=True),
}


def _stages_with(c_stages: int | None):
    """QuACK 0.3.0's ``GemmSm90._compute_stages`` with ``epi_c_stage`` forced: the package's own
    split (``quack_dgated_prefetch.stage_split``), or QuACK's choice for None."""
    from quack.gemm_sm90 import GemmSm90

    from chronicals_compile.kernels.quack_dgated_prefetch import stage_split

    original = GemmSm90.__dict__["_compute_stages"].__func__

    def compute(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype, epilogue_args,
                smem_capacity, occupancy):
        if c_stages is None or c_dtype is None:
            return original(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype, epilogue_args,
                            smem_capacity, occupancy)
        split = stage_split(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype, epilogue_args,
                            smem_capacity, occupancy, c_stages)
        print(f"  c_stages={c_stages}: ab_stage={split[0]} epi_stage={split[1]}", flush=True)
        return split

    return classmethod(compute)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--c-stages", default="2,4,6,8")
    parser.add_argument("--tiles", default="pinned,quack-default", help=f"comma-separated, of {', '.join(TILES)}")
    args = parser.parse_args()
    from quack import gemm_dact
    from quack.gemm_config import GemmConfig
    from quack.gemm_interface import default_config, gemm_dgated_tuned
    from quack.gemm_sm90 import GemmSm90

    gen = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w_down = torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=gen) / K ** 0.5
    preact = torch.randn(M, 2 * N, device="cuda", dtype=torch.bfloat16, generator=gen)
    bytes_moved = (dy.numel() + w_down.numel() + 2 * preact.numel() + M * N) * 2
    flops = 2 * M * N * K
    print(f"| tile | C stages | ms | TFLOP/s | GB/s of its bytes | equal to QuACK's own |\n|---|---|---|---|---|---|")
    original = GemmSm90.__dict__["_compute_stages"]
    for label in args.tiles.split(","):
        tile = TILES[label]
        config = GemmConfig(**tile) if tile else default_config(dy.device)
        reference = None
        for c in [None, *(int(s) for s in args.c_stages.split(","))]:
            GemmSm90._compute_stages = _stages_with(c)
            gemm_dact._compile_gemm_dact.cache_clear()
            dpre = torch.empty(M, 2 * N, device="cuda", dtype=torch.bfloat16)
            post = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)

            def call():
                gemm_dgated_tuned.fn(dy, w_down, preact, dpre, post, activation="swiglu",
                                     dynamic_scheduler=True, config=config)
            try:
                ms = common.do_bench_ms(call)
            except Exception as err:  # noqa: BLE001 - a stage count that does not fit is a row, not a crash
                print(f"| {label} | {c} | failed: {type(err).__name__}: {str(err)[:80]} | | | |", flush=True)
                continue
            if reference is None:
                reference = (dpre.clone(), post.clone())
                same = "reference"
            else:
                same = str(torch.equal(dpre, reference[0]) and torch.equal(post, reference[1]))
            stages = "QuACK's" if c is None else c
            print(f"| {label} | {stages} | {ms:.4f} | {common.tflops(flops, ms):.0f} | "
                  f"{common.gbps(bytes_moved, ms):.0f} | {same} |", flush=True)
        GemmSm90._compute_stages = original
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, M={M} K={K} N={N}, bf16, swiglu")


if __name__ == "__main__":
    main()
