"""QuACK's cross-entropy row kernel (Tri Dao's, CuTe DSL) for the cut cross-entropy's chunks.

Why: our Triton row kernel (``_ce_rows_kernel``) reads each row of a [C, V] logits chunk twice and
writes it once, because a 152k-vocabulary bf16 row (300 KB) does not fit in one SM. QuACK's kernel
spreads a row over a cluster of up to 16 CTAs and keeps it in their shared memory, so a row is read
once and written once: a third less traffic on the loss's only memory-bound pass (~1.05 ms a
3328-row chunk on the H100 for ours, five chunks a step at Qwen2.5-0.5B's 8 x 2048).

It computes ``G = softmax(z) - onehot(target)`` unweighted (zero rows for ``ignore_index``), so the
fused op defers the row weight (1 / valid rows for a mean) to its backward's scaling, where it is
free. Plain logits only: label smoothing, soft-capping and logit scaling stay with our kernel.
Targets outside ``[0, V)`` are handed to QuACK as ignored (it would read out of bounds); the caller
turns their loss into NaN, as for our kernel. CUDA with QuACK 0.3.0, sm90/sm100, bf16/fp16.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import cute_dsl_device


@functools.lru_cache(maxsize=None)
def _import_reason() -> str | None:
    try:
        from quack import cross_entropy  # noqa: F401 - needs CUDA and cutlass-dsl at import
    except Exception as err:  # noqa: BLE001 - any failure means: not usable here
        return f"quack-kernels is not importable ({type(err).__name__}: {err}); pip install chronicals-compile[quack]"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when QuACK's row kernel can take a chunk on ``device`` in ``dtype``, else why not."""
    return (cute_dsl_device.device_reason(cute_dsl_device.with_index(device), dtype, "QuACK's cross-entropy",
                                          "the logits") or _import_reason())


def safe_targets(target: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """``target`` with out-of-range entries replaced by ``ignore_index`` (QuACK reads the target's
    logit unchecked). One small kernel for all rows, before the chunks."""
    in_range = (target >= 0) & (target < vocab)
    return torch.where(in_range, target, torch.full_like(target, ignore_index))


def rows_in_place(z: Tensor, target: Tensor, ignore_index: int, loss_out: Tensor) -> None:
    """Over a [C, V] chunk of logits: each row's loss (``lse - z[target]``, 0 for ignored rows) into
    ``loss_out`` (fp32 [C]), and ``G = softmax(z) - onehot(target)`` written over ``z``."""
    from quack.cross_entropy import cross_entropy_fwd_out

    if z.shape[0]:
        cross_entropy_fwd_out(z, target, None, loss_out, None, z, ignore_index)
