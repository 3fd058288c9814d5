"""Rotary position embedding of q and k in one Triton launch, forward and backward.

Semantics (transformers' ``apply_rotary_pos_emb`` with ``rotate_half``), per tensor ``x`` of
shape ``[B, H, S, D]`` and ``cos``/``sin`` broadcastable to ``[B, 1, S, D]``, ``h = D // 2``::

    out[..., :h] = x[..., :h] * cos[..., :h] - x[..., h:] * sin[..., :h]
    out[..., h:] = x[..., h:] * cos[..., h:] + x[..., :h] * sin[..., h:]

Backward is the transposed rotation (``rotate_half`` is orthogonal, its transpose is its inverse)::

    dx[..., :h] = g[..., :h] * cos[..., :h] + g[..., h:] * sin[..., h:]
    dx[..., h:] = g[..., h:] * cos[..., h:] - g[..., :h] * sin[..., :h]

GLM's interleaved variant pairs element 2j with 2j + 1 instead of j with j + h (same formulas,
other addresses: the kernel takes the pair's ``step`` and ``partner`` offset). So forward and
backward are the same kernel with the two sine terms swapped and negated: ``out1
= x1*c1 + x2*A``, ``out2 = x2*c2 + x1*B`` with ``(A, B) = (-s1, s2)`` forward and ``(s2, -s1)``
backward. Nothing is saved but cos and sin. cos/sin are not assumed to repeat across the two
halves (HF's ``cat((freqs, freqs))`` does, other code need not).

Every tensor is addressed through its four strides: Dynamo hands us q as
``linear(...).view(B, S, H, D).transpose(1, 2)`` and k likewise (non-contiguous), cos/sin are
broadcast over batch and heads (stride 0), partial-rotary slices have a row stride wider than
the rotated width. No copies are made. Math is fp32, rounded once on store.

Grid: one axis, q's programs then k's, so one launch rotates both. A program takes a block of
(batch, position) rows and a block of heads, loads its cos/sin rows once and rotates every head of
the block. Each tensor sizes its own row block to a full tile: with GQA, k has a few heads (Qwen2.5-
0.5B: 2 against q's 14), and with q's 4-row block half the grid moved 256 elements a program.

Offsets are 32-bit unless some address the grid forms (masked lanes included) reaches 2**31
(``needs_int64``): the kernel is bandwidth-bound but its 3-D tiles do several index operations per
element, and 64-bit integer math costs two to four times 32-bit on the SM. At Qwen2.5-0.5B's shape
the 64-bit kernel ran at 69% of copy bandwidth on the H200 where Liger's and Inductor's (32-bit
indexing) ran at 81-86% (results/2026-11-28-h200-session2/micro.json).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_tile(X, O, b, s, row_ok, heads, H, half, step, partner,
                 sxb, sxh, sxs, sxd, sob, soh, sos, sod, c1, c2, sa, sb, BLOCK_D2: tl.constexpr,
                 INDEX_64: tl.constexpr):
    """Rotate one [rows, heads, half] tile of X into O (c1, c2, sa, sb: fp32 [rows, 1, half]).
    Pair j is elements (j * step, j * step + partner): (j, j + half) or, interleaved, (2j, 2j + 1)."""
    cols = tl.arange(0, BLOCK_D2)
    if INDEX_64:
        first = cols.to(tl.int64) * step
        h = heads.to(tl.int64)
    else:
        first = cols * step
        h = heads
    mask = row_ok[:, None, None] & (heads < H)[None, :, None] & (cols < half)[None, None, :]
    x_off = (b * sxb + s * sxs)[:, None, None] + h[None, :, None] * sxh + first[None, None, :] * sxd
    o_off = (b * sob + s * sos)[:, None, None] + h[None, :, None] * soh + first[None, None, :] * sod
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + partner * sxd, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c1 + x2 * sa
    o2 = x2 * c2 + x1 * sb
    tl.store(O + o_off, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(O + o_off + partner * sod, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_rows(X, O, COS, SIN, row_block, head_block, R, S, H, half, step, partner,
                 sxb, sxh, sxs, sxd, sob, soh, sos, sod, scb, scs, scd, ssb, sss, ssd,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D2: tl.constexpr, INDEX_64: tl.constexpr):
    """Load cos/sin for one block of (batch, position) rows once and rotate ``BLOCK_H`` heads of X."""
    if INDEX_64:
        rows = row_block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D2).to(tl.int64)
    else:
        rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D2)
    row_ok = rows < R
    b = rows // S
    s = rows % S
    cmask = row_ok[:, None, None] & (cols < half)[None, None, :]
    c_off = (b * scb + s * scs)[:, None, None] + (cols * step)[None, None, :] * scd
    s_off = (b * ssb + s * sss)[:, None, None] + (cols * step)[None, None, :] * ssd
    c1 = tl.load(COS + c_off, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + c_off + partner * scd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + s_off, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + s_off + partner * ssd, mask=cmask, other=0.0).to(tl.float32)
    if BACKWARD:
        sa = s2
        sb = -s1
    else:
        sa = -s1
        sb = s2
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    _rotate_tile(X, O, b, s, row_ok, heads, H, half, step, partner,
                 sxb, sxh, sxs, sxd, sob, soh, sos, sod, c1, c2, sa, sb, BLOCK_D2, INDEX_64)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN,
                 R, S, HQ, HK, half, step, partner, n_q_blocks, n_k_blocks, n_q_programs,
                 sqb, sqh, sqs, sqd, skb, skh, sks, skd,
                 sqob, sqoh, sqos, sqod, skob, skoh, skos, skod,
                 scb, scs, scd, ssb, sss, ssd,
                 BACKWARD: tl.constexpr, BLOCK_RQ: tl.constexpr, BLOCK_RK: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D2: tl.constexpr,
                 INDEX_64: tl.constexpr):
    # Programs [0, n_q_programs) rotate q, the rest k; each walks (row block, head block), head
    # blocks fastest. q and k have their own row blocks, so k's few heads still get a full tile.
    # Separate calls per branch: Triton requires a name bound in both branches of an ``if`` to
    # have one type, and the q and k tiles have different block shapes.
    pid = tl.program_id(0)
    if pid < n_q_programs:
        _rotate_rows(Q, QO, COS, SIN, pid // n_q_blocks, pid % n_q_blocks, R, S, HQ, half, step, partner,
                     sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod, scb, scs, scd, ssb, sss, ssd,
                     BACKWARD, BLOCK_RQ, BLOCK_HQ, BLOCK_D2, INDEX_64)
    else:
        pk = pid - n_q_programs
        _rotate_rows(K, KO, COS, SIN, pk // n_k_blocks, pk % n_k_blocks, R, S, HK, half, step, partner,
                     skb, skh, sks, skd, skob, skoh, skos, skod, scb, scs, scd, ssb, sss, ssd,
                     BACKWARD, BLOCK_RK, BLOCK_HK, BLOCK_D2, INDEX_64)


#: Elements per program per half-tile: enough to keep 16-byte accesses in flight, small
#: enough to stay in registers. A first guess; tune on the device (benchmarks/bench_rope.py).
_TILE = 2048
#: Most (batch, position) rows in one program's tile: bounds the cos/sin tile's registers.
_MAX_ROWS = 32


def _blocks(hq: int, hk: int, half: int, shared_rows: bool = False) -> tuple[int, int, int, int, int, int, int]:
    """``(block_rq, block_hq, warps_q, block_rk, block_hk, warps_k, block_d2)``. Each tensor's row
    block fills ``_TILE`` with its own head block: with GQA, k has few heads (Qwen2.5-0.5B: 2 of q's
    14), and a row block shared with q gave its programs 256 elements each, half the grid.
    ``shared_rows``: the tiling before that change (q's row block for both), for the A/B."""
    block_d2 = max(2, triton.next_power_of_2(half))
    cap = max(1, _TILE // block_d2)
    # Every block dim at least 2 (a size-1 arange is legal, but nothing is gained by testing
    # the compiler on it; masked lanes cost no memory traffic).
    block_hq = max(2, min(triton.next_power_of_2(hq), cap))
    block_hk = max(2, min(triton.next_power_of_2(hk), cap))

    def rows(block_h: int, limit: int) -> int:
        return max(2, min(limit, _TILE // (block_h * block_d2)))

    block_rq = rows(block_hq, 16)
    block_rk = block_rq if shared_rows else rows(block_hk, _MAX_ROWS)

    def warps(block_r: int, block_h: int) -> int:
        return 4 if block_r * block_h * block_d2 <= 2048 else 8

    return block_rq, block_hq, warps(block_rq, block_hq), block_rk, block_hk, warps(block_rk, block_hk), block_d2


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _cos_strides(c: torch.Tensor, b: int, s: int, d: int) -> tuple[int, int, int]:
    e = c.expand(b, 1, s, d) if c.dim() <= 4 else c
    return e.stride(0), e.stride(2), e.stride(3)


def needs_int64(rows: int, seq: int, block_r: int, extents: list[tuple[int, int, int, int, int]]) -> bool:
    """Whether the kernel must form offsets in 64 bits. ``extents``: per tensor, (row-block padded
    head count, highest column-pair start + partner, batch stride, position stride, head stride)
    with the column stride folded in; the largest address any lane forms, masked lanes included
    (padded rows, heads and columns), must stay below 2**31. ``block_r``: the largest row block
    (row blocks are powers of two, so its padding covers every smaller one's). Symbolic sizes
    (dynamic shapes) keep 64 bits rather than guard on a size."""
    values = [rows, seq, block_r, *(v for e in extents for v in e)]
    if any(not isinstance(v, int) for v in values):
        return True
    last_row = triton.cdiv(rows, block_r) * block_r - 1
    b_max, s_max = last_row // seq, min(seq - 1, last_row)
    return any(b_max * sb + s_max * ss + (heads - 1) * sh + col >= 2**31 for heads, col, sb, ss, sh in extents)


def rope_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_out: torch.Tensor, k_out: torch.Tensor, backward: bool, interleaved: bool = False,
                wrap: bool = False, index_64: bool | None = None, shared_rows: bool = False) -> None:
    """Rotate ``q`` into ``q_out`` and ``k`` into ``k_out`` (all ``[B, H, S, D]``, any strides).
    ``interleaved``: pairs are (2j, 2j + 1) (GLM's rotate_half) instead of (j, j + D/2).
    ``wrap``: launched from a ``triton_op`` body (``wrap_triton``, so tracing sees the kernel).
    ``index_64``: None decides by :func:`needs_int64`; tests force either path.
    ``shared_rows``: k takes q's row block (the tiling before session 29; tests and the A/B)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] \
            or q.shape[3] % 2 or q_out.shape != q.shape or k_out.shape != k.shape:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D] with the "
                         "same B, S and an even D")
    bsz, hq, seq, dim = q.shape
    hk = k.shape[1]
    half = dim // 2
    rows = bsz * seq
    if rows == 0 or half == 0 or (hq == 0 and hk == 0):
        return
    block_rq, block_hq, warps_q, block_rk, block_hk, warps_k, block_d2 = _blocks(max(hq, 1), max(hk, 1), half,
                                                                                 shared_rows)
    n_q_blocks = triton.cdiv(hq, block_hq)
    n_k_blocks = triton.cdiv(hk, block_hk)
    n_q_programs = triton.cdiv(rows, block_rq) * n_q_blocks
    n_k_programs = triton.cdiv(rows, block_rk) * n_k_blocks
    step, partner = (2, 1) if interleaved else (1, half)
    cos_strides, sin_strides = _cos_strides(cos, bsz, seq, dim), _cos_strides(sin, bsz, seq, dim)
    if index_64 is None:
        col = (block_d2 - 1) * step + partner  # the highest element a lane's pair reaches

        def extent(t: torch.Tensor, heads: int) -> tuple:
            return (heads, col * t.stride(3), t.stride(0), t.stride(2), t.stride(1))

        def extent_cs(strides: tuple[int, int, int]) -> tuple:
            sb, ss, sd = strides
            return (1, col * sd, sb, ss, 0)

        index_64 = needs_int64(rows, seq, max(block_rq, block_rk), [
            extent(q, n_q_blocks * block_hq), extent(q_out, n_q_blocks * block_hq),
            extent(k, n_k_blocks * block_hk), extent(k_out, n_k_blocks * block_hk),
            extent_cs(cos_strides), extent_cs(sin_strides)])
    kernel = torch.library.wrap_triton(_rope_kernel) if wrap else _rope_kernel
    kernel[(n_q_programs + n_k_programs,)](
        q, k, q_out, k_out, cos, sin,
        rows, seq, hq, hk, half, step, partner, n_q_blocks, n_k_blocks, n_q_programs,
        *_strides4(q), *_strides4(k), *_strides4(q_out), *_strides4(k_out),
        *cos_strides, *sin_strides,
        BACKWARD=backward, BLOCK_RQ=block_rq, BLOCK_RK=block_rk, BLOCK_HQ=block_hq, BLOCK_HK=block_hk,
        BLOCK_D2=block_d2, INDEX_64=index_64, num_warps=max(warps_q, warps_k))


def rope_forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False, wrap: bool = False, index_64: bool | None = None,
                 shared_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(q, k)``; each output keeps its input's memory layout, in the promoted dtype."""
    q_out = torch.empty_like(q, dtype=torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype))
    k_out = torch.empty_like(k, dtype=torch.promote_types(torch.promote_types(k.dtype, cos.dtype), sin.dtype))
    rope_launch(q, k, cos, sin, q_out, k_out, backward=False, interleaved=interleaved, wrap=wrap, index_64=index_64,
                shared_rows=shared_rows)
    return q_out, k_out


def rope_backward(dq_out: torch.Tensor, dk_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  q_dtype: torch.dtype, k_dtype: torch.dtype, interleaved: bool = False, wrap: bool = False,
                  index_64: bool | None = None, shared_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq, dk)`` in q's and k's dtypes, laid out like the incoming gradients."""
    dq = torch.empty_like(dq_out, dtype=q_dtype)
    dk = torch.empty_like(dk_out, dtype=k_dtype)
    rope_launch(dq_out, dk_out, cos, sin, dq, dk, backward=True, interleaved=interleaved, wrap=wrap, index_64=index_64,
                shared_rows=shared_rows)
    return dq, dk
