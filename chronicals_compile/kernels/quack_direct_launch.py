"""QuACK's two gated GEMMs launched with their compiled kernel and arguments looked up once.

Why: QuACK's public call (``gemm_gated_tuned.fn`` -> ``gemm_act``) rebuilds on every call what is
fixed for a given dtype and activation: the config, ten tensor views, the majors and cute dtypes,
a 23-key ``lru_cache`` lookup of the compiled kernel, the scheduler arguments. That was ~73 us of
the H100 host's time a call (results/2026-12-06-h100-session19/call2), 48 calls a step, in the
layers where the host keeps only just ahead of the GPU. Here the compiled kernel, its scheduler
arguments and the epilogue-argument class are found once per (dtype, activation, device), and a
call builds only the four or five strided views the kernel takes (the same shapes and strides
QuACK's own permutes give, made in one ``as_strided`` each).

The views are derived from QuACK 0.3.0's code, not taken from it, so the first launch of each
kind runs QuACK's public call beside ours and compares the outputs bit for bit (same kernel, same
inputs: they must be equal). If they are not, or a lookup fails (another QuACK version), that kind
stays on the public call with a warning. ``CHRONICALS_QUACK_LAUNCH=public`` keeps every call on it.
On Hopper the backward's kernel is QuACK's with a deeper C prefetch (``quack_dgated_prefetch``);
the same first-launch comparison guards it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import torch
from torch import Tensor

from . import quack_dgated_prefetch

log = logging.getLogger("chronicals_compile")


@dataclasses.dataclass
class _Launch:
    kernel: Callable
    epilogue: type
    scheduler: Any  # TileSchedulerOptions without a semaphore (forward); a factory (backward)
    max_active_clusters: int = 0
    swizzle: int = 8
    c_stages: int | None = None  # the backward's C prefetch depth when not QuACK's own (quack_dgated_prefetch)


#: (kind, dtype, activation, device index) -> _Launch, or None when that kind stays on the public call.
_LAUNCHES: dict[tuple, _Launch | None] = {}


def _eligible(*tensors: Tensor) -> bool:
    """The views below are written for contiguous tensors of one dtype; anything else, or
    ``CHRONICALS_QUACK_LAUNCH=public``, takes the public call."""
    dtype = tensors[0].dtype
    return (os.environ.get("CHRONICALS_QUACK_LAUNCH", "direct") != "public"
            and all(t.is_contiguous() and t.dtype == dtype for t in tensors))


def _as3d(t: Tensor, shape: tuple[int, int], strides: tuple[int, int], batch_stride: int) -> Tensor:
    return t.as_strided((*shape, 1), (*strides, batch_stride))


def compile_forward(io_dtype: torch.dtype, activation: str, config: Any, capacity: tuple[int, int]) -> Callable:
    """The gated forward kernel QuACK's public call compiles for these arguments (no device needed:
    tests/kernels/test_quack_kernels_compile.py lowers it for sm90 and sm100 on a CPU)."""
    from quack.cute_dsl_utils import torch2cute_dtype_map
    from quack.gemm_act import _compile_gemm_act

    cute = torch2cute_dtype_map[io_dtype]
    return _compile_gemm_act(cute, cute, cute, None, cute, "k", "k", "n", None, "n",
                             (config.tile_m, config.tile_n), (config.cluster_m, config.cluster_n, 1),
                             config.pingpong, True, False, activation, None, None, 0, False, False,
                             capacity, "gated")


def _forward_launch(x2: Tensor, activation: str, config: Any) -> _Launch:
    from quack.cute_dsl_utils import get_device_capacity, get_max_active_clusters
    from quack.gemm_act import GemmActMixin
    from quack.gemm_tvm_ffi_utils import make_scheduler_args

    kernel = compile_forward(x2.dtype, activation, config, get_device_capacity(x2.device))
    clusters = get_max_active_clusters(config.cluster_m * config.cluster_n)
    return _Launch(kernel, GemmActMixin.EpilogueArguments,
                   make_scheduler_args(clusters, config.max_swizzle_size, None))


def _forward_direct(launch: _Launch, x2: Tensor, w1: Tensor, preact: Tensor, postact: Tensor) -> None:
    """QuACK's forward with its default (non-swapped) config: A = x2 (m, k), B = w1 (n, k), D =
    preact (m, n), PostAct (m, n/2), each as (rows, cols, 1) with the batch stride its unsqueeze(0)
    gives a contiguous tensor: rows x cols."""
    m, k = x2.shape
    n = w1.shape[0]
    a = _as3d(x2, (m, k), (k, 1), m * k)
    b = _as3d(w1, (n, k), (k, 1), n * k)
    d = _as3d(preact, (m, n), (n, 1), m * n)
    post = _as3d(postact, (m, n // 2), (n // 2, 1), m * (n // 2))
    epilogue = launch.epilogue(post, None, mRowVecBroadcast=None, mColVecBroadcast=None)
    launch.kernel(a, b, d, None, epilogue, launch.scheduler, None)


def backward_stages(c_stages: int | None, capacity: tuple[int, int]) -> int | None:
    """The C prefetch depth the backward is compiled with: ours on Hopper, QuACK's own elsewhere."""
    return c_stages if capacity[0] == 9 else None


