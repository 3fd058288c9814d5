"""Is a Triton GEMM with the SwiGLU math in its epilogue faster than cuBLAS + a fused elementwise
kernel, at Qwen2.5-0.5B's MLP shapes (16384 x 896 -> 4864)? Why ask: in the full fine-tuning step
the SwiGLU elementwise kernels cost ~8 ms (silu backward 5.4, forward 2.7) and only move bytes the
neighbouring GEMM just wrote or is about to read; folded into the GEMM they would vanish, but only
if a Triton GEMM with K = 896 runs near cuBLAS. This measures exactly that before any pass is built.

Three pairs, each checked against its reference before it is timed (bf16 inputs, fp32 math):

* ``gemm``: dh = dY @ W_down, cuBLAS against the Triton GEMM alone (the GEMM's own efficiency).
* ``bwd``: dh = dY @ W_down, then h = silu(g) * u, dg, du from dh, g, u (what the step runs in
  backward with the gate recomputed), against one Triton kernel doing both.
* ``fwd``: g = x @ W_gate.T, u = x @ W_up.T, h = silu(g) * u, against one Triton kernel with two
  accumulators writing g, u and h.

    python benchmarks/bench_mlp_epilogue.py [--tokens 16384] [--hidden 896] [--inter 4864]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _configs(two_acc: bool):
    shapes = [(128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (64, 256, 64, 8, 4), (128, 64, 64, 4, 4)]
    if not two_acc:
        shapes += [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share their B tiles in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _swiglu_bwd_math(acc, g, u):
    """From dh (the fp32 accumulator) and g, u (fp32): h = silu(g) * u, dg, du."""
    sig = tl.sigmoid(g)
    silu = g * sig
    return silu * u, acc * u * sig * (1.0 + g * (1.0 - sig)), acc * silu


@triton.autotune(configs=_configs(False), key=["M", "N", "K", "EPILOGUE"])
@triton.jit
def _mm_swiglu_bwd_kernel(a_ptr, b_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, M, N, K,
                          stride_am, stride_bk, stride_cm,
                          EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """acc = A[M, K] @ B[K, N]; EPILOGUE: from acc = dh and g, u write h, dg, du (else write acc)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + rm[:, None] * stride_am + rk[None, :]
    b = b_ptr + rk[:, None] * stride_bk + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ka = (k0 + rk) < K
        acc += tl.dot(tl.load(a, mask=(rm[:, None] < M) & ka[None, :], other=0.0),
                      tl.load(b, mask=ka[:, None] & (rn[None, :] < N), other=0.0))
        a += BLOCK_K
        b += BLOCK_K * stride_bk
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm[:, None] * stride_cm + rn[None, :]
    if EPILOGUE:
        h, dg, du = _swiglu_bwd_math(acc, tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32),
                                     tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32))
        tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(h_ptr + off, acc.to(h_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(True), key=["M", "N", "K"])
@triton.jit
def _mm_swiglu_fwd_kernel(x_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, h_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """g = x @ Wg.T, u = x @ Wu.T (W: [N, K]) in two accumulators; write g, u, h = silu(g) * u."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    wg = wg_ptr + rn[None, :] * stride_wn + rk[:, None]
    wu = wu_ptr + rn[None, :] * stride_wn + rk[:, None]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ka = (k0 + rk) < K
        xt = tl.load(x, mask=(rm[:, None] < M) & ka[None, :], other=0.0)
        wmask = ka[:, None] & (rn[None, :] < N)
        acc_g += tl.dot(xt, tl.load(wg, mask=wmask, other=0.0))
        acc_u += tl.dot(xt, tl.load(wu, mask=wmask, other=0.0))
        x += BLOCK_K
        wg += BLOCK_K
        wu += BLOCK_K
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm[:, None] * stride_cm + rn[None, :]
    gq = acc_g.to(g_ptr.dtype.element_ty)
    uq = acc_u.to(u_ptr.dtype.element_ty)
    tl.store(g_ptr + off, gq, mask=mask)
    tl.store(u_ptr + off, uq, mask=mask)
    gf, uf = gq.to(tl.float32), uq.to(tl.float32)  # h from the rounded g, u: what eager computes
    tl.store(h_ptr + off, (gf * tl.sigmoid(gf) * uf).to(h_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(False), key=["M", "N", "K", "EPILOGUE"])
@triton.jit
def _mm_swiglu_bwd_tma_kernel(a_ptr, b_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, M, N, K,
                              EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The same through tensor descriptors (TMA loads and stores; contiguous operands)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    a_d = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    b_d = tl.make_tensor_descriptor(b_ptr, [K, N], [N, 1], [BLOCK_K, BLOCK_N])
    om, on = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        acc += tl.dot(a_d.load([om, k0]), b_d.load([k0, on]))
    h_d = tl.make_tensor_descriptor(h_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    if EPILOGUE:
        g_d = tl.make_tensor_descriptor(g_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
        u_d = tl.make_tensor_descriptor(u_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
        dg_d = tl.make_tensor_descriptor(dg_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
        du_d = tl.make_tensor_descriptor(du_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
        h, dg, du = _swiglu_bwd_math(acc, g_d.load([om, on]).to(tl.float32), u_d.load([om, on]).to(tl.float32))
        h_d.store([om, on], h.to(h_ptr.dtype.element_ty))
        du_d.store([om, on], du.to(du_ptr.dtype.element_ty))
        dg_d.store([om, on], dg.to(dg_ptr.dtype.element_ty))
    else:
        h_d.store([om, on], acc.to(h_ptr.dtype.element_ty))


def _persistent_configs():
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                  (128, 64, 64, 4, 4))]


@triton.autotune(configs=_persistent_configs(), key=["M", "N", "K", "EPILOGUE", "WARP_SPECIALIZE", "PREFETCH"])
@triton.jit
def _mm_swiglu_bwd_persistent_kernel(a_ptr, b_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, M, N, K,
                                     EPILOGUE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, NUM_SMS: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr, PREFETCH: tl.constexpr = False):
    """One program per SM walking output tiles (TMA loads): the compiler can issue the next tile's
    operand loads while this tile's epilogue runs, which the one-tile-per-program kernels cannot."""
    a_d = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    b_d = tl.make_tensor_descriptor(b_ptr, [K, N], [N, 1], [BLOCK_K, BLOCK_N])
    h_d = tl.make_tensor_descriptor(h_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    g_d = tl.make_tensor_descriptor(g_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    u_d = tl.make_tensor_descriptor(u_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    dg_d = tl.make_tensor_descriptor(dg_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    du_d = tl.make_tensor_descriptor(du_ptr, [M, N], [N, 1], [BLOCK_M, BLOCK_N])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        om, on = pid_m * BLOCK_M, pid_n * BLOCK_N
        if EPILOGUE and PREFETCH:  # issued before the main loop: in flight while the tensor cores work
            g_in = g_d.load([om, on])
            u_in = u_d.load([om, on])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ks in range(k_steps):
            acc += tl.dot(a_d.load([om, ks * BLOCK_K]), b_d.load([ks * BLOCK_K, on]))
        if EPILOGUE:
            if PREFETCH:
                g = g_in.to(tl.float32)
                u = u_in.to(tl.float32)
            else:
                g = g_d.load([om, on]).to(tl.float32)
                u = u_d.load([om, on]).to(tl.float32)
            h, dg, du = _swiglu_bwd_math(acc, g, u)
            h_d.store([om, on], h.to(h_ptr.dtype.element_ty))
            du_d.store([om, on], du.to(du_ptr.dtype.element_ty))
            dg_d.store([om, on], dg.to(dg_ptr.dtype.element_ty))
        else:
            h_d.store([om, on], acc.to(h_ptr.dtype.element_ty))


def triton_bwd_persistent(dy, w_down, g, u, epilogue=True, warp_specialize=False, prefetch=False):
    m, k = dy.shape
    n = w_down.shape[1]
    h = torch.empty((m, n), device=dy.device, dtype=dy.dtype)
    dg, du = (torch.empty_like(h), torch.empty_like(h)) if epilogue else (h, h)
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 4
    grid = lambda meta: (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)  # noqa: E731
    _mm_swiglu_bwd_persistent_kernel[grid](dy, w_down, g, u, h, dg, du, m, n, k, EPILOGUE=epilogue,
                                           WARP_SPECIALIZE=warp_specialize, NUM_SMS=sms, PREFETCH=prefetch)
    return (h, dg, du) if epilogue else h


def _tma_allocator():
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))


def triton_bwd_tma(dy, w_down, g, u, epilogue=True):
    m, k = dy.shape
    n = w_down.shape[1]
    h = torch.empty((m, n), device=dy.device, dtype=dy.dtype)
    dg, du = (torch.empty_like(h), torch.empty_like(h)) if epilogue else (h, h)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _mm_swiglu_bwd_tma_kernel[grid](dy, w_down, g, u, h, dg, du, m, n, k, EPILOGUE=epilogue)
    return (h, dg, du) if epilogue else h


def triton_bwd(dy, w_down, g, u, epilogue=True):
    m, k = dy.shape
    n = w_down.shape[1]
    h = torch.empty((m, n), device=dy.device, dtype=dy.dtype)
    dg, du = (torch.empty_like(h), torch.empty_like(h)) if epilogue else (h, h)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _mm_swiglu_bwd_kernel[grid](dy, w_down, g, u, h, dg, du, m, n, k, dy.stride(0), w_down.stride(0), h.stride(0),
                                EPILOGUE=epilogue)
    return (h, dg, du) if epilogue else h


def triton_fwd(x, w_gate, w_up):
    m, k = x.shape
    n = w_gate.shape[0]
    g = torch.empty((m, n), device=x.device, dtype=x.dtype)
    u, h = torch.empty_like(g), torch.empty_like(g)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _mm_swiglu_fwd_kernel[grid](x, w_gate, w_up, g, u, h, m, n, k, x.stride(0), w_gate.stride(0), g.stride(0))
    return g, u, h


def _silu_bwd(dh, g, u):
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    return (silu * uf).to(g.dtype), (dhf * uf * sig * (1 + gf * (1 - sig))).to(g.dtype), (dhf * silu).to(g.dtype)


def _silu_mul(g, u):
    return (torch.nn.functional.silu(g.float()) * u.float()).to(g.dtype)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--inter", type=int, default=4864)


def mlp_inputs(m: int, d: int, f: int, dev: str = "cuda", dt: torch.dtype = torch.bfloat16):
    """x, dY [m, d]; W_gate, W_up [f, d]; W_down [d, f] (seed 0, unit-variance outputs)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, d, device=dev, dtype=dt, generator=gen)
    dy = torch.randn(m, d, device=dev, dtype=dt, generator=gen)
    w_gate = (torch.randn(f, d, device=dev, generator=gen) * d ** -0.5).to(dt)
    w_up = (torch.randn(f, d, device=dev, generator=gen) * d ** -0.5).to(dt)
    w_down = (torch.randn(d, f, device=dev, generator=gen) * f ** -0.5).to(dt)
    return x, dy, w_gate, w_up, w_down


def _close(got, want, what):
    for a, b in zip(got, want):
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < 2e-2, (what, err)  # bf16 outputs; the GEMMs differ only in summation order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--only", default="", help="time only the pairs whose name contains this")
    args = ap.parse_args()
    m, d, f = args.tokens, args.hidden, args.inter
    x, dy, w_gate, w_up, w_down = mlp_inputs(m, d, f)
    g, u = x @ w_gate.t(), x @ w_up.t()
    silu_bwd, silu_mul = torch.compile(_silu_bwd), torch.compile(_silu_mul)
    w_gu = torch.cat([w_gate, w_up])

    pairs = {
        "gemm  dh = dY @ W_down": (lambda: dy @ w_down, lambda: triton_bwd(dy, w_down, g, u, epilogue=False),
                                   2 * m * d * f),
        "bwd   dh GEMM + silu backward": (lambda: silu_bwd(dy @ w_down, g, u), lambda: triton_bwd(dy, w_down, g, u),
                                          2 * m * d * f),
        "fwd   gate, up GEMMs + silu * up": (lambda: (lambda g_, u_: (g_, u_, silu_mul(g_, u_)))(x @ w_gate.t(),
                                                                                            x @ w_up.t()),
                                             lambda: triton_fwd(x, w_gate, w_up), 4 * m * d * f),
        "fwd   one gate|up GEMM + silu * up": (lambda: (lambda gu: (gu[:, :f], gu[:, f:], silu_mul(gu[:, :f], gu[:, f:])))(
            x @ w_gu.t()), lambda: triton_fwd(x, w_gate, w_up), 4 * m * d * f),
    }
    try:
        _tma_allocator()
        triton_bwd_tma(dy, w_down, g, u)
        pairs["gemm  (TMA descriptors)"] = (pairs["gemm  dh = dY @ W_down"][0],
                                            lambda: triton_bwd_tma(dy, w_down, g, u, epilogue=False), 2 * m * d * f)
        pairs["bwd   (TMA descriptors)"] = (pairs["bwd   dh GEMM + silu backward"][0],
                                            lambda: triton_bwd_tma(dy, w_down, g, u), 2 * m * d * f)
    except Exception as e:  # noqa: BLE001 - a missing TMA path is a finding, not a failure
        print(f"TMA descriptor kernels unavailable: {type(e).__name__}: {str(e)[:200]}")
    for ws in (False, True):
        tag = " warp-specialised" if ws else ""
        try:
            triton_bwd_persistent(dy, w_down, g, u, warp_specialize=ws)
            pairs[f"gemm  (persistent{tag})"] = (pairs["gemm  dh = dY @ W_down"][0], lambda ws=ws: triton_bwd_persistent(
                dy, w_down, g, u, epilogue=False, warp_specialize=ws), 2 * m * d * f)
            pairs[f"bwd   (persistent{tag})"] = (pairs["bwd   dh GEMM + silu backward"][0],
                                                 lambda ws=ws: triton_bwd_persistent(dy, w_down, g, u, warp_specialize=ws),
                                                 2 * m * d * f)
        except Exception as e:  # noqa: BLE001
            print(f"persistent{tag} kernel unavailable: {type(e).__name__}: {str(e)[:300]}")
        try:
            triton_bwd_persistent(dy, w_down, g, u, warp_specialize=ws, prefetch=True)
            pairs[f"bwd   (persistent{tag}, g and u loaded before the main loop)"] = (
                pairs["bwd   dh GEMM + silu backward"][0],
                lambda ws=ws: triton_bwd_persistent(dy, w_down, g, u, warp_specialize=ws, prefetch=True), 2 * m * d * f)
        except Exception as e:  # noqa: BLE001
            print(f"persistent{tag} prefetching kernel unavailable: {type(e).__name__}: {str(e)[:300]}")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"commit {common.git_commit()}, M={m} K={d} N={f}, bf16, medians of triton do_bench")
    print("| pair | cuBLAS + Inductor ms | TFLOP/s | Triton fused ms | TFLOP/s | Triton config | gain ms x 24 layers |")
    print("|---|---|---|---|---|---|---|")
    for name, (ref_fn, ours_fn, flops) in pairs.items():
        if args.only and args.only not in name:
            continue
        want, got = ref_fn(), ours_fn()
        _close(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), name)
        ref_ms, ours_ms = common.do_bench_ms(ref_fn, rep=200), common.do_bench_ms(ours_fn, rep=200)
        kern = (_mm_swiglu_fwd_kernel if name.startswith("fwd") else _mm_swiglu_bwd_tma_kernel if "TMA" in name
                else _mm_swiglu_bwd_persistent_kernel if "persistent" in name else _mm_swiglu_bwd_kernel)
        cfg = kern.best_config
        print(f"| {name} | {ref_ms:.4f} | {common.tflops(flops, ref_ms):.0f} | {ours_ms:.4f} | "
              f"{common.tflops(flops, ours_ms):.0f} | {cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x"
              f"{cfg.kwargs['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages} | {(ref_ms - ours_ms) * 24:+.2f} |")


if __name__ == "__main__":
    main()
