"""Runs every per-op microbenchmark (benchmarks/bench_<op>.py with a ``run``) in one process and
writes one markdown table and JSON: the single GPU call the device budget allows."""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))

OPS = ("rms_norm", "swiglu", "rope", "linear_cross_entropy")


def main() -> None:
    import torch

    from ceilings import measure
    from table import markdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", nargs="*", default=list(OPS))
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    ceil = measure()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = (f"date {datetime.date.today()}, commit {commit or 'unknown'}, {ceil['gpu']}, torch {torch.__version__}, "
              f"measured copy {ceil['copy_GB/s']} GB/s, bf16 matmul {ceil['bf16_matmul_TFLOP/s']} TFLOP/s")
    print(header, flush=True)
    sections = [f"# Microbenchmarks\n\n{header}\n\nCommand: `python benchmarks/gpu_micro.py`\n"]
    everything = {"header": header, "ceilings": ceil, "rows": []}
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
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "micro.md"), "w") as f:
        f.write("\n".join(sections))
    with open(os.path.join(args.out, "micro.json"), "w") as f:
        json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
