"""``sdpa(q, k, v, is_causal=True)`` with no mask and no dropout -> ``chronicals::flash_attention``.

Pattern: the SDPA call the ``causal_mask`` and ``gqa_attention`` passes leave behind (so this
runs after them): ``is_causal=True``, no mask, ``dropout_p == 0``, query and key of one length
(FA4's causal diagonal is aligned at the bottom right, SDPA's at the top left: they agree only
when the lengths are equal), one dtype, k and v of one shape, query heads a multiple of key heads
(``enable_gqa``) or equal to them.

Why: flash-attn-4's Hopper kernels against cuDNN's SDPA at the Qwen2.5-0.5B shape (the figures
are in ``config.OFF_BY_DEFAULT`` or the README, from ``benchmarks/bench_attention.py``).
Applied only where FA4 will run (``kernels.flash_attention4.unavailable_reason``); anywhere else
SDPA keeps the call. A mask that depends on user input (padding, packing) never reaches here:
the ``causal_mask`` pass leaves it, and packed documents take the packed-attention path.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..kernels import flash_attention4
from .graph_utils import SDPA, NoMatch, arg, meta, plain_tensor, replace_with_first_output
from .sizes import same_size

NAME = "flash_attention"


def fast_path_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FA4 cannot run here (None: it can). CPU tests of the rewrite replace this to run the
    op's SDPA-math path."""
    return flash_attention4.unavailable_reason(device, dtype, head_dim)


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA


def match(sdpa: fx.Node, ctx=None):
    if arg(sdpa, 3, "attn_mask") is not None:
        raise NoMatch("attention has a mask", quiet=True)
    if not arg(sdpa, 5, "is_causal", False):
        raise NoMatch("attention is not causal", quiet=True)
    dropout = arg(sdpa, 4, "dropout_p", 0.0)
    if not (isinstance(dropout, (int, float)) and dropout == 0):
        raise NoMatch(f"attention dropout {dropout!r} (FA4 has none)")
    q, k, v = (meta(arg(sdpa, i, name)) for i, name in enumerate(("query", "key", "value")))
    if not all(plain_tensor(t) for t in (q, k, v, meta(sdpa))):
        raise NoMatch("no plain tensor metadata for query/key/value")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise NoMatch("query/key/value are not [B, H, S, D] with key and value alike")
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if not (isinstance(d, int) and isinstance(hq, int) and isinstance(hk, int)):
        raise NoMatch("symbolic head counts or head dim")
    if not (same_size(k.shape[0], b) and same_size(k.shape[2], s) and k.shape[3] == d):
        raise NoMatch("key/value differ from the query in batch, length or head dim "
                      "(a causal mask means different things at different lengths)")
    if hq % hk or (hq != hk and not arg(sdpa, 7, "enable_gqa", False)):
        raise NoMatch(f"{hq} query heads against {hk} key heads without enable_gqa")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or len({q.device, k.device, v.device}) != 1:
        raise NoMatch("query/key/value differ in dtype or device")
    scale = arg(sdpa, 6, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if not isinstance(scale, (int, float)):
        raise NoMatch("the scale is not a constant")
    reason = fast_path_unavailable(q.device, q.dtype, d)
    if reason is not None:
        told = q.device.type != "cuda" or getattr(ctx, "_flash_attention_told", False)
        if ctx is not None:
            ctx._flash_attention_told = True
        raise NoMatch(f"left to SDPA: {reason}", quiet=told)
    return sdpa, float(scale)


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    sdpa, scale = found
    q, k, v = (arg(sdpa, i, name) for i, name in enumerate(("query", "key", "value")))
    return replace_with_first_output(gm, sdpa, torch.ops.chronicals.flash_attention.default, (q, k, v, scale))
