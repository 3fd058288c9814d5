"""``chronicals::lora_linear`` against peft's three GEMMs and an add, forward+backward, eager, at
LoRA projection shapes (bf16, adapter r=32, base frozen). Why: the ``lora_linear`` pass is off by
default until the GPU says it wins; this isolates the projection from the step. Eager adds the
base and adapter outputs in a kernel of their own, where Inductor folds the add into the next
pointwise kernel: the step (``e2e.py`` variant chronicals-lora-linear) is the verdict.

    python benchmarks/bench_lora_linear.py [--tokens 16384] [--reps 50]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import chronicals_compile.ops  # noqa: E402,F401 - registers torch.ops.chronicals.*
from chronicals_compile.ops.lora_linear import lora_linear_reference  # noqa: E402

#: (label, in, out, r)
SHAPES = [("Qwen0.5B gate/up", 896, 4864, 32), ("Qwen0.5B q (narrow)", 896, 896, 32),
          ("Llama-8B gate/up", 4096, 14336, 16)]


def _time(fn, leaves, grad, reps):
    def step():
        fn(*leaves).backward(grad)
        for t in leaves:
            if t is not None:
                t.grad = None

    return common.do_bench_ms(step, rep=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=50, help="milliseconds of timed runs (do_bench)")
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, bf16, "
          f"frozen base, fwd+bwd median (triton do_bench, --reps ms of runs), eager")
    print("| projection | peft (3 GEMMs + add) ms | lora_linear ms | speed-up | peak MiB peft / ours |")
    print("|---|---|---|---|---|")
    for label, width, out, r in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(args.tokens, width, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
        w = (torch.randn(out, width, device=dev, generator=gen) * width ** -0.5).to(dtype)
        a = (torch.randn(r, width, device=dev, generator=gen) * width ** -0.5).to(dtype).requires_grad_(True)
        b = (torch.randn(out, r, device=dev, generator=gen) * 0.02).to(dtype).requires_grad_(True)
        grad = torch.randn(args.tokens, out, device=dev, dtype=dtype, generator=gen)
        leaves = [x, w, None, a, b]
        row = []
        for fn in (lambda *t: lora_linear_reference(*t, 2.0),
                   lambda *t: torch.ops.chronicals.lora_linear(*t, 2.0)[0]):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            row.append((_time(fn, leaves, grad, args.reps), (torch.cuda.max_memory_allocated() - base) / 2**20))
        (peft_ms, peft_mib), (ours_ms, ours_mib) = row
        print(f"| {label} ({width} -> {out}, r={r}) | {peft_ms:.3f} | {ours_ms:.3f} | {peft_ms / ours_ms:.2f}x | "
              f"{peft_mib:.0f} / {ours_mib:.0f} |")


if __name__ == "__main__":
    main()
