"""Runs every per-op microbenchmark (benchmarks/bench_<op>.py with a ``run``) in one process and
writes one markdown table and JSON: the single GPU call the device budget allows. Both files are
rewritten after every op, so a call cut short by its time limit still leaves what it measured.

The elementwise benches (rms_norm, swiglu, rope) report forward, backward and forward+backward per
variant, timed under CUDA graphs and with do_bench; ``PHASE_LEGEND`` (also written into micro.md)
says what each column means, ``common.measure_phases`` how it is measured."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))

OPS = ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy")

PHASE_LEGEND = """Elementwise ops (rms_norm, swiglu/geglu, rope): one row per shape, phase and variant.
phase: `fwd` and `bwd` call each implementation directly without autograd (ours: the Triton
launchers in chronicals_compile/kernels; eager and torch.compile: the reference forward and the
explicit backward formula, compiled separately by Inductor for torch.compile; Liger: its
Function's forward/backward on a stand-in context); `fwd+bwd` is one autograd step
(`torch.autograd.grad`; torch.compile: AOTAutograd's graphs; ours: the torch.ops.chronicals op).
MB: minimal traffic of the phase (each tensor read or written once). `cudagraph ms`:
triton.testing.do_bench_cudagraph median (launch overhead removed: kernel time); `do_bench ms`:
triton.testing.do_bench median (L2 flushed, host overhead shows where the host is the bottleneck).
GB/s = MB / ms; %copy = GB/s over the copy bandwidth measured above. speedup vs compile:
torch.compile's cudagraph time / this one's (>= 1: not slower than Inductor). err: max|diff| /
max|ref| against eager on one seeded set, same dtype (bf16 rounding ~1e-2, a bug ~1). sets: input
sets rotated through so that no call reads data left in L2 (>= 4x L2 between reuses)."""


def main() -> None:
    import torch

    from ceilings import measure
    from table import markdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", nargs="*", default=list(OPS))
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    ceil = measure()
    from common import git_commit

    commit = git_commit()  # $CHRONICALS_COMMIT first: a device copy's git (if any) is not ours
    header = (f"date {datetime.date.today()}, commit {commit}, {ceil['gpu']}, torch {torch.__version__}, "
              f"measured copy {ceil['copy_GB/s']} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOP/s']} TFLOP/s")
    print(header, flush=True)
    command = "python benchmarks/gpu_micro.py" + (f" --ops {' '.join(args.ops)}" if args.ops != list(OPS) else "")
    sections = [f"# Microbenchmarks\n\n{header}\n\nCommand: `{command}`\n\n{PHASE_LEGEND}\n"]
    everything = {"header": header, "ceilings": ceil, "legend": PHASE_LEGEND, "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for op in args.ops:
        try:
            module = importlib.import_module(f"bench_{op}")
            kwargs = {"copy_gbps": ceil["copy_GB/s"]} if "copy_gbps" in module.run.__code__.co_varnames else {}
            rows = module.run(device="cuda", **kwargs)
        except Exception:  # noqa: BLE001 - one broken bench must not hide the others
            rows = [{"op": op, "error": traceback.format_exc().splitlines()[-1][:160]}]
        torch.cuda.empty_cache()
        table = markdown(rows)
        print(f"\n## {op}\n{table}", flush=True)
        sections.append(f"## {op}\n\n{table}\n")
        everything["rows"] += rows
        with open(os.path.join(args.out, "micro.md"), "w") as f:
            f.write("\n".join(sections))
        with open(os.path.join(args.out, "micro.json"), "w") as f:
            json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
