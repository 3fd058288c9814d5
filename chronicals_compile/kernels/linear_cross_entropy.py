"""Cut cross-entropy in Triton: ``cross_entropy(f(h @ W.T), target)`` without an N x V logits tensor.

``f`` is the optional logit transform transformers applies between lm_head and the loss:
``z = scale * raw`` (logit scaling) and then ``z = softcap * tanh(z / softcap)`` (Gemma soft-cap).

Two Triton kernels, both over tiles of tokens x vocab whose logits come from ``tl.dot`` over
hidden-size chunks with fp32 accumulators:

``_cce_fwd_kernel``
    Each program owns BLOCK_N rows and a group of consecutive vocab tiles and keeps an online
    log-sum-exp (running max ``m`` and rescaled sum ``s``), the target logit and, for label
    smoothing, the sum of logits. It writes those four per-row statistics per vocab group
    (``[groups, N]`` fp32, about ``N * V / (BLOCK_V * tiles_per_group)`` floats, never N x V);
    torch merges the groups. With ``STORE_Z`` it also writes the transformed logits of a row
    chunk (used by the gradient-in-forward mode below).

``_cce_grad_kernel``
    Produces ``G = dloss/draw_logits`` for a chunk of rows: recomputes the logit tile with
    ``tl.dot`` (or reads it back from the chunk buffer), then
    ``G = w_row * (softmax - (1 - eps) * onehot - eps / V) * f'(raw)``. Tiles whose rows are all
    ignored (``w_row == 0``) skip the recompute; no host sync decides this.

dh and dW are then two GEMMs per row chunk on that ``[C, V]`` gradient tile buffer:
``dh[chunk] = G @ W`` (one GEMM, fp32 accumulation inside) and ``dW32 += G.T @ h[chunk]``
accumulated in an fp32 buffer (bf16 accumulation of the classifier gradient diverges), cast to
``W.dtype`` once at the end. Why not produce dh and dW inside the tile kernel like Apple's CCE:
a program owns a BLOCK_N x BLOCK_V tile but its contributions are BLOCK_N x d and BLOCK_V x d
rows, which for d = 896..4096 cannot stay on chip, so they must be reduced across programs with
fp32 atomics: ``N * V * d * (1/BLOCK_N + 1/BLOCK_V)`` atomic adds, about 140 GB of atomic traffic
at (16384, 896, 151936), several times the time of the matmuls themselves. Apple's kernel makes
this affordable by skipping tiles whose softmax is below ``filter_eps`` (an approximation); exact
gradients need the other route. The chunk buffer is bounded (``chunk_rows x V``, sized from W),
so memory stays O(N*d + V*d).

Two ways to run a training step (both exact, same numbers up to rounding):

* ``recompute``: forward = ``_cce_fwd_kernel`` only (nothing saved but ``lse[N]``); backward =
  ``_cce_grad_kernel`` recomputing the logits + the two GEMMs. 4 matmul-equivalents.
* ``fused`` (gradient in forward, Liger-style): per row chunk the forward kernel also stores the
  logits, the grad kernel turns them into G in place, and the GEMMs produce dh/dW for an
  incoming gradient of 1; backward multiplies them by the real incoming gradient (a scalar,
  since the loss is reduced). 3 matmul-equivalents plus a few passes over the chunk buffer.
  ``logits="matmul"`` (or ``CHRONICALS_CCE_LOGITS=matmul``) gets each chunk's logits from one
  cuBLAS GEMM instead and ``_ce_rows_kernel`` does statistics and G per row: the same 3 GEMMs
  any exact method runs, at cuBLAS speed, plus two reads and a write of the chunk buffer (a row of
  a 152k vocabulary does not fit on chip). This is the default; on the H200 the row kernel runs at
  ~90% of copy bandwidth and the whole op at 1.25x the bare GEMMs at (16384, 896, 151936).

Everything here is plain launchers over tensors (CUDA, or CPU tensors under TRITON_INTERPRET=1);
the kernels themselves are in ``cut_cross_entropy_triton.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton

from .cut_cross_entropy_triton import _ce_rows_kernel, _cce_fwd_kernel, _cce_grad_kernel, _scale_kernel


# --------------------------------------------------------------------------------------------
# Launch parameters
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch shape; tests pass small ones for the interpreter."""

    block_n: int = 128
    block_v: int = 128
    block_d: int = 64
    group_n: int = 8
    num_warps: int = 8
    num_stages: int = 3
    #: vocab tiles per forward program (None: enough programs to fill the GPU a few times)
    tiles_per_group: int | None = None
    #: rows per gradient chunk (None: sized so the [chunk, V] buffer is CHUNK_BUFFER_PER_W x W)
    chunk_rows: int | None = None
    #: vocabulary rows per slice of the ``vocab`` backward layout (None: from VOCAB_SLICE_BYTES)
    vocab_cols: int | None = None
    #: vocab block and warps of the row kernel (matmul-logits fused mode). On the H200 the row
    #: kernel reached 3.87 TB/s (two reads and a write of a [4096, V] chunk) with 4096 x 8 warps,
    #: 3.81 with 8192 x 16, 3.15-3.63 with larger blocks (results/2026-12-01-h200-session4/lce_rows.md)
    row_block: int = int(os.environ.get("CHRONICALS_CCE_ROW_BLOCK", "4096"))
    row_warps: int = int(os.environ.get("CHRONICALS_CCE_ROW_WARPS", "8"))


