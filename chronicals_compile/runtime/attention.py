"""Document-respecting attention for packed rows, as a transformers attention backend.

Packing only pays if attention never crosses document boundaries. transformers
already forwards the flattening collator's ``cu_seq_lens_q/k`` and
``max_length_q/k`` from ``model(**batch)`` down to every attention call, so one
registered function (``"chronicals_varlen"``) covers Llama, Qwen2, Mistral and
the other ``AttentionInterface`` models without patching any of them.

* CUDA, fp16/bf16, ``cu_seq_lens`` given: ``torch.nn.attention.varlen.varlen_attn``
  (FlashAttention varlen; no cross-document work, no mask tensor).
* Anything else (CPU, fp32, dropout, old torch): SDPA with a block-diagonal
  causal mask built on the device from ``cu_seq_lens`` (or, without them, from
  ``position_ids`` restarts, the way ``DataCollatorWithFlattening`` marks
  documents). Only tensor ops: no ``.item()``, no ``nonzero``, so it traces
  with ``fullgraph=True``.

The companion ``AttentionMaskInterface`` entry (``chronicals_padding_mask``)
hands attention only the 2-D padding mask, or ``None``, for cache-free calls
(training, prefill): no dense ``[B, 1, S, S]`` mask is built in the model and
the block structure is derived here from the metadata. With a KV cache
(decoding) it defers to transformers' ``sdpa_mask``, whose offsets and static
cache handling we reuse rather than re-derive. The entry must exist: without
one transformers drops the user's padding mask before attention runs, which
would silently break left-padded batches. Cost: in eager mode transformers'
packed-sequence probe does one small host sync per forward (as it does for
its own sdpa and flash paths); under torch.compile it does none.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "chronicals_varlen"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "chronicals_varlen_attention",
    "chronicals_padding_mask",
    "register_packed_attention",
    "enable_packed_attention",
    "warn_if_cache_in_training",
]

try:  # torch >= 2.11
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_varlen_attn).parameters)
except Exception:  # pragma: no cover - depends on the torch build
    _varlen_attn = None
    _VARLEN_PARAMS = set()

# The public signature moved between releases: torch 2.11 (seen on an H200) takes
# `window_size` (causal = (-1, 0)) but no `enable_gqa`; 2.13 adds `enable_gqa`; some
# pre-releases took `is_causal`. Decided once here so the traced function has no introspection.
_VARLEN_HAS_GQA = "enable_gqa" in _VARLEN_PARAMS
_VARLEN_HAS_WINDOW = "window_size" in _VARLEN_PARAMS
_VARLEN_HAS_IS_CAUSAL = "is_causal" in _VARLEN_PARAMS


def _repeat_kv(x: torch.Tensor, n_rep: int, axis: int) -> torch.Tensor:
    """Expand kv heads so query head h reads kv head h // n_rep (transformers' convention)."""
    if n_rep == 1:
        return x
    return torch.repeat_interleave(x, n_rep, dim=axis)


def _use_varlen(query: torch.Tensor, dropout: float, sliding_window: int | None, is_causal: bool) -> bool:
    """Static (trace-time) choice: every input here is a dtype, device, shape or python value."""
    if _varlen_attn is None or not query.is_cuda or not is_causal:
        return False
    if query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 256 or query.shape[-1] % 8:
        return False
    if dropout > 0.0:  # varlen_attn has no dropout
        return False
    if sliding_window is not None:
        return _VARLEN_HAS_WINDOW
    return _VARLEN_HAS_WINDOW or _VARLEN_HAS_IS_CAUSAL


def _as_int(value: Any, default: int) -> int:
    """max_length arrives as a python int from our collator; a tensor would need a host sync."""
    if isinstance(value, torch.Tensor) or value is None:
        return default
    return value


