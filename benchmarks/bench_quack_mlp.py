"""Does QuACK (Tri Dao's CuTe-DSL kernels: GEMMs with the SwiGLU forward / backward in the
epilogue) beat cuBLAS + Inductor's elementwise kernels at Qwen2.5-0.5B's MLP (16384 x 896 -> 4864)?
Why ask: issue 7's last ~6 ms are the SwiGLU elementwise passes (~8 ms a step), which only a GEMM
epilogue at cuBLAS speed removes; our own Triton epilogue loses (bench_mlp_epilogue.py). QuACK is
not a dependency: this script runs where it is installed (the device, carried as `.qk/` built by
``scripts/quack-wheels.sh``) and says so where it is not.

Three pairs, each checked against its reference before it is timed (bf16):

* ``gated fwd``: preact = x @ [W_gate|W_up interleaved].T, postact = silu(g) * u, against one
  cuBLAS GEMM + Inductor's silu * up;
* ``dgated bwd``: dh = dY @ W_down with d(preact) and postact from the epilogue, against cuBLAS +
  Inductor's silu backward;
* ``MLP fwd+bwd``: ``quack.mlp.mlp_func`` against the three-linear MLP through torch.compile.

    python benchmarks/bench_quack_mlp.py [--tokens 16384] [--tuned] [--skip-mlp]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_mlp_epilogue import _silu_bwd, _silu_mul, add_shape_args, mlp_inputs  # noqa: E402


def _mlp(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--tuned", action="store_true", help="let QuACK autotune its tile configs (long compiles)")
    ap.add_argument("--skip-mlp", action="store_true", help="time the two epilogue GEMMs only, not quack.mlp")
    args = ap.parse_args()
    try:
        import quack
        from quack.gemm_interface import gemm_dgated, gemm_gated
        from quack.mlp import mlp_func
    except Exception as err:  # noqa: BLE001 - not installed is the answer on this machine
        print(f"quack not importable here: {type(err).__name__}: {err}")
        return
    dev, dt = "cuda", torch.bfloat16
    m, d, f = args.tokens, args.hidden, args.inter
    tuned = args.tuned
    x, dy, w_gate, w_up, w_down = mlp_inputs(m, d, f, dev, dt)
    w1 = torch.stack([w_gate, w_up], dim=1).reshape(2 * f, d)  # rows g0, u0, g1, u1, ...: QuACK's interleaving
    w_gu = torch.cat([w_gate, w_up])
    silu_mul, silu_bwd = torch.compile(_silu_mul), torch.compile(_silu_bwd)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, quack {getattr(quack, '__version__', '?')}, "
          f"commit {common.git_commit()}, M={m} K={d} N={f}, bf16, tuned={tuned}, medians of triton do_bench")
    rows = []
    print("| pair | cuBLAS + Inductor ms | TFLOP/s | QuACK ms | TFLOP/s | max rel diff | QuACK first call s | gain ms x 24 layers |")
    print("|---|---|---|---|---|---|---|---|", flush=True)

    def report(name, ref_ms, ours_ms, flops, err, cs):
        rows.append(name)
        print(f"| {name} | {ref_ms:.4f} | {common.tflops(flops, ref_ms):.0f} | {ours_ms:.4f} | "
              f"{common.tflops(flops, ours_ms):.0f} | {err:.1e} | {cs:.1f} | {(ref_ms - ours_ms) * 24:+.2f} |", flush=True)

    # gated forward
    t0 = time.monotonic()
    preact, postact = gemm_gated(x, w1.t(), activation="swiglu", tuned=tuned)
    compile_s = time.monotonic() - t0
    gu = x @ w_gu.t()
    g, u = gu[:, :f], gu[:, f:]
    want = silu_mul(g, u)
    err = max(_rel(preact.view(m, f, 2)[..., 0], g), _rel(preact.view(m, f, 2)[..., 1], u), _rel(postact, want))
    ref_ms = common.do_bench_ms(lambda: (lambda z: silu_mul(z[:, :f], z[:, f:]))(x @ w_gu.t()), rep=200)
    ours_ms = common.do_bench_ms(lambda: gemm_gated(x, w1.t(), activation="swiglu", tuned=tuned), rep=200)
    report("gated fwd: gate|up GEMM + silu * up", ref_ms, ours_ms, 4 * m * d * f, err, compile_s)

    # dgated backward
    g, u = g.contiguous(), u.contiguous()
    t0 = time.monotonic()
    dpre, post = gemm_dgated(dy, w_down, preact, activation="swiglu", tuned=tuned)
    compile_s = time.monotonic() - t0
    h, dg, du = silu_bwd(dy @ w_down, g, u)
    err = max(_rel(dpre.view(m, f, 2)[..., 0], dg), _rel(dpre.view(m, f, 2)[..., 1], du), _rel(post, h))
    ref_ms = common.do_bench_ms(lambda: silu_bwd(dy @ w_down, g, u), rep=200)
    ours_ms = common.do_bench_ms(lambda: gemm_dgated(dy, w_down, preact, activation="swiglu", tuned=tuned), rep=200)
    report("dgated bwd: dh GEMM + silu backward", ref_ms, ours_ms, 2 * m * d * f, err, compile_s)

    if args.skip_mlp:
        return
    # the whole MLP, forward and backward
    xr = x.clone().requires_grad_(True)
    ws = [w.clone().requires_grad_(True) for w in (w_gate, w_up, w_down)]
    w1r, w2r = w1.clone().requires_grad_(True), w_down.clone().requires_grad_(True)
    grad = torch.randn(m, d, device=dev, dtype=dt, generator=torch.Generator(device=dev).manual_seed(1))
    mlp_compiled = torch.compile(_mlp)

    def torch_step():
        out = mlp_compiled(xr, *ws)
        out.backward(grad)

    def quack_step():
        out = mlp_func(xr, w1r, w2r, "swiglu", tuned=tuned)
        out.backward(grad)

    torch_step()
    want_dx = xr.grad.clone()
    xr.grad = None
    t0 = time.monotonic()
    quack_step()
    compile_s = time.monotonic() - t0
    err = _rel(xr.grad, want_dx)
    for t in (xr, *ws, w1r, w2r):
        t.grad = None
    ref_ms = common.do_bench_ms(torch_step, rep=300)
    ours_ms = common.do_bench_ms(quack_step, rep=300)
    for fn, name in ((torch_step, "torch"), (quack_step, "quack")):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        print(f"MLP fwd+bwd peak beyond inputs, {name}: {(torch.cuda.max_memory_allocated() - before) / 2**20:.0f} MiB")
    report("MLP fwd+bwd (three linears, Inductor vs quack.mlp)", ref_ms, ours_ms, 18 * m * d * f, err, compile_s)


if __name__ == "__main__":
    main()