#: Rows per gradient chunk, overriding the size from W (a knob: memory against speed).
CHUNK_ROWS = int(os.environ.get("CHRONICALS_CCE_CHUNK_ROWS", "0")) or None

#: The default [chunk, V] gradient buffer is this many times W's bytes (at least 256 MiB, at most
#: 2 GiB). Fewer chunks cost less: each later chunk re-reads and re-writes the V x d fp32 dW
#: accumulator, and small chunks run the GEMMs below peak. On the H200 at (16384, 896, 151936),
#: fused mode, matmul logits: 1664-row chunks (2 x W) 27.1 ms / 1.0 GiB extra, 2048 rows 25.9 /
#: 1.1, 4096 rows 25.3 / 1.7, 8192 rows 24.9 / 2.8, torch.compile 26.9 / 4.6
#: (results/2026-12-01-h200-session4/lce_rows.md); the whole training step at 8 x 2048 ran
#: 132.8k / 134.3k / 136.4k tok/s with the 1664 / 4096 / 8192-row chunks (e2e_cce.md).
CHUNK_BUFFER_PER_W = 4


def default_tiles(dtype: torch.dtype, device: torch.device) -> Tiles:
    if device.type != "cuda":
        return Tiles(block_n=16, block_v=32, block_d=16, group_n=4, num_warps=4, num_stages=1,
                     row_block=64, row_warps=4, chunk_rows=CHUNK_ROWS)
    if dtype == torch.float32:  # IEEE fp32 dot: bigger operands, less shared memory per tile
        return Tiles(block_n=64, block_v=64, block_d=32, num_warps=4, num_stages=3, chunk_rows=CHUNK_ROWS)
    return Tiles(chunk_rows=CHUNK_ROWS)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32: the reference is fp32 F.linear.
    return "ieee" if dtype == torch.float32 else "tf32"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _col_groups(n: int, v: int, tiles: Tiles, device: torch.device) -> tuple[int, int]:
    v_tiles = triton.cdiv(v, tiles.block_v)
    if tiles.tiles_per_group is not None:
        per = max(1, min(tiles.tiles_per_group, v_tiles))
    else:
        row_tiles = triton.cdiv(n, tiles.block_n)
        want = 8 * _sm_count(device)  # programs: several waves, few partial statistics
        groups = max(1, min(v_tiles, triton.cdiv(want, row_tiles)))
        per = triton.cdiv(v_tiles, groups)
    return triton.cdiv(v_tiles, per), per


