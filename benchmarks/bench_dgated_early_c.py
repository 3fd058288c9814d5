"""The MLP's backward GEMM (``dy @ W_down`` with the SwiGLU backward in its epilogue) as the package
launches it, with and without early C loads, by C prefetch depth, epilogue subtile and cluster, at
Qwen2.5-0.5B's MLP (16384 x 896 -> 4864, bf16).

Why: the kernel ran at 0.337 ms on the H200 where its FLOPs and bytes allow about 0.2 ms: its
epilogue and the other warp group's mainloop do not overlap as ping-pong intends. Early C loads
(``quack_dgated_prefetch``: a warp group issues its tile's first C loads when its mainloop ends, not
when its epilogue begins) remove one DRAM round trip from every tile's epilogue; a 64 x 64 epilogue
subtile instead of QuACK's 64 x 32 halves the subtiles a tile (and their named barriers). Every
row's outputs must equal the first row's bit for bit (the variants move loads, not arithmetic).

Usage (Hopper GPU with QuACK 0.3.0):
    python benchmarks/bench_dgated_early_c.py [--c-stages 4,2] [--early 0,1] [--epi-tiles quack,64x64] [--clusters default,other]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

M, K, N = 16384, 896, 4864


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--c-stages", default="4,2")
    parser.add_argument("--early", default="0,1")
    parser.add_argument("--epi-tiles", default="quack,64x64")
    parser.add_argument("--clusters", default="default")
    args = parser.parse_args()
    from chronicals_compile.kernels import quack_direct_launch, quack_gated_gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
    w_down = torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=gen) / K ** 0.5
    preact = torch.randn(M, 2 * N, device="cuda", dtype=torch.bfloat16, generator=gen)
    bytes_moved = (dy.numel() + w_down.numel() + 2 * preact.numel() + M * N) * 2
    flops = 2 * M * N * K
    default = "{}x{}".format(*quack_gated_gemm.backward_cluster(torch.cuda.get_device_name()))
    other = "2x1" if default == "1x2" else "1x2"
    print("| cluster | C stages | early C | epilogue subtile | ms | TFLOP/s | GB/s of its bytes | kept | equal to the first row |\n"
          "|---|---|---|---|---|---|---|---|---|", flush=True)
    reference = None
    for cluster in [default if c == "default" else other for c in args.clusters.split(",")]:
        for stages, early, subtile in itertools.product(args.c_stages.split(","), args.early.split(","),
                                                          args.epi_tiles.split(",")):
            os.environ.update(CHRONICALS_QUACK_DGATED_CLUSTER=cluster, CHRONICALS_QUACK_DGATED_C_STAGES=stages,
                              CHRONICALS_QUACK_DGATED_EARLY_C=early, CHRONICALS_QUACK_DGATED_EPI_TILE=subtile)
            quack_gated_gemm._backward_config.cache_clear()
            quack_direct_launch._LAUNCHES.clear()
            try:
                out = quack_gated_gemm.gated_backward(dy, w_down, preact, "swiglu")  # compiles, compares
                launch = quack_direct_launch._LAUNCHES.get(("backward", dy.dtype, "swiglu", dy.device.index))
                ms = common.do_bench_ms(lambda: quack_gated_gemm.gated_backward(dy, w_down, preact, "swiglu"))
            except Exception as err:  # noqa: BLE001 - a failing configuration is a row, not a crash
                print(f"| {cluster} | {stages} | {early} | {subtile} | failed: {type(err).__name__}: "
                      f"{str(err)[:90]} | | | | |", flush=True)
                continue
            kept = (f"direct{' early' if launch.early_c else ''} {launch.epi_tile or ''}".strip() if launch
                    else "public call")
            if reference is None:
                reference, same = out, "reference"
            else:
                same = str(all(torch.equal(a, b) for a, b in zip(out, reference)))
            print(f"| {cluster} | {stages} | {early} | {subtile} | {ms:.4f} | {common.tflops(flops, ms):.0f} | "
                  f"{common.gbps(bytes_moved, ms):.0f} | {kept} | {same} |", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, M={M} K={K} N={N}, bf16, swiglu")


if __name__ == "__main__":
    main()
