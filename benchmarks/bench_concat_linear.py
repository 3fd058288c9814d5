"""Linears on one input, apart vs as one GEMM over concatenated weights (what the ``concat_linear``
pass builds), forward+backward, eager autograd, at a decoder layer's shapes. Why: the pass is off
by default until the GPU says it wins; this isolates the GEMMs (and the cat/split around them)
from the rest of the step.

    python benchmarks/bench_concat_linear.py [--tokens 16384] [--reps 50]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

#: (label, input width, [(out features, bias)], weights train)
GROUPS = [
    ("Qwen0.5B q/k/v (bias)", 896, [(896, True), (128, True), (128, True)], True),
    ("Qwen0.5B gate/up", 896, [(4864, False), (4864, False)], True),
    ("Qwen0.5B LoRA r=32 lora_A q/k/v", 896, [(32, False)] * 3, True),
    ("Qwen0.5B LoRA r=32 lora_A gate/up", 896, [(32, False)] * 2, True),
    ("Qwen0.5B frozen base q/k/v (LoRA)", 896, [(896, True), (128, True), (128, True)], False),
    ("Llama-8B q/k/v", 4096, [(4096, False), (1024, False), (1024, False)], True),
]


def _params(d, outs, trains, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    ws = [(torch.randn(o, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_(trains) for o, _ in outs]
    bs = [(torch.randn(o, generator=gen) * 0.02).to(device, dtype).requires_grad_(trains) if b else None
          for o, b in outs]
    return ws, bs


def _apart(x, ws, bs):
    return [F.linear(x, w, b) for w, b in zip(ws, bs)]


def _fused(x, ws, bs):
    b = torch.cat(bs) if bs[0] is not None else None
    return list(torch.split(F.linear(x, torch.cat(ws), b), [w.shape[0] for w in ws], dim=-1))


def _time(fn, x, ws, bs, grads, reps):
    leaves = [t for t in (x, *ws, *bs) if t is not None and t.requires_grad]

    def step():
        outs = fn(x, ws, bs)
        torch.autograd.backward(outs, grads)
        for t in leaves:
            t.grad = None

    return common.do_bench_ms(step, rep=reps)


def _check(x, ws, bs, grads):
    """The fused form's gradients against the separate form's (bf16: GEMM rounding apart)."""
    got, want = {}, {}
    for fn, store in ((_apart, want), (_fused, got)):
        leaves = [t for t in (x, *ws, *bs) if t is not None and t.requires_grad]
        torch.autograd.backward(fn(x, ws, bs), grads)
        for i, t in enumerate(leaves):
            store[i] = t.grad.float().clone()
            t.grad = None
    return max(((got[i] - want[i]).abs().max() / want[i].abs().max().clamp_min(1e-30)).item() for i in want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=50, help="milliseconds of timed runs (do_bench)")
    args = ap.parse_args()
    device, dtype = "cuda", torch.bfloat16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, bf16, "
          f"fwd+bwd median (triton do_bench, --reps ms of runs), eager autograd")
    print("| group | apart ms | one GEMM ms | speed-up | max rel grad diff |")
    print("|---|---|---|---|---|")
    for label, d, outs, trains in GROUPS:
        x = torch.randn(args.tokens, d, device=device, dtype=dtype).requires_grad_(True)
        ws, bs = _params(d, outs, trains, dtype, device)
        grads = [torch.randn(args.tokens, o, device=device, dtype=dtype) for o, _ in outs]
        apart = _time(_apart, x, ws, bs, grads, args.reps)
        fused = _time(_fused, x, ws, bs, grads, args.reps)
        print(f"| {label} | {apart:.3f} | {fused:.3f} | {apart / fused:.2f}x | {_check(x, ws, bs, grads):.1e} |")


if __name__ == "__main__":
    main()