def _varlen_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scaling: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    bsz, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(bsz * seq, heads, dim)
    k = key.transpose(1, 2).reshape(bsz * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(bsz * seq, kv_heads, value.shape[-1])
    kwargs: dict[str, Any] = {"scale": scaling}
    if kv_heads != heads:
        if _VARLEN_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:
            k = _repeat_kv(k, heads // kv_heads, 1)
            v = _repeat_kv(v, heads // kv_heads, 1)
    if _VARLEN_HAS_WINDOW:
        # transformers keeps key k for query q when q - k < sliding_window.
        kwargs["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    else:
        kwargs["is_causal"] = True
    cu_q = cu_q.to(device=query.device, dtype=torch.int32)
    cu_k = cu_k.to(device=query.device, dtype=torch.int32)
    out = _varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    return out.view(bsz, seq, heads, -1)


def _segments_from_cu_seqlens(cu_seqlens: torch.Tensor, bsz: int, seq: int, device: torch.device) -> torch.Tensor:
    """Document id of every token, for rows flattened as the collator lays them out."""
    flat = torch.arange(bsz * seq, device=device, dtype=torch.int64)
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)[1:]
    return torch.searchsorted(bounds, flat, right=True).view(bsz, seq)


def _segments_from_position_ids(position_ids: torch.Tensor, bsz: int) -> torch.Tensor:
    """A new document wherever positions do not advance by one (transformers' own rule)."""
    pos = position_ids.expand(bsz, -1)
    step = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _segment_mask(
    segments: torch.Tensor, is_causal: bool, sliding_window: int | None, padding: torch.Tensor | None
) -> torch.Tensor:
    """Boolean [B, 1, S, S]: same document, causal, inside the window, key not padding.

    The diagonal is always kept so that a row whose keys are all padding still
    has a finite softmax; such rows are padding themselves and feed no loss.
    """
    seq = segments.shape[-1]
    idx = torch.arange(seq, device=segments.device)
    allowed = segments[:, :, None] == segments[:, None, :]
    if is_causal:
        allowed = allowed & (idx[None, :, None] >= idx[None, None, :])
    if sliding_window is not None:
        allowed = allowed & ((idx[None, :, None] - idx[None, None, :]).abs() < sliding_window)
    if padding is not None:
        allowed = allowed & padding[:, None, :].bool()
    allowed = allowed | torch.eye(seq, dtype=torch.bool, device=segments.device)[None]
    return allowed[:, None]


def _offset_causal_mask(
    q_len: int, kv_len: int, is_causal: bool, sliding_window: int | None, padding: torch.Tensor | None, device
) -> torch.Tensor | None:
    """Mask for the cached (decode / chunked prefill) case: queries are the last q_len positions."""
    allowed = None
    if is_causal or sliding_window is not None:
        q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        k_pos = torch.arange(kv_len, device=device)[None, :]
        allowed = k_pos <= q_pos if is_causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
        if sliding_window is not None:
            allowed = allowed & (q_pos - k_pos < sliding_window)
        allowed = allowed[None, None]
    if padding is not None:
        pad = padding[:, None, None, -kv_len:].bool()
        allowed = pad if allowed is None else allowed & pad
    return allowed


def chronicals_varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, S, D], key/value [B, Hkv, Skv, D] -> ([B, S, H, D], None).

    ``cu_seq_lens_*`` index the rows flattened to ``B * S`` tokens, so a [B, T]
    batch of packs works as well as a single [1, T] row; self-attention
    (``cu_seq_lens_k == cu_seq_lens_q``) is assumed, as in training.
    """
    if softcap is not None:
        raise ValueError("chronicals_varlen does not support attention softcapping (Gemma 2); use 'eager'.")
    if kwargs.get("s_aux") is not None:
        raise ValueError("chronicals_varlen does not support attention sinks (s_aux); use 'eager'.")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    bsz, heads, q_len, _ = query.shape
    kv_len = key.shape[2]

    if cu_seq_lens_q is not None and kv_len == q_len:
        if _use_varlen(query, dropout, sliding_window, is_causal):
            out = _varlen_forward(
                query,
                key,
                value,
                cu_seq_lens_q,
                cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q,
                _as_int(max_length_q, q_len),
                _as_int(max_length_k, kv_len),
                scaling,
                sliding_window,
            )
            return out, None
        segments = _segments_from_cu_seqlens(cu_seq_lens_q, bsz, q_len, query.device)
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        mask = _segment_mask(segments, is_causal, sliding_window, padding)
    elif attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask  # already prepared by the caller
    elif kv_len == q_len and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == q_len:
        segments = _segments_from_position_ids(position_ids.to(query.device), bsz)
        mask = _segment_mask(segments, is_causal, sliding_window, attention_mask)
    else:
        mask = _offset_causal_mask(q_len, kv_len, is_causal, sliding_window, attention_mask, query.device)

    n_rep = heads // key.shape[1]
    key = _repeat_kv(key, n_rep, 1)
    value = _repeat_kv(value, n_rep, 1)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=False
    )
    return out.transpose(1, 2).contiguous(), None


def chronicals_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers mask function: the 2-D padding mask for cache-free calls, sdpa's 4-D mask otherwise."""
    cache_free = (
        isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == 0 and kv_offset == 0
        and q_length == kv_length
    )
    if cache_free:
        if attention_mask is None:
            return None
        return attention_mask[:, :kv_length].bool()
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register_packed_attention() -> str:
    """Register ``"chronicals_varlen"`` (attention and mask function) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, chronicals_varlen_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, chronicals_padding_mask)
    return ATTN_IMPLEMENTATION


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft wrappers
    return get_base() if callable(get_base) else model


def enable_packed_attention(
    model: torch.nn.Module, *, disable_cache: bool = True, warn_on_cache: bool = True
) -> torch.nn.Module:
    """Switch ``model`` (plain or peft-wrapped) to document-respecting attention.

    Also turns ``config.use_cache`` off by default: a training forward that
    builds a KV cache wastes memory and, under compile, returns the cache
    tensors as graph outputs. With ``warn_on_cache`` a call that still asks
    for ``use_cache=True`` in training warns once (``warn_if_cache_in_training``).
    Returns the model for chaining.
    """
    name = register_packed_attention()
    base = _base_model(model)
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
    if getattr(base.config, "_attn_implementation", None) != name:
        base.config._attn_implementation = name
    for sub in base.modules():  # sub-configs held by submodules (e.g. text model of a VLM)
        cfg = getattr(sub, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", name) != name:
            cfg._attn_implementation = name
    if disable_cache and getattr(base.config, "use_cache", False):
        base.config.use_cache = False
        logger.info("chronicals: set config.use_cache=False for packed training (no KV cache in training).")
    if warn_on_cache and not getattr(base, "_chronicals_cache_hook", None):
        base._chronicals_cache_hook = warn_if_cache_in_training(base)
    return model


def _cache_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    # Skipped while Dynamo traces: a warning there would be a graph break (an error with
    # fullgraph=True); the compiled path is the backend's to report.
    if torch.compiler.is_compiling() or not module.training or not torch.is_grad_enabled():
        return
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(getattr(module, "config", None), "use_cache", False)
    if use_cache and not getattr(module, "_chronicals_cache_warned", False):
        module._chronicals_cache_warned = True
        warnings.warn(
            "Training forward with use_cache=True: transformers builds a KV cache it never uses "
            "(memory, extra graph outputs under compile). Pass use_cache=False or set "
            "model.config.use_cache = False.",
            stacklevel=3,
        )


def warn_if_cache_in_training(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Warn once per model when a training call (grad on, ``model.train()``) would build a KV cache.

    Returns the hook handle so callers can remove it.
    """
    return model.register_forward_pre_hook(_cache_hook, with_kwargs=True)
