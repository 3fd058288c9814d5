"""Where the compiled forward's host time goes: cProfile of the training forward, Inductor vs ours.

Why: session 19's phase table (results/2026-12-06-h100-session19/call1) has our forward's host
return at 23.9 ms against Inductor's 12.8, level with the GPU's layer work (~26 ms), so the GPU
waits on the host in about half the forward layers (the idle before QuACK's GEMM: median 1.2 us,
largest 344 us). The op-by-op host bench (bench_host_overhead.py) finds only ~30 us a layer more
for the MLP op: this ranks every Python frame of the real forward to find the rest.

    python benchmarks/bench_forward_host.py [--variants inductor,chronicals]   # CUDA only
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


def profile_forward(variant: str, batch: int, seq: int, top: int) -> str:
    import torch

    from chronicals_compile.cli import presets

    preset = presets.PRESETS["qwen2.5-0.5b"]
    model = presets.build_model(preset, preset.vocab, dtype=torch.bfloat16, device="cuda", seed=0)
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if variant == "inductor":
        model.compile()
    else:
        import chronicals_compile

        chronicals_compile.compile(model)
    ids = torch.randint(0, preset.vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to("cuda")

    def step(prof: cProfile.Profile | None = None) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        loss = model(input_ids=ids, labels=ids).loss
        if prof:
            prof.disable()
        forward_host = (time.perf_counter() - t0) * 1e3
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return forward_host

    for _ in range(3):
        step()
    plain = sorted(step() for _ in range(5))[2]
    prof = cProfile.Profile()
    for _ in range(3):
        step(prof)
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    out.write(f"### {variant}: forward host {plain:.2f} ms (median of 5, unprofiled); cProfile of 3 forwards\n\n```\n")
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    out.write("```\n")
    del model, optimizer
    torch.cuda.empty_cache()
    return out.getvalue()


def main(argv=None) -> int:
    sys.path[:0] = [REPO, HERE]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="inductor,chronicals")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = p.parse_args(argv)
    import common

    sections = [("", f"Command: `python benchmarks/bench_forward_host.py {' '.join(sys.argv[1:])}`")]
    for variant in args.variants.split(","):
        text = profile_forward(variant, args.batch, args.seq, args.top)
        print(text, flush=True)
        sections.append((f"{variant}", text))
    path = common.write_markdown(os.path.join(args.out, "forward_host.md"), "Forward host time by Python frame",
                                 common.environment("cuda"), sections)
    print(f"forward_host: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
