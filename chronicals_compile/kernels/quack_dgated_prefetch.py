"""QuACK's dgated GEMM (Hopper) compiled with a deeper prefetch of its epilogue's C operand.

Why: the backward GEMM of the fused MLP (``dy @ W_down`` with the SwiGLU backward in its
epilogue) reads ``preact`` as its C operand through TMA loads that QuACK 0.3.0 issues two
epilogue subtiles ahead (``epi_c_stage = 2``), keeping the rest of shared memory for four D
stages. At Qwen2.5-0.5B's MLP (16384 x 896 -> 4864) with our pinned tile, four C stages and two
D stages (same A/B stages, same shared memory) ran 0.374 ms against 0.392 (H100, 4.6%; 0.43 ms
of a 117.6 ms step), with every output bit equal to QuACK's own
(benchmarks/results/2026-12-06-h100-session22/call1-dgated_stages.md). Six or eight C stages cost
an A/B stage and lose.

Only the stage split differs from QuACK's kernel: the subclass recomputes QuACK's own shared
memory arithmetic with the C stage count fixed, and the compile mirrors ``_compile_gemm_dact``'s
dgated Hopper branch (derived from QuACK 0.3.0's code, not taken from it). The kernel goes through
QuACK's compile cache under its own key, so QuACK's own kernels are never replaced in that cache.
``quack_direct_launch`` still compares its first launch with QuACK's public call bit for bit and
keeps the public call if they differ. ``CHRONICALS_QUACK_DGATED_C_STAGES`` sets the count
(``quack``: QuACK's own choice).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

#: C stages by default (see the module docstring); 2 is QuACK's own choice for this tile.
DEFAULT_C_STAGES = 4
_KEY_VERSION = 1  # bump when the subclass's arithmetic changes: the compile cache key must change


def c_stages() -> int | None:
    """The C prefetch depth asked for, or None for QuACK's own."""
    value = os.environ.get("CHRONICALS_QUACK_DGATED_C_STAGES", str(DEFAULT_C_STAGES)).strip().lower()
    if value in ("quack", "default", ""):
        return None
    try:
        stages = int(value)
    except ValueError:
        raise ValueError(f"CHRONICALS_QUACK_DGATED_C_STAGES must be an integer >= 1 or 'quack', got {value!r}")
    if stages < 1:
        raise ValueError(f"CHRONICALS_QUACK_DGATED_C_STAGES must be >= 1, got {stages}")
    return stages


def stage_split(cls: type, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype, epilogue_args,
                smem_capacity: int, occupancy: int, stages: int) -> tuple[int, int, int]:
    """QuACK 0.3.0's ``GemmSm90._compute_stages`` arithmetic with ``stages`` C buffers: A/B stages
    fill what the epilogue's base D stages and the C buffers leave, and D stages take the remainder.
    ``benchmarks/bench_quack_dgated_stages.py`` times the same split by patching QuACK."""
    import cutlass.cute as cute

    epi_stage = 4 if epi_tile[1] <= 16 else 2
    d_bytes = cute.size(epi_tile) * d_dtype.width // 8 if d_dtype is not None else 0
    epi_bytes_per_stage = d_bytes + cls.epi_smem_bytes_per_stage(epilogue_args, cta_tile_shape_mnk, epi_tile)
    c_bytes = cute.size(epi_tile) * c_dtype.width // 8 * stages
    a_shape = cute.slice_(cta_tile_shape_mnk, (None, 0, None))
    b_shape = cute.slice_(cta_tile_shape_mnk, (0, None, None))
    ab_bytes = cute.size(a_shape) * a_dtype.width // 8 + cute.size(b_shape) * b_dtype.width // 8
    remaining = smem_capacity // occupancy - 1024 - epi_bytes_per_stage * epi_stage - c_bytes
    ab_stage = remaining // ab_bytes
    if epi_bytes_per_stage > 0:
        epi_stage += (remaining - ab_bytes * ab_stage) // epi_bytes_per_stage
    return ab_stage, epi_stage, stages


@functools.cache
def _gemm_class(stages: int) -> type:
    from quack.gemm_dact import GemmDGatedSm90

    class GemmDGatedDeepCSm90(GemmDGatedSm90):
        @classmethod
        def _compute_stages(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype,
                            epilogue_args, smem_capacity, occupancy):
            if c_dtype is None:
                return super()._compute_stages(cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype,
                                               c_dtype, epilogue_args, smem_capacity, occupancy)
            return stage_split(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype,
                               epilogue_args, smem_capacity, occupancy, stages)

    return GemmDGatedDeepCSm90


def compile_dgated(io_dtype: Any, accum_dtype: Any, activation: str, config: Any, capacity: tuple[int, int],
                   stages: int) -> Callable:
    """The kernel ``_compile_gemm_dact`` builds for ``quack_direct_launch``'s backward (A m-major,
    B k-major, D/C/PostAct m-major, persistent with a tile semaphore, no column vectors, no
    varlen), with ``stages`` C buffers. Hopper only: the caller keeps QuACK's kernel elsewhere."""
    if capacity[0] != 9:
        raise ValueError(f"the deep C prefetch is built for Hopper (sm90), not sm{capacity[0]}{capacity[1]}")
    from quack.activation import dgate_fn_map
    from quack.compile_utils import make_fake_tensor
    from quack.gemm_tvm_ffi_utils import (cached_compile, compile_gemm_kernel, div_for_dtype,
                                          make_fake_gemm_tensors, make_fake_scheduler_args)

    gemm_cls = _gemm_class(stages)
    tile = (config.tile_m, config.tile_n)
    cluster = (config.cluster_m, config.cluster_n, 1)
    m_a, m_b, m_d, m_c, m, n, _, batch = make_fake_gemm_tensors(io_dtype, io_dtype, accum_dtype, accum_dtype,
                                                                "m", "k", "m", "m")
    postact = make_fake_tensor(io_dtype, (m, n, batch), leading_dim=0, divisibility=div_for_dtype(io_dtype))
    epilogue = gemm_cls.EpilogueArguments(postact, dgate_fn_map[activation], mColVecBroadcast=None,
                                          mColVecReduce=None)
    scheduler = make_fake_scheduler_args(True, False, batch)

    def set_implicit_dtype(gemm: Any) -> None:
        gemm.implicit_dtype = io_dtype

    key = ("chronicals_dgated_deep_c", _KEY_VERSION, stages, io_dtype, accum_dtype, activation, tile, cluster,
           config.pingpong, capacity)
    return cached_compile(key, lambda: compile_gemm_kernel(
        gemm_cls, io_dtype, tile, cluster, config.pingpong, True, False, capacity, m_a, m_b, m_d, m_c, epilogue,
        scheduler, None, post_init=set_implicit_dtype))