def _chunk_rows(n: int, v: int, d: int, elt: int, tiles: Tiles) -> int:
    """Rows per gradient chunk. The chunks are balanced (16384 rows at a 1792-row budget make ten
    chunks of 1664 rows and one of 1408, not nine full ones and a 256-row tail whose GEMMs run far
    below peak), in multiples of 128 rows for the GEMM tiles."""
    if tiles.chunk_rows is not None:
        rows = max(1, tiles.chunk_rows)
    else:
        budget = min(max(2 ** 28, CHUNK_BUFFER_PER_W * v * d * elt), 2 ** 31)
        rows = max(tiles.block_n, budget // max(1, v * elt) // 128 * 128)
    if rows >= n:
        return max(1, n)
    chunks = -(-n // rows)
    balanced = -(-n // chunks)
    return min(rows, -(-balanced // 128) * 128) if rows >= 128 else rows


def _check(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> None:
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected h [N, d] and W [V, d], got {tuple(h.shape)} and {tuple(w.shape)}")
    if h.dtype != w.dtype:
        raise ValueError(f"h and W must share a dtype, got {h.dtype} and {w.dtype}")
    if target.shape != (h.shape[0],) or target.dtype != torch.int64:
        raise ValueError("target must be int64 of shape [N]")


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------
# Forward statistics
# --------------------------------------------------------------------------------------------

def _launch_stats(h, w, target, softcap, scale, smooth, tiles: Tiles, z_out=None):
    """Per-row (lse, target logit, sum of logits) for rows of ``h``; optionally store logits."""
    n, d = h.shape
    v = w.shape[0]
    groups, per = _col_groups(n, v, tiles, h.device)
    stats = torch.empty((4 if smooth else 3, groups, n), dtype=torch.float32, device=h.device)
    grid = (triton.cdiv(n, tiles.block_n) * groups,)
    _cce_fwd_kernel[grid](
        h, w, target, z_out if z_out is not None else stats, stats[0], stats[1], stats[2],
        stats[3] if smooth else stats[2],
        n, v, d, h.stride(0), w.stride(0), z_out.stride(0) if z_out is not None else 0,
        groups, per, float(scale), float(softcap),
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d, GROUP_N=tiles.group_n,
        EVEN_D=d % tiles.block_d == 0, HAS_SCALE=scale != 1.0, SOFTCAP=softcap != 0.0,
        SMOOTH=smooth, STORE_Z=z_out is not None, DOT_PRECISION=_dot_precision(h.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    m, s, zt = stats[0], stats[1], stats[2]
    top = m.amax(0)
    # Rows whose logits are all -inf keep top = -inf; keep the merge NaN-free there like torch.
    safe = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    lse = safe + torch.log((s * torch.exp(m - safe)).sum(0))
    sumz = stats[3].sum(0) if smooth else None
    return lse, zt.sum(0), sumz


def _row_losses(lse, zt, sumz, target, v, ignore_index, label_smoothing):
    valid = target != ignore_index
    in_range = (target >= 0) & (target < v)
    # An out-of-range target (torch raises) gives NaN rather than a silent wrong loss.
    zt = torch.where(in_range, zt, torch.full_like(zt, math.nan))
    loss = lse - (1.0 - label_smoothing) * zt
    if label_smoothing:
        loss = loss - (label_smoothing / v) * sumz
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _reduce(row_loss, valid, reduction):
    total = row_loss.sum()
    if reduction == "mean":
        return total / valid.sum()
    return total


def _row_weights(grad, target, ignore_index, reduction, valid=None):
    """dloss/d(row loss) per row: grad / count for mean, grad for sum, 0 for ignored rows."""
    valid = target != ignore_index if valid is None else valid
    g = grad.detach().float().reshape(())
    if reduction == "mean":
        g = g / valid.sum()
    return torch.where(valid, g.expand(target.shape), torch.zeros((), dtype=torch.float32, device=target.device))


def forward(h, w, target, ignore_index: int = -100, reduction: str = "mean",
            label_smoothing: float = 0.0, softcap: float = 0.0, scale: float = 1.0,
            tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (fp32, 0-dim) and per-row log-sum-exp (fp32 [N]); no N x V tensor."""
    _check(h, w, target)
    tiles = tiles or default_tiles(h.dtype, h.device)
    n, v = h.shape[0], w.shape[0]
    if n == 0:
        lse = torch.empty((0,), dtype=torch.float32, device=h.device)
        empty = torch.zeros((), dtype=torch.float32, device=h.device)
        return (empty / 0 if reduction == "mean" else empty), lse
    h, w, target = _rows_contiguous(h), _rows_contiguous(w), target.contiguous()
    lse, zt, sumz = _launch_stats(h, w, target, softcap, scale, label_smoothing != 0.0, tiles)
    row_loss, valid = _row_losses(lse, zt, sumz, target, v, ignore_index, label_smoothing)
    return _reduce(row_loss, valid, reduction), lse


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

_ADDMM_MODE: dict[torch.device, str] = {}


def _mm_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out = a @ b`` with one rounding: cuBLAS accumulates half GEMMs in fp32; the CPU is made to."""
    if a.device.type == "cuda" or a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.float() @ b.float())


def _accumulate_dw(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool = False) -> None:
    """``acc += g.T @ h`` (``acc = g.T @ h`` when ``first``: beta = 0, so the uninitialised buffer is
    neither read nor zeroed first) with an fp32 accumulator and operands in their own dtype."""
    beta = 0.0 if first else 1.0
    if g.dtype == torch.float32:
        acc.addmm_(g.t(), h, beta=beta)
        return
    if g.device.type != "cuda":
        acc.addmm_(g.t().float(), h.float(), beta=beta)
        return
    mode = _ADDMM_MODE.get(g.device, "addmm")
    if mode == "addmm":
        try:  # cuBLAS bf16/fp16 GEMM accumulating straight into the fp32 buffer
            torch.addmm(acc, g.t(), h, beta=beta, out_dtype=torch.float32, out=acc)
            _ADDMM_MODE[g.device] = "addmm"
            return
        except (TypeError, RuntimeError):
            mode = _ADDMM_MODE[g.device] = "mm"
    if mode == "mm":
        try:  # fp32 product, then one fp32 add
            prod = torch.mm(g.t(), h, out_dtype=torch.float32)
            acc.copy_(prod) if first else acc.add_(prod)
            return
        except (TypeError, RuntimeError):
            _ADDMM_MODE[g.device] = "cast"
    # Older torch: one rounding to the operand dtype per chunk, fp32 accumulation across chunks.
    prod = torch.mm(g.t(), h)
    acc.copy_(prod) if first else acc.add_(prod)


def _grad_tiles(h, w, target, lse, row_w, g, *, label_smoothing, softcap, scale, tiles: Tiles,
                recompute: bool, vocab: int | None = None) -> None:
    """Write G for the rows of ``h`` into ``g`` (which holds their logits unless ``recompute``).
    ``w`` may be a slice of the vocabulary (``target`` then counted from its first row); ``vocab``
    is the whole vocabulary's size, which label smoothing spreads its weight over."""
    n, d = h.shape
    v = w.shape[0]
    vocab = vocab or v
    _cce_grad_kernel[(triton.cdiv(n, tiles.block_n) * triton.cdiv(v, tiles.block_v),)](
        h, w, target, lse, row_w, g, n, v, d, h.stride(0), w.stride(0), g.stride(0),
        float(scale), float(softcap), 1.0 - float(label_smoothing), float(label_smoothing) / vocab,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
        GROUP_N=tiles.group_n, EVEN_D=d % tiles.block_d == 0, HAS_SCALE=scale != 1.0,
        SOFTCAP=softcap != 0.0, SMOOTH=label_smoothing != 0.0, RECOMPUTE=recompute,
        DOT_PRECISION=_dot_precision(h.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _gradients(h, w, fill, *, need_dh, need_dw, tiles: Tiles, keep_fp32: bool = False):
    """dh, dW from per-chunk gradient tiles: ``fill(r0, r1, buf)`` writes G of rows r0:r1.
    ``keep_fp32``: return them unrounded in fp32 (the fused mode rounds once, after scaling)."""
    n, d = h.shape
    v = w.shape[0]
    keep_fp32 = keep_fp32 and h.dtype in (torch.float16, torch.bfloat16)
    if not need_dh:
        dh = h.new_empty((0,))
    else:
        dh = torch.empty((n, d), dtype=torch.float32, device=h.device) if keep_fp32 else torch.empty_like(h)
    dw32 = (torch.empty if n else torch.zeros)((v, d), dtype=torch.float32, device=h.device) if need_dw else None
    if n:
        rows = _chunk_rows(n, v, d, h.element_size(), tiles)
        buf = torch.empty((min(rows, n), v), dtype=h.dtype, device=h.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            g = buf[: r1 - r0]
            fill(r0, r1, g)
            if need_dh and keep_fp32:
                _accumulate_dw(dh[r0:r1], g.t(), w, first=True)  # dh[r0:r1] = G @ W, fp32 out
            elif need_dh:
                _mm_out(g, w, dh[r0:r1])
            if need_dw:
                _accumulate_dw(dw32, g, h[r0:r1], first=r0 == 0)
    if not need_dw:
        dw = w.new_empty((0,))
    else:
        dw = dw32 if (keep_fp32 or w.dtype == torch.float32) else dw32.to(w.dtype)
    return dh, dw


#: How the recompute backward walks the gradient. ``rows``: chunks of rows against the whole
#: vocabulary (a [C, V] buffer, a V x d fp32 dW accumulator: about 1 GiB extra at Qwen2.5-0.5B's
#: (16384, 896, 151936)). ``vocab``: slices of the vocabulary against all rows (a [N, S] buffer,
#: each dW slice one GEMM over every row, straight into the output, and an N x d fp32 dh
#: accumulator: 312 MiB beyond dh and dW there, 37.6 ms on the H200). ``lean``: the least memory
#: exact gradients allow. Why: dW must be summed over every row and dh over the whole vocabulary
#: in fp32, and one of the two sums spans launches, so one fp32 accumulator is unavoidable; lean
#: holds the smaller one that is needed (dh's N x d, or dW's V x d when V < N or dh is not
#: needed, none when only one gradient is) and a gradient buffer no larger than the smaller of dh
#: and dW (``_lean_plan``). At Qwen2.5-0.5B's shape that is the vocab layout with S = d columns.
BACKWARD_LAYOUTS = ("rows", "vocab", "lean")
BACKWARD_LAYOUT = os.environ.get("CHRONICALS_CCE_BACKWARD", "rows")

#: Bytes of the [N, S] gradient buffer the vocab layout aims for.
VOCAB_SLICE_BYTES = 1 << 28


def _lean_buffer(n: int, v: int, d: int) -> int:
    """Elements of lean's gradient buffer: the smaller of dh and dW, so the buffer never outweighs
    the accumulator it sits beside."""
    return min(n, v) * d


def _vocab_slice(n: int, v: int, d: int, elt: int, tiles: Tiles, lean: bool = False) -> int:
    if tiles.vocab_cols is not None:
        return max(1, min(v, tiles.vocab_cols))
    if lean:  # an [N, S] buffer of _lean_buffer elements (S = d when N <= V), for S >= block_v
        cols = _lean_buffer(n, v, d) // max(1, n) // tiles.block_v * tiles.block_v
    else:
        cols = VOCAB_SLICE_BYTES // max(1, n * elt) // tiles.block_v * tiles.block_v
    return max(tiles.block_v, min(v, cols))


def _lean_plan(n: int, v: int, d: int, elt: int, tiles: Tiles, need_dh: bool, need_dw: bool) -> tuple[str, Tiles]:
    """``lean``'s layout and tiles: whichever of the two walks holds less beyond the outputs.
    vocab: dh's fp32 accumulator (if dh is needed) + an [N, S] buffer; rows: dW's fp32 accumulator
    (if dW is needed) + a [C, V] buffer, both buffers of ``_lean_buffer`` elements (at least one
    tile). So V < N (32k vocabularies, big batches) or a frozen lm_head (no dW) walk the rows."""
    rows = tiles.chunk_rows or max(tiles.block_n, _lean_buffer(n, v, d) // max(1, v) // tiles.block_n * tiles.block_n)
    cols = _vocab_slice(n, v, d, elt, tiles, lean=True)
    by_rows = (v * d * 4 if need_dw else 0) + min(rows, n) * v * elt
    by_vocab = (n * d * 4 if need_dh else 0) + n * min(cols, v) * elt
    if by_rows < by_vocab:
        return "rows", dataclasses.replace(tiles, chunk_rows=rows)
    return "vocab", tiles


def _gradients_by_vocab(h, w, target, lse, row_w, *, label_smoothing, softcap, scale, need_dh, need_dw,
                        tiles: Tiles, lean: bool = False):
    n, d = h.shape
    v = w.shape[0]
    cols = _vocab_slice(n, v, d, h.element_size(), tiles, lean)
    dh32 = torch.empty((n, d), dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.empty_like(w) if need_dw else w.new_empty((0,))
    buf = torch.empty((n, min(cols, v)), dtype=h.dtype, device=h.device)
    g = ws = None
    for v0 in range(0, v, cols):
        v1 = min(v, v0 + cols)
        ws, g = w[v0:v1], buf[:, : v1 - v0]
        _grad_tiles(h, ws, target - v0, lse, row_w, g, label_smoothing=label_smoothing, softcap=softcap,
                    scale=scale, tiles=tiles, recompute=True, vocab=v)
        if need_dw:  # every row at once: one GEMM, fp32 accumulation inside, one rounding
            _mm_out(g.t(), h, dw[v0:v1])
        if need_dh:
            _accumulate_dw(dh32, g.t(), ws, first=v0 == 0)  # dh32 += G @ W[v0:v1]
    del buf, g, ws  # freed before dh is rounded out of its accumulator: the two never add to the peak
    dh = (dh32 if h.dtype == torch.float32 else dh32.to(h.dtype)) if need_dh else h.new_empty((0,))
    return dh, dw


def backward(grad, h, w, target, lse, ignore_index: int = -100, reduction: str = "mean",
             label_smoothing: float = 0.0, softcap: float = 0.0, scale: float = 1.0,
             need_dh: bool = True, need_dw: bool = True,
             tiles: Tiles | None = None, layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dh, dW of ``grad * loss`` recomputing the logit tiles; an unneeded one is a [0] tensor.
    ``layout``: ``rows``, ``vocab`` or ``lean`` (default ``BACKWARD_LAYOUT``)."""
    _check(h, w, target)
    layout = layout or BACKWARD_LAYOUT
    if layout not in BACKWARD_LAYOUTS:
        raise ValueError(f"layout must be one of {BACKWARD_LAYOUTS}, got {layout!r}")
    tiles = tiles or default_tiles(h.dtype, h.device)
    h, w, target = _rows_contiguous(h), _rows_contiguous(w), target.contiguous()
    row_w = _row_weights(grad, target, ignore_index, reduction)
    lse = lse.float().contiguous()
    if not (need_dh or need_dw):
        return h.new_empty((0,)), w.new_empty((0,))
    lean = layout == "lean"
    if lean:
        layout, tiles = _lean_plan(h.shape[0], w.shape[0], h.shape[1], h.element_size(), tiles, need_dh, need_dw)
    if layout == "vocab" and h.shape[0]:
        return _gradients_by_vocab(h, w, target, lse, row_w, label_smoothing=label_smoothing, softcap=softcap,
                                   scale=scale, need_dh=need_dh, need_dw=need_dw, tiles=tiles, lean=lean)

    def fill(r0, r1, g):
        _grad_tiles(h[r0:r1], w, target[r0:r1], lse[r0:r1], row_w[r0:r1], g, label_smoothing=label_smoothing,
                    softcap=softcap, scale=scale, tiles=tiles, recompute=True)

    return _gradients(h, w, fill, need_dh=need_dh, need_dw=need_dw, tiles=tiles)


def launch_rows(z: torch.Tensor, target: torch.Tensor, row_w: torch.Tensor, tiles: Tiles, *,
                scale: float = 1.0, softcap: float = 0.0, label_smoothing: float = 0.0):
    """The row kernel over a [C, V] chunk of raw logits ``z``: per-row (lse, target logit, sum of
    logits), and G written over ``z`` in place."""
    c, v = z.shape
    stats = torch.empty((3, c), dtype=torch.float32, device=z.device)
    if c == 0:
        return stats[0], stats[1], stats[2]
    block = min(tiles.row_block, triton.next_power_of_2(v))
    _ce_rows_kernel[(c,)](
        z, target, row_w, stats[0], stats[1], stats[2], v, z.stride(0),
        float(scale), float(softcap), 1.0 - float(label_smoothing), float(label_smoothing) / v,
        BLOCK_V=block, HAS_SCALE=scale != 1.0, SOFTCAP=softcap != 0.0, SMOOTH=label_smoothing != 0.0,
        num_warps=tiles.row_warps)
    return stats[0], stats[1], stats[2]


#: How the fused mode gets each chunk's logits: ``tiles`` (our tl.dot kernel with the online
#: log-sum-exp epilogue, fp32 statistics) or ``matmul`` (one cuBLAS GEMM into the chunk buffer, then
#: a row kernel; the logits are rounded to the input dtype first, as torch's own linear does).
#: ``matmul`` by default: on the H200 (2026-11-28, benchmarks/results/2026-11-28-h200/micro.md) it
#: took 29.0 ms against 33.2 ms for ``tiles`` at (16384, 896, 151936) and 53.0 against 59.0 ms at
#: (8192, 2304, 256000), forward + backward, same memory.
FUSED_LOGITS = os.environ.get("CHRONICALS_CCE_LOGITS", "matmul")

#: The row kernel after a ``matmul`` chunk: ``triton`` (``_ce_rows_kernel``: two reads and a write
#: of the chunk) or ``quack`` (QuACK's, ``kernels.quack_cross_entropy``: the row held in a CTA
#: cluster's shared memory, one read and a write) where it can take the call, ``triton`` elsewhere.
#: ``quack`` by default: on an H100 a [3328, 151936] bf16 chunk took 0.734 ms against 1.079, the
#: fused op at (16384, 896, 151936) 24.61 against 25.10 ms and the Qwen2.5-0.5B 8 x 2048 step
#: 117.6 against 118.6 ms (+0.9%), same peak memory
#: (benchmarks/results/2026-12-06-h100-session18/call4).
FUSED_ROWS = os.environ.get("CHRONICALS_CCE_ROWS", "quack")

#: The widest vocabulary handed to QuACK's row kernel: a row spreads over at most 16 CTAs, each
#: holding its slice in shared memory (16 x 16384 bf16 = 32 KB a CTA here); wider rows stay ours.
QUACK_MAX_VOCAB = 1 << 18


def _grad_scale(valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """What turns gradients of the summed row losses into the loss's: 1 / valid rows for a mean
    (0 when none is valid: zero gradients, as torch gives), 1 for a sum (and for gradients already
    weighted: ``reduction="sum"``). 0-dim fp32."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=valid.device)
    count = valid.sum()
    return torch.where(count > 0, 1.0 / count.clamp(min=1).float(), 0.0)


def _quack_rows(z_dtype: torch.dtype, device: torch.device, logits: str, rows: str, plain: bool,
                vocab: int) -> bool:
    """QuACK's kernel takes the chunk: plain logits from a GEMM, a vocabulary that is a multiple of 8
    (16-byte rows: at an odd one its async copies fail to compile, "cp_size only supports (32, 64,
    128), but got 16", H100 session 18) and at most ``QUACK_MAX_VOCAB``, and QuACK usable here."""
    if logits != "matmul" or rows != "quack" or not plain or vocab % 8 or vocab > QUACK_MAX_VOCAB:
        return False
    from . import quack_cross_entropy

    return quack_cross_entropy.unavailable_reason(device, z_dtype) is None


def fused(h, w, target, ignore_index: int = -100, reduction: str = "mean",
          label_smoothing: float = 0.0, softcap: float = 0.0, scale: float = 1.0,
          need_dh: bool = True, need_dw: bool = True,
          tiles: Tiles | None = None, logits: str | None = None,
          keep_fp32: bool = False, defer_weight: bool = False, rows: str | None = None):
    """Loss plus dh and dW for an incoming gradient of 1, the logits computed once per chunk.
    ``keep_fp32``: dh and dW come back as their fp32 accumulators, not rounded to the input dtype:
    the backward scales them by the incoming gradient and rounds once (no second rounding, and no
    fp32 -> bf16 pass over V x d in the forward). ``defer_weight`` (with ``keep_fp32``): a fourth
    result, a 0-dim fp32 ``grad_scale``, is what dh and dW must still be multiplied by (with the
    incoming gradient) to be the loss's: 1 where the row weight was applied per logit (our row
    kernels, whose numbers stay exactly those of the weighted G), 1 / valid rows for a mean (0 when
    none is valid) where QuACK's row kernel, which applies no weight, wrote G. The backward
    multiplies it in for free. ``rows``: the row kernel (``FUSED_ROWS`` by default)."""
    _check(h, w, target)
    tiles = tiles or default_tiles(h.dtype, h.device)
    logits = logits or FUSED_LOGITS
    rows = rows or FUSED_ROWS
    if logits not in ("tiles", "matmul"):
        raise ValueError(f"logits must be 'tiles' or 'matmul', got {logits!r}")
    if rows not in ("triton", "quack"):
        raise ValueError(f"rows must be 'triton' or 'quack', got {rows!r}")
    if defer_weight and not keep_fp32:
        raise ValueError("defer_weight needs keep_fp32 (the weight is applied to the fp32 accumulators)")
    valid = target != ignore_index
    if not (need_dh or need_dw):
        loss, _ = forward(h, w, target, ignore_index, reduction, label_smoothing, softcap, scale, tiles)
        out = (loss, h.new_empty((0,)), w.new_empty((0,)))
        return (*out, _grad_scale(valid, "sum")) if defer_weight else out
    h, w, target = _rows_contiguous(h), _rows_contiguous(w), target.contiguous()
    n, v = h.shape[0], w.shape[0]
    smooth = label_smoothing != 0.0
    quack = _quack_rows(h.dtype, h.device, logits, rows, not smooth and softcap == 0.0 and scale == 1.0, v)
    unweighted = quack  # QuACK writes G without the row weight; ours applies it per logit
    row_w = _row_weights(torch.ones((), device=h.device), target, ignore_index,
                         "sum" if unweighted else reduction, valid)
    row_loss = torch.zeros((n,), dtype=torch.float32, device=h.device)
    if quack:
        from . import quack_cross_entropy

        quack_target = quack_cross_entropy.safe_targets(target, v, ignore_index)

    def fill(r0, r1, g):
        hc, tc = h[r0:r1], target[r0:r1]
        if logits == "tiles":
            lse, zt, sumz = _launch_stats(hc, w, tc, softcap, scale, smooth, tiles, z_out=g)
            _grad_tiles(hc, w, tc, lse, row_w[r0:r1], g, label_smoothing=label_smoothing, softcap=softcap,
                        scale=scale, tiles=tiles, recompute=False)
        elif quack:
            _mm_out(hc, w.t(), g)
            quack_cross_entropy.rows_in_place(g, quack_target[r0:r1], ignore_index, row_loss[r0:r1])
            return
        else:
            _mm_out(hc, w.t(), g)
            lse, zt, sumz = launch_rows(g, tc, row_w[r0:r1], tiles, scale=scale, softcap=softcap,
                                        label_smoothing=label_smoothing)
            sumz = sumz if smooth else None
        row_loss[r0:r1] = _row_losses(lse, zt, sumz, tc, v, ignore_index, label_smoothing)[0]

    dh, dw = _gradients(h, w, fill, need_dh=need_dh, need_dw=need_dw, tiles=tiles,
                        keep_fp32=keep_fp32 or unweighted)  # unweighted: rounded once, after the weight
    if quack:  # a target out of range that is not ignored: NaN, as _row_losses gives
        in_range = (target >= 0) & (target < v)
        row_loss = torch.where(in_range | ~valid, row_loss, math.nan)
    loss = _reduce(row_loss, valid, reduction)
    if not unweighted:
        return (loss, dh, dw, _grad_scale(valid, "sum")) if defer_weight else (loss, dh, dw)
    grad_scale = _grad_scale(valid, reduction)
    if defer_weight:
        return loss, dh, dw, grad_scale
    # QuACK's G carried no row weight: apply it to the fp32 accumulators, then round once
    if need_dh:
        dh = dh * grad_scale if keep_fp32 else (dh * grad_scale).to(h.dtype)
    if need_dw:
        dw = dw * grad_scale if keep_fp32 else (dw * grad_scale).to(w.dtype)
    return loss, dh, dw


def scale(x: torch.Tensor, g: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(x.float() * g).to(out_dtype or x.dtype)`` in one pass: the fused mode's backward scales
    its fp32 dh and dW by the incoming gradient and rounds once. Eager torch spends three kernels
    and fp32 copies of dW on this (about 3 ms at a 256000 x 2304 vocabulary on the H200); Inductor
    fuses the torch spelling itself, so compiled graphs keep that one."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    block = 4096
    _scale_kernel[(triton.cdiv(x.numel(), block),)](x, g.reshape(1), y, x.numel(), BLOCK=block, num_warps=8)
    return y
