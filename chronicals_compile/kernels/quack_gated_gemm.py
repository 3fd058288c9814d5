"""QuACK's GEMMs with a gated activation in the epilogue, behind the two calls our MLP op makes.

Why QuACK and not a Triton kernel of ours: the SwiGLU elementwise passes of a training step
(~8 ms of Qwen2.5-0.5B's 8 x 2048 step on an H200) vanish only into a GEMM epilogue running at
cuBLAS speed; our Triton GEMMs with that epilogue lost 1.3-8 ms a step in every form (plain, TMA,
persistent, warp-specialised), while QuACK's CuTe-DSL kernels (Tri Dao's, Hopper and Blackwell)
win: forward 0.426 against cuBLAS + Inductor's 0.521 ms a layer, backward 0.354 against 0.435
with the tile below (benchmarks/results/2026-12-03-h200-session11/call7, session12/call1).

QuACK is an optional, CUDA-only dependency (``pip install chronicals-compile[quack]``: quack-kernels
0.3.0, the release these calls are written against, on nvidia-cutlass-dsl 4.4.1). Where it is
missing or the GPU is not sm90/sm100, ``unavailable_reason`` says why and the compiler leaves the
MLP to Inductor. Configs are pinned rather than autotuned: QuACK's autotuner compiles every
candidate (~150 s for each kernel on the H200) and, run in the step, would pick among configs
within noise of these.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from . import cute_dsl_device, quack_direct_launch

#: The activations QuACK's gated epilogues compute, by our op's names (QuACK's "geglu" is the
#: tanh approximation, as Gemma's ``gelu_pytorch_tanh``).
ACTIVATIONS = ("swiglu", "geglu")

#: Backward tile: 128 x 128 ping-pong, swapped operands, with the thread-block cluster by GPU. On
#: the H200, QuACK's autotuner chose a 1 x 2 cluster at Qwen2.5-0.5B's MLP (16384 x 896 -> 4864):
#: 0.337 ms against 2 x 1's 0.352 and QuACK's default config's 0.443
#: (benchmarks/results/2026-12-03-h200-session12/call1/quack_tuned.md). On the H100 the order is
#: the other way round: 2 x 1 ran 0.363 ms against 1 x 2's 0.379 with our four C stages, and 0.382
#: against 0.396 with QuACK's two, every output bit-equal
#: (benchmarks/results/2026-12-07-h100-session23/call4-dgated_stages.md). The forward keeps QuACK's
#: default (128 x 192 ping-pong, cluster 2 x 1: 0.426 ms; the autotuner's pick measured 0.444 there).
_BACKWARD_TILE = dict(tile_m=128, tile_n=128, pingpong=True, swap_ab=True)
#: (cluster_m, cluster_n) of the backward tile by a substring of the GPU's name; others get the default.
_BACKWARD_CLUSTER_BY_GPU = {"H100": (2, 1)}
_BACKWARD_CLUSTER_DEFAULT = (1, 2)


def backward_cluster(gpu_name: str) -> tuple[int, int]:
    """The backward tile's cluster on a GPU of this name. ``CHRONICALS_QUACK_DGATED_CLUSTER=MxN``
    (``1x2`` or ``2x1``) overrides the table, so a benchmark can time both on one machine."""
    setting = os.environ.get("CHRONICALS_QUACK_DGATED_CLUSTER", "").strip().lower()
    if setting:
        if setting not in ("1x2", "2x1"):
            raise ValueError(f"CHRONICALS_QUACK_DGATED_CLUSTER must be 1x2 or 2x1, got {setting!r}")
        m, n = setting.split("x")
        return int(m), int(n)
    for part, cluster in _BACKWARD_CLUSTER_BY_GPU.items():
        if part in gpu_name:
            return cluster
    return _BACKWARD_CLUSTER_DEFAULT


@functools.lru_cache(maxsize=None)
def _import_reason() -> str | None:
    try:
        import quack  # noqa: F401
        from quack import gemm_interface  # noqa: F401 - needs a CUDA device at import
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        return f"quack-kernels is not importable ({type(err).__name__}: {err}); pip install chronicals-compile[quack]"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the fused epilogue GEMMs can run on ``device`` in ``dtype``, else why not.
    Cached (``cute_dsl_device``): the op asks on every call, twice a layer."""
    return (cute_dsl_device.device_reason(cute_dsl_device.with_index(device), dtype, "QuACK's gated GEMMs",
                                          "the MLP") or _import_reason())


@functools.cache
def _interface():
    """QuACK's entry points, imported once: the op calls them twice a layer."""
    from quack.gemm_interface import gemm_dgated_tuned, gemm_gated_tuned

    return gemm_gated_tuned, gemm_dgated_tuned


def backward_config(gpu_name: str) -> Any:
    """QuACK's GemmConfig for the backward (dgated) GEMM on a GPU of this name."""
    from quack.gemm_config import GemmConfig

    cluster_m, cluster_n = backward_cluster(gpu_name)
    return GemmConfig(**_BACKWARD_TILE, cluster_m=cluster_m, cluster_n=cluster_n)


@functools.cache
def _backward_config(device: torch.device):
    return backward_config(torch.cuda.get_device_name(device))


@functools.cache
def _forward_config(device: torch.device):
    from quack.gemm_interface import default_config

    return default_config(device)


def gated_forward(x2: Tensor, w_interleaved: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``preact = x2 @ w_interleaved.T`` ([M, 2F], gate and up columns interleaved) and
    ``postact = act(gate) * up`` ([M, F]) from one GEMM; both in ``x2``'s dtype."""
    gemm_gated = _interface()[0]
    m, f2 = x2.shape[0], w_interleaved.shape[0]
    preact = torch.empty((m, f2), dtype=x2.dtype, device=x2.device)
    postact = torch.empty((m, f2 // 2), dtype=x2.dtype, device=x2.device)
    config = _forward_config(x2.device)

    def public() -> None:
        gemm_gated.fn(x2, w_interleaved.t(), preact, postact, activation=activation, config=config)

    quack_direct_launch.gated_forward(x2, w_interleaved, preact, postact, activation, config, public)
    return preact, postact


def gated_backward(dy2: Tensor, w_down: Tensor, preact: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``dpreact`` ([M, 2F], interleaved like ``preact``) of ``(dy2 @ w_down)`` through the gated
    activation, and the recomputed ``postact`` ([M, F]) the down projection's weight gradient reads."""
    gemm_dgated = _interface()[1]
    config = _backward_config(dy2.device)
    m, f = dy2.shape[0], w_down.shape[1]
    dpreact = torch.empty((m, 2 * f), dtype=dy2.dtype, device=dy2.device)
    postact = torch.empty((m, f), dtype=preact.dtype, device=dy2.device)

    def public() -> None:
        gemm_dgated.fn(dy2, w_down, preact, dpreact, postact, activation=activation, dynamic_scheduler=True,
                       config=config)

    quack_direct_launch.gated_backward(dy2, w_down, preact, dpreact, postact, activation, config, public)
    return dpreact, postact
