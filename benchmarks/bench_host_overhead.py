"""Host (CPU) time per call of the ops in a decoder layer's forward, with the GPU kept busy.

Why: the step profile (results/2026-12-04-h200-session14/call2) shows the GPU idle ~165 us
before every layer's QuACK gated GEMM in forward (4 ms a step) and the forward's host work
returning at 36 ms against Inductor's 10: a launch that costs the host more than the GPU work
queued before it leaves the GPU waiting. This measures each op's host cost alone (the GPU busy
with a sleep kernel, so no call waits on it) and profiles QuACK's call path with cProfile to say
which Python frames the time is in.

    python benchmarks/bench_host_overhead.py --out DIR      # CUDA only; writes host_overhead.md
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


CALLS = 40


def host_us(fn, calls: int = CALLS) -> float:
    """Mean host time of ``fn()`` over ``calls`` calls, the GPU held busy meanwhile.

    Few calls: CUDA's launch queue holds about a thousand launches, and once it is full a launch
    waits for the GPU (session 14's 200 calls of the MLP backward, ~8 launches each, measured the
    sleep kernel: 5.7 ms a call)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time: the launches below only queue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / calls * 1e6


def main(argv=None) -> int:
    sys.path[:0] = [REPO, HERE]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--rows", type=int, default=16384)
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import common
    from chronicals_compile.kernels import quack_gated_gemm
    from chronicals_compile.ops import gated_mlp as gm

    dev, dt = torch.device("cuda"), torch.bfloat16
    m, d, f = args.rows, 896, 4864
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, d, device=dev, dtype=dt, generator=g)
    wg, wu = (torch.randn(f, d, device=dev, dtype=dt, generator=g) * 0.03 for _ in range(2))
    wd = torch.randn(d, f, device=dev, dtype=dt, generator=g) * 0.03
    w1 = gm._interleave(wg, wu)
    no_w1 = wg.new_empty(0)  # the backward op interleaves again (the default: no kept weight)
    preact, h = quack_gated_gemm.gated_forward(x, w1, "swiglu")
    dy = torch.randn(m, d, device=dev, dtype=dt, generator=g)
    q = torch.randn(8, 14, m // 8, 64, device=dev, dtype=dt, generator=g)
    kv = torch.randn(8, 2, m // 8, 64, device=dev, dtype=dt, generator=g)
    def public(fn, *fn_args):
        """``fn`` timed with CHRONICALS_QUACK_LAUNCH=public (QuACK's own call each time)."""
        call = lambda: fn(*fn_args)  # noqa: E731
        call.public = True
        return call

    def timed(fn) -> float:
        if not getattr(fn, "public", False):
            return host_us(fn)
        os.environ["CHRONICALS_QUACK_LAUNCH"] = "public"
        try:
            return host_us(fn)
        finally:
            del os.environ["CHRONICALS_QUACK_LAUNCH"]

    rows = [
        ("torch.mm (cuBLAS, the down projection)", lambda: h @ wd.t()),
        ("torch.stack interleave of gate/up weights", lambda: gm._interleave(wg, wu)),
        ("quack_gated_gemm.unavailable_reason", lambda: quack_gated_gemm.unavailable_reason(dev, dt)),
        ("quack_gated_gemm.gated_forward (direct launch, the default)",
         lambda: quack_gated_gemm.gated_forward(x, w1, "swiglu")),
        ("quack_gated_gemm.gated_forward (QuACK's public call)", public(quack_gated_gemm.gated_forward, x, w1, "swiglu")),
        ("quack_gated_gemm.gated_backward (direct launch, the default)",
         lambda: quack_gated_gemm.gated_backward(dy, wd, preact, "swiglu")),
        ("quack_gated_gemm.gated_backward (QuACK's public call)",
         public(quack_gated_gemm.gated_backward, dy, wd, preact, "swiglu")),
        ("chronicals::gated_mlp forward (the op)", lambda: torch.ops.chronicals.gated_mlp(x, wg, wu, wd, "swiglu")),
        ("the op's body alone (no dispatcher)",
         lambda: gm.gated_mlp(x, wg, wu, wd, "swiglu")),
        ("chronicals::gated_mlp_backward (the op)",
         lambda: torch.ops.chronicals.gated_mlp_backward(dy, x, preact, wg, wu, wd, "swiglu", [True] * 4, no_w1)),
        ("SDPA cuDNN causal, enable_gqa (Qwen0.5B layer)",
         lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)),
    ]
    table = [{"call": name, "host us": round(timed(fn), 1)} for name, fn in rows]
    for r in table:
        print(f"host_overhead: {r['call']}: {r['host us']} us", flush=True)

    prof = cProfile.Profile()
    torch.cuda._sleep(2_000_000_000)
    prof.enable()
    for _ in range(100):
        quack_gated_gemm.gated_forward(x, w1, "swiglu")
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    env = common.environment("cuda")
    sections = [("", f"Command: `python benchmarks/bench_host_overhead.py {' '.join(sys.argv[1:])}`"),
                (f"Host time per call (mean of {CALLS}, GPU held busy by a sleep kernel)", common.markdown_table(table)),
                ("cProfile of 100 calls of gated_forward (by own time; 100 calls)", "```\n" + buf.getvalue() + "\n```")]
    path = common.write_markdown(os.path.join(args.out, "host_overhead.md"), "Host overhead per op", env, sections)
    print(buf.getvalue()[:6000])
    print(f"host_overhead: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
