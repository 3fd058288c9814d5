"""The Triton side of the cut cross-entropy: the tile kernels and their device helpers.

Launchers, tile sizes and the reasoning behind the design live in ``linear_cross_entropy.py``;
this file holds only what runs on the device, so each can be read without the other.
"""
import triton
import triton.language as tl

@triton.jit
def _tanh(x):
    # tanh from exp, sign-symmetric so it never overflows; absolute error ~ fp32 eps.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _tile_ids(pid, n_row_tiles, n_col_groups, GROUP_N: tl.constexpr):
    # Grouped ordering: GROUP_N row tiles walk the vocab together, so the W tiles they share
    # are read from HBM once and hit L2 for the others.
    width = GROUP_N * n_col_groups
    group = pid // width
    first = group * GROUP_N
    size = tl.minimum(n_row_tiles - first, GROUP_N)
    local = pid % width
    return first + local % size, local // size


@triton.jit
def _logit_tile(H, W, rows, cols, D, stride_h, stride_w,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``h[rows] @ W[cols].T`` in fp32. ``rows``/``cols`` must already be clamped in range."""
    ks = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = W + cols[None, :].to(tl.int64) * stride_w + ks[:, None]  # a W.T tile: [BLOCK_D, BLOCK_V]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        if EVEN_D:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k + ks) < D
            a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return acc


@triton.jit
def _transform(acc, scale, softcap, HAS_SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    z = acc
    if HAS_SCALE:
        z = z * scale
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _cce_fwd_kernel(H, W, T, Z, M_OUT, S_OUT, ZT_OUT, SZ_OUT,
                    N, V, D, stride_h, stride_w, stride_z,
                    n_col_groups, tiles_per_group, scale, softcap,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    GROUP_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_SCALE: tl.constexpr,
                    SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, STORE_Z: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    row_tile, group = _tile_ids(pid, tl.cdiv(N, BLOCK_N), n_col_groups, GROUP_N)
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_in = tl.minimum(rows, N - 1)  # clamped: loads need no row mask
    tgt = tl.load(T + rows_in)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)
    first = group * tiles_per_group
    last = tl.minimum(first + tiles_per_group, tl.cdiv(V, BLOCK_V))
    for vt in range(first, last):
        cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = _logit_tile(H, W, rows_in, tl.minimum(cols, V - 1), D, stride_h, stride_w,
                          BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION)
        z = _transform(acc, scale, softcap, HAS_SCALE, SOFTCAP)
        if STORE_Z:
            z_ptrs = Z + rows[:, None].to(tl.int64) * stride_z + cols[None, :]
            tl.store(z_ptrs, z.to(Z.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        zm = tl.where(col_ok[None, :], z, float("-inf"))
        new_m = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(zm - new_m[:, None]), axis=1)
        m = new_m
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        if SMOOTH:
            sz += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    out = group * N + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    tl.store(ZT_OUT + out, zt, mask=row_ok)
    if SMOOTH:
        tl.store(SZ_OUT + out, sz, mask=row_ok)


@triton.jit
def _cce_grad_kernel(H, W, T, LSE, ROW_W, G,
                     N, V, D, stride_h, stride_w, stride_g,
                     scale, softcap, target_weight, uniform_weight,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                     GROUP_N: tl.constexpr, EVEN_D: tl.constexpr, HAS_SCALE: tl.constexpr,
                     SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, RECOMPUTE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    row_tile, vt = _tile_ids(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_N)
    rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vt * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    mask = row_ok[:, None] & col_ok[None, :]
    g_ptrs = G + rows[:, None].to(tl.int64) * stride_g + cols[None, :]
    w_row = tl.load(ROW_W + rows, mask=row_ok, other=0.0)
    if tl.max(tl.abs(w_row), axis=0) == 0.0:
        # every row of the tile is ignored (or padding): no recompute, zero gradient
        tl.store(g_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=G.dtype.element_ty), mask=mask)
    else:
        if RECOMPUTE:
            acc = _logit_tile(H, W, tl.minimum(rows, N - 1), tl.minimum(cols, V - 1), D,
                              stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_PRECISION)
            z = _transform(acc, scale, softcap, HAS_SCALE, SOFTCAP)
        else:
            z = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
        tgt = tl.load(T + rows, mask=row_ok, other=-1)
        g = tl.exp(z - lse[:, None])
        g = g - tl.where(cols[None, :] == tgt[:, None], target_weight, 0.0)
        if SMOOTH:
            g = g - uniform_weight
        g = g * w_row[:, None]
        if SOFTCAP:
            t = z / softcap
            g = g * (1.0 - t * t)
        if HAS_SCALE:
            g = g * scale
        tl.store(g_ptrs, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _ce_rows_kernel(Z, T, ROW_W, LSE_OUT, ZT_OUT, SZ_OUT, V, stride_z,
                    scale, softcap, target_weight, uniform_weight,
                    BLOCK_V: tl.constexpr, HAS_SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
                    SMOOTH: tl.constexpr):
    """One row of materialised raw logits (a matmul's output): statistics, then G in place.

    Memory-bound: the row is read twice and written once, the least a row that does not fit on
    chip allows (a 152k-vocabulary bf16 row is 300 KB). So the arithmetic per element is kept to
    one exp per pass: the online log-sum-exp rescales by the block's max (a scalar), not per lane,
    and the target logit is one scalar load instead of a compare in every lane. Aiming the second
    read at L2 was measured and lost (H200, session 10, ``results/2026-12-03-h200-session10``): a
    backwards second pass changed nothing, and grids of a few programs per SM looping over rows
    (fewer rows in flight) ran 1.05-2.3x slower: one program per row keeps the most loads in flight.
    """
    row = tl.program_id(0)
    z_row = Z + row.to(tl.int64) * stride_z
    tgt = tl.load(T + row)
    w_row = tl.load(ROW_W + row)
    # Read before any lane of this program overwrites the row with G (the reductions of the first
    # loop put barriers between this load and the second loop's stores).
    zt = _transform(tl.load(z_row + tl.minimum(tl.maximum(tgt, 0), V - 1)).to(tl.float32), scale, softcap,
                    HAS_SCALE, SOFTCAP)
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    sz = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        z = _transform(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), scale, softcap,
                       HAS_SCALE, SOFTCAP)
        zm = tl.where(ok, z, float("-inf"))
        new_m = tl.maximum(m, tl.max(zm, axis=0))
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(zm - safe), axis=0)
        m = new_m
        if SMOOTH:
            sz += tl.sum(tl.where(ok, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(LSE_OUT + row, lse)
    tl.store(ZT_OUT + row, zt)
    if SMOOTH:
        tl.store(SZ_OUT + row, sz)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        if w_row == 0.0:
            g = tl.zeros((BLOCK_V,), tl.float32)
        else:
            z = _transform(tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32), scale, softcap,
                           HAS_SCALE, SOFTCAP)
            g = tl.exp(z - lse) - tl.where(cols == tgt, target_weight, 0.0)
            if SMOOTH:
                g = g - uniform_weight
            g = g * w_row
            if SOFTCAP:
                t = z / softcap
                g = g * (1.0 - t * t)
            if HAS_SCALE:
                g = g * scale
        tl.store(z_row + cols, g.to(Z.dtype.element_ty), mask=ok)


@triton.jit
def _scale_kernel(X, G, Y, numel, BLOCK: tl.constexpr):
    """``y = x * g`` in fp32 with one rounding; ``g`` is read on the device (no host sync)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(G).to(tl.float32)
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * g).to(Y.dtype.element_ty), mask=ok)