def compile_backward(io_dtype: torch.dtype, activation: str, config: Any, capacity: tuple[int, int],
                     stages: int | None) -> Callable:
    """The dgated backward kernel the direct launch runs: QuACK's own (``stages`` None), or its Hopper
    subclass with ``stages`` C buffers (``quack_dgated_prefetch``; ``backward_stages`` picks). No
    device needed, as for ``compile_forward``."""
    from quack.cute_dsl_utils import torch2cute_dtype_map
    from quack.gemm_dact import _compile_gemm_dact

    if not config.swap_ab:
        raise ValueError("the direct dgated launch is written for the swapped (swap_ab) tile")
    cute = torch2cute_dtype_map[io_dtype]
    f32 = torch2cute_dtype_map[torch.float32]
    if stages is None:
        return _compile_gemm_dact(cute, cute, f32, f32, cute, cute, "m", "k", "m", "m", "m",
                                  (config.tile_m, config.tile_n), (config.cluster_m, config.cluster_n, 1),
                                  config.pingpong, True, True, activation, None, 0, None, 0, False, False,
                                  capacity, "dgated")
    return quack_dgated_prefetch.compile_dgated(cute, f32, activation, config, capacity, stages)


def _backward_launch(dy2: Tensor, activation: str, config: Any, c_stages: int | None) -> _Launch:
    from quack.cute_dsl_utils import get_device_capacity, get_max_active_clusters
    from quack.gemm_dact import GemmDGatedMixin
    from quack.gemm_tvm_ffi_utils import make_scheduler_args

    capacity = get_device_capacity(dy2.device)
    stages = backward_stages(c_stages, capacity)
    kernel = compile_backward(dy2.dtype, activation, config, capacity, stages)
    clusters = get_max_active_clusters(config.cluster_m * config.cluster_n)
    return _Launch(kernel, GemmDGatedMixin.EpilogueArguments, make_scheduler_args, clusters, config.max_swizzle_size,
                   stages)


def _backward_direct(launch: _Launch, dy2: Tensor, w_down: Tensor, preact: Tensor, dpreact: Tensor,
                     postact: Tensor) -> None:
    """QuACK's dgated GEMM with a swapped (swap_ab) config and the dynamic scheduler: A = w_down^T
    (f, h), B = dy2 (m, h), and the bf16 pairs of preact/dpreact read as one fp32 each, (f, m)
    column-major, as ``gemm_dgated_tuned`` -> ``gemm_dact`` lay them out."""
    m, h = dy2.shape
    f = w_down.shape[1]
    a = _as3d(w_down, (f, h), (1, f), f)
    b = _as3d(dy2, (m, h), (h, 1), m * h)
    out = _as3d(dpreact.view(torch.float32), (f, m), (1, f), f * m)
    pre = _as3d(preact.view(torch.float32), (f, m), (1, f), f * m)
    post = _as3d(postact, (f, m), (1, f), f * m)
    semaphore = torch.zeros(1, dtype=torch.int32, device=dy2.device)
    scheduler = launch.scheduler(launch.max_active_clusters, launch.swizzle, semaphore)
    epilogue = launch.epilogue(post, None, mColVecBroadcast=None, mColVecReduce=None)
    launch.kernel(a, b, out, pre, epilogue, scheduler, None)


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _first_launch(key: tuple, build: Callable[[], _Launch], run_direct: Callable[[_Launch], None],
                  run_public: Callable[[], None], outputs: tuple[Tensor, ...]) -> None:
    """Build the launch, run QuACK's public call and ours, keep ours only if the outputs match."""
    run_public()
    if _capturing(outputs[0]):  # no comparison (a sync) inside a graph capture
        return
    try:
        launch = build()
        expected = tuple(t.clone() for t in outputs)
        for t in outputs:
            t.fill_(float("nan"))
        run_direct(launch)
        same = all(torch.equal(got, want) for got, want in zip(outputs, expected))
    except Exception as err:  # noqa: BLE001 - any failure: stay on the public call
        log.warning("chronicals: QuACK's %s GEMM stays on its public call (direct launch failed: %r)", key[0], err)
        _LAUNCHES[key] = None
        run_public()
        return
    if not same:
        log.warning("chronicals: QuACK's %s GEMM stays on its public call (the direct launch's outputs differ)",
                    key[0])
        _LAUNCHES[key] = None
        run_public()
        return
    _LAUNCHES[key] = launch


def gated_forward(x2: Tensor, w1: Tensor, preact: Tensor, postact: Tensor, activation: str,
                  config: Any, public: Callable[[], None]) -> None:
    key = ("forward", x2.dtype, activation, x2.device.index)
    launch = _LAUNCHES.get(key, False) if _eligible(x2, w1, preact, postact) else None
    if launch:
        _forward_direct(launch, x2, w1, preact, postact)
    elif launch is None:
        public()
    else:
        _first_launch(key, lambda: _forward_launch(x2, activation, config),
                      lambda la: _forward_direct(la, x2, w1, preact, postact), public, (preact, postact))


def gated_backward(dy2: Tensor, w_down: Tensor, preact: Tensor, dpreact: Tensor, postact: Tensor,
                   activation: str, config: Any, public: Callable[[], None]) -> None:
    key = ("backward", dy2.dtype, activation, dy2.device.index)
    launch = _LAUNCHES.get(key, False) if _eligible(dy2, w_down, preact, dpreact, postact) else None
    if launch:
        _backward_direct(launch, dy2, w_down, preact, dpreact, postact)
    elif launch is None:
        public()
    else:
        c_stages = quack_dgated_prefetch.c_stages()  # read outside _first_launch: a bad setting raises
        _first_launch(key, lambda: _backward_launch(dy2, activation, config, c_stages),
                      lambda la: _backward_direct(la, dy2, w_down, preact, dpreact, postact), public,
                      (dpreact, postact))
