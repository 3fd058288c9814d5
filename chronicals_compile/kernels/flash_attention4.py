"""flash-attn-4's CuTe-DSL causal attention (Tri Dao's; Hopper and Blackwell), forward and backward,
behind the two calls ``chronicals::flash_attention`` makes.

Why: after the causal-mask pass, attention is ~18.6 ms of Qwen2.5-0.5B's 8 x 2048 step on an
H200 under cuDNN's SDPA (about 270 TFLOP/s of causal work); FA4's Hopper kernels are written for
this chip's warp-specialised pipeline and read grouped key/value heads natively.

An optional, CUDA-only dependency like QuACK (``pip install chronicals-compile[quack]`` installs
both): flash-attn-4 4.0.0b4, the last beta that runs on QuACK 0.3.0's nvidia-cutlass-dsl 4.4.1.
Where it is missing or the GPU is not sm90/sm100, ``unavailable_reason`` says why and the compiler
leaves attention to SDPA. Layout: FA4 takes [B, S, H, D]; transformers' attention inputs are
[B, H, S, D] views of [B, S, H, D] memory, so the transposes here cost nothing.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cute_dsl_device


@functools.lru_cache(maxsize=None)
def _import_reason() -> str | None:
    try:
        from flash_attn.cute import interface  # noqa: F401 - needs CUDA and cutlass-dsl at import
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        return f"flash-attn-4 is not importable ({type(err).__name__}: {err}); pip install chronicals-compile[quack]"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when FA4 can run causal attention on ``device`` in ``dtype`` at ``head_dim``, else why not."""
    if head_dim % 8 or head_dim > 128:
        return f"head dim {head_dim} is not a multiple of 8 up to 128 (the widths FA4's Hopper kernels are built for)"
    return (cute_dsl_device.device_reason(cute_dsl_device.with_index(device), dtype, "flash-attn-4", "attention")
            or _import_reason())


def _bshd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: out [B, Hq, S, D] (a view of [B, S, Hq, D] memory), lse [B, Hq, S] fp32."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale, causal=True, return_lse=True)
    return _bshd(out), lse


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)``, each [B, H, S, D] viewing [B, S, H, D] memory (as the fake kernel says)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = (torch.empty_like(_bshd(t), memory_format=torch.contiguous_format) for t in (q, k, v))
    _flash_attn_bwd(_bshd(q), _bshd(k), _bshd(v), _bshd(out), _bshd(dout), lse, scale, True, dq=dq, dk=dk, dv=dv)
    return _bshd(dq), _bshd(dk), _bshd(dv)
