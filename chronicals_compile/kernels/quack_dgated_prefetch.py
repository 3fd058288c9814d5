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

Early C loads (``CHRONICALS_QUACK_DGATED_EARLY_C``): in QuACK's ping-pong schedule a math warp
group issues its tile's first C loads only once its epilogue starts, and then waits a full DRAM
round trip for the first one, with the tensor cores of that warp group idle; at K = 896 the
mainloop is short, so the wait is a large share of a tile (~9 us a tile pair on the H200). With
the edit, the warp group issues those loads as soon as its mainloop ends, before it waits for the
other group's epilogue to finish: each load then waits only for its ring slot to be freed by the
other group's epilogue (``quack_source_patch`` edits two lines of QuACK's ``kernel`` and
``epilogue``; the loads, slots and pipeline states are QuACK's own).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

from .quack_source_patch import Edit, patched_method

#: C stages by default (see the module docstring); 2 is QuACK's own choice for this tile.
DEFAULT_C_STAGES = 4
_KEY_VERSION = 2  # bump when the subclass changes: the compile cache key must change
#: whether the ping-pong warp groups issue their first C loads before the epilogue barrier
DEFAULT_EARLY_C = False


def early_c() -> bool:
    """Whether the backward's subclass issues its tile's first C loads right after the mainloop."""
    value = os.environ.get("CHRONICALS_QUACK_DGATED_EARLY_C", "1" if DEFAULT_EARLY_C else "0").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off"):
        raise ValueError(f"CHRONICALS_QUACK_DGATED_EARLY_C must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on")


def epi_tile() -> tuple[int, int] | None:
    """The epilogue subtile asked for (``CHRONICALS_QUACK_DGATED_EPI_TILE=MxN``), or None for
    QuACK's own (64 x 32 for the backward's 128 x 128 ping-pong tile: eight subtiles a tile, two
    named barriers each). A larger subtile means fewer, larger C loads and D stores."""
    value = os.environ.get("CHRONICALS_QUACK_DGATED_EPI_TILE", "quack").strip().lower()
    if value in ("quack", "default", ""):
        return None
    try:
        m, n = (int(v) for v in value.split("x"))
    except ValueError:
        m = n = 0
    if m not in (64, 128) or n not in (16, 32, 64, 128):
        raise ValueError(f"CHRONICALS_QUACK_DGATED_EPI_TILE must be 'quack' or MxN with M in 64, 128 and N in "
                         f"16, 32, 64, 128, got {value!r}")
    return m, n


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


#: the edits of QuACK 0.3.0's source that move the first C loads ahead of the epilogue barrier
_EARLY_C_KERNEL = Edit(
    anchor='self.pingpong_barrier_sync(warp_group_idx, "epi")',
    before=("if const_expr(has_C):",
            "    epi_producer_state = self.early_c_loads(epi_pipeline, epi_producer_state, tma_atom_c, mC_mnl, sC,",
            "                                            tile_coord_mnkl, varlen_manager, is_tma_warp)"))
_EARLY_C_EPILOGUE = Edit(anchor="if const_expr(copy_C is not None):",
                         replacement="if const_expr(copy_C is not None and not self.pingpong):")
#: no change: the subtile order ``early_c_loads`` reproduces must still be the epilogue's
_EPILOGUE_SUBTILE_ORDER = Edit(anchor="epi_tile_layout = cute.make_layout(epi_tile_shape, stride=(epi_tile_shape[1], 1))")


@functools.cache
def _gemm_class(stages: int, early: bool = False, subtile: tuple[int, int] | None = None) -> type:
    from quack.gemm_dact import GemmDGatedSm90

    class GemmDGatedDeepCSm90(GemmDGatedSm90):
        @staticmethod
        def _sm90_compute_tile_shape_or_override(cta_tile_shape_mnk, atom_layout_mnk, element_type=None,
                                                 epi_tile_override=None):
            return GemmDGatedSm90._sm90_compute_tile_shape_or_override(
                cta_tile_shape_mnk, atom_layout_mnk, element_type, epi_tile_override or subtile)

        @classmethod
        def _compute_stages(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype,
                            epilogue_args, smem_capacity, occupancy):
            if c_dtype is None:
                return super()._compute_stages(cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype,
                                               c_dtype, epilogue_args, smem_capacity, occupancy)
            return stage_split(cls, cta_tile_shape_mnk, epi_tile, a_dtype, b_dtype, d_dtype, c_dtype,
                               epilogue_args, smem_capacity, occupancy, stages)

    if not early:
        return GemmDGatedDeepCSm90
    return _early_c_class(GemmDGatedDeepCSm90)


