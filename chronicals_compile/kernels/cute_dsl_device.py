"""Whether a CuTe-DSL kernel (QuACK's, flash-attn-4's: Hopper and Blackwell only) can run on a
device in a dtype: the one device check their wrappers share, each adding its own import check.
Answers are cached per (device, dtype), since the ops ask on every call (an uncached answer cost
8.9 us of host time a call, session14/call3)."""
from __future__ import annotations

import functools

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def with_index(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: one cache entry per GPU, whatever the caller spelled."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=None)
def device_reason(device: torch.device, dtype: torch.dtype, what: str, operand: str) -> str | None:
    """None when ``device`` is an sm90/sm100 GPU and ``dtype`` bf16/fp16, else why not, naming
    ``what`` (the kernels) and ``operand`` (what the call holds, for the device message)."""
    if device.type != "cuda":
        return f"{what}: CUDA only ({operand} on {device.type})"
    if dtype not in HALF_DTYPES:
        return f"{what}: bf16 or fp16 only, not {dtype}"
    major, _ = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"{what}: sm90 or sm100 GPUs only (this one is sm{major}x)"
    return None