def _early_c_class(base: type) -> type:
    import cutlass
    import cutlass.cute as cute
    from quack import copy_utils

    class GemmDGatedEarlyCSm90(base):
        kernel = patched_method(base, "kernel", (_EARLY_C_KERNEL,))
        epilogue = patched_method(base, "epilogue", (_EARLY_C_EPILOGUE, _EPILOGUE_SUBTILE_ORDER))

        @cute.jit
        def early_c_loads(self, epi_pipeline, epi_producer_state, tma_atom_c, mC_mnl, sC, tile_coord_mnkl,
                          varlen_manager, is_tma_warp):
            """The epilogue's first ``min(subtiles, C stages)`` C loads of this tile, in the order and
            ring slots QuACK's epilogue would use; returns the advanced producer state."""
            copy_c_fn, _, _ = self.epilog_gmem_copy_and_partition(
                tma_atom_c, varlen_manager.offset_batch_epi(mC_mnl, tile_coord_mnkl[3]),
                self.cta_tile_shape_mnk[:2], self.epi_tile, sC, tile_coord_mnkl)
            copy_c = copy_utils.tma_producer_copy_fn(copy_c_fn, epi_pipeline)
            epi_tile_shape = cute.zipped_divide(cute.make_layout(self.cta_tile_shape_mnk[:2]),
                                                self.epi_tile).shape[1]
            epi_tile_layout = cute.make_layout(epi_tile_shape, stride=(epi_tile_shape[1], 1))
            for epi_idx in cutlass.range(min(cute.size(epi_tile_shape), self.epi_c_stage), unroll=1):
                gmem_coord_c = epi_tile_layout.get_hier_coord(epi_idx)
                if is_tma_warp:
                    epi_pipeline.producer_acquire(epi_producer_state)
                    copy_c(src_idx=gmem_coord_c, producer_state=epi_producer_state)
                    epi_pipeline.producer_commit(epi_producer_state)
                epi_producer_state.advance()
            return epi_producer_state

    return GemmDGatedEarlyCSm90


def compile_dgated(io_dtype: Any, accum_dtype: Any, activation: str, config: Any, capacity: tuple[int, int],
                   stages: int, early: bool = False, subtile: tuple[int, int] | None = None) -> Callable:
    """The kernel ``_compile_gemm_dact`` builds for ``quack_direct_launch``'s backward (A m-major,
    B k-major, D/C/PostAct m-major, persistent with a tile semaphore, no column vectors, no
    varlen), with ``stages`` C buffers (early C loads: ``early``; epilogue subtile: ``subtile``). Hopper only: the caller keeps QuACK's kernel elsewhere."""
    if capacity[0] != 9:
        raise ValueError(f"the deep C prefetch is built for Hopper (sm90), not sm{capacity[0]}{capacity[1]}")
    from quack.activation import dgate_fn_map
    from quack.compile_utils import make_fake_tensor
    from quack.gemm_tvm_ffi_utils import (cached_compile, compile_gemm_kernel, div_for_dtype,
                                          make_fake_gemm_tensors, make_fake_scheduler_args)

    gemm_cls = _gemm_class(stages, early and config.pingpong, subtile)
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

    key = ("chronicals_dgated_deep_c", _KEY_VERSION, stages, early and config.pingpong, subtile, io_dtype, accum_dtype, activation, tile, cluster,
           config.pingpong, capacity)
    return cached_compile(key, lambda: compile_gemm_kernel(
        gemm_cls, io_dtype, tile, cluster, config.pingpong, True, False, capacity, m_a, m_b, m_d, m_c, epilogue,
        scheduler, None, post_init=set_implicit_dtype))
