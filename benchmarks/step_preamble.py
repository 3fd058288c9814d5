"""Host time from a compiled training step's call to its first compiled graph: Inductor vs ours.

Why: the end-to-end benchmark syncs after every step (HF ``Trainer`` does too: its NaN filter reads
the loss), so the GPU idles while the host runs Dynamo's guards and the AOTAutograd wrappers
before the forward's first kernel. Session 19's CUDA-only trace (H100) shows that hole at the step
boundary: 1.5 ms (Inductor) and 1.7 ms (ours) a step, median holes of 2.2-2.6 ms, the
largest single idle of the step. This measures the host part of it on whatever CPU runs it, and
how much of it is guard evaluation, so a backend change that lengthens it shows up.

Every variant runs in its own process (two compiled copies of one model class in one process would
each evaluate the other's guards first). The model has Qwen2.5-0.5B's 24 layers at tiny widths: what
the preamble costs depends on the number of modules and parameters, not on their sizes. Per step:
``to graph`` is the time from ``model(...)`` to the entry of Inductor's compiled forward
(``CompiledFxGraph.__call__``); ``without guards`` the same under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, for this measurement only (never a
setting to train with); ``guard managers`` is the count in Dynamo's guard tree (``TORCH_LOGS=guards``).

    python benchmarks/step_preamble.py [--device cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

TAG = "PREAMBLE_RESULT "
VARIANTS = ("inductor", "chronicals")


def _build(variant: str, device: str, layers: int):
    import torch

    from chronicals_compile.cli import presets

    preset = presets.Preset("qwen2", hidden=64, layers=layers, heads=4, kv_heads=2, intermediate=128, vocab=None)
    model = presets.build_model(preset, 512, device=device, seed=0)
    model.train()
    if variant == "inductor":
        model.compile()
    else:
        import chronicals_compile

        chronicals_compile.compile(model)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    return model, ids


def worker(variant: str, device: str, reps: int, layers: int = 24) -> dict:
    from torch._inductor import output_code

    entered: list[float] = []
    original = output_code.CompiledFxGraph.__call__

    def stamped(self, inputs):
        entered.append(time.perf_counter())
        return original(self, inputs)

    output_code.CompiledFxGraph.__call__ = stamped
    try:
        return _timed(variant, device, reps, layers, entered)
    finally:
        output_code.CompiledFxGraph.__call__ = original


def _timed(variant: str, device: str, reps: int, layers: int, entered: list[float]) -> dict:
    import torch

    model, ids = _build(variant, device, layers)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> tuple[float, float]:
        entered.clear()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        forward = time.perf_counter() - t0
        loss.backward()
        for p in params:
            p.grad = None
        return (entered[0] - t0) * 1e3, forward * 1e3

    for _ in range(3):
        step()
    guarded, unguarded = [], []
    for _ in range(reps):  # interleaved, so drift hits both alike
        guarded.append(step())
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            unguarded.append(step())

    def med(values):
        values = sorted(values)
        return values[len(values) // 2]

    return {"variant": variant, "to_graph_ms": med(g[0] for g in guarded),
            "to_graph_without_guards_ms": med(u[0] for u in unguarded),
            "forward_host_ms": med(g[1] for g in guarded)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", default=None, help="write step_preamble.md/.json here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(TAG + json.dumps(worker(args.worker, args.device, args.reps)), flush=True)
        return 0

    import common

    rows = []
    for variant in VARIANTS:
        # TORCH_LOGS=guards prints the guard tree once, at compile time, before any timed step
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--device", args.device,
                              "--reps", str(args.reps)], capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "TORCH_LOGS": "guards"})
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith(TAG)), None)
        if line is None:
            rows.append({"variant": variant, "status": (out.stderr.strip().splitlines() or ["no output"])[-1]})
            continue
        row = json.loads(line[len(TAG):])
        row["guard_ms"] = row["to_graph_ms"] - row["to_graph_without_guards_ms"]
        row["guard_managers"] = (out.stdout + out.stderr).count("GuardManager")
        rows.append(row)
    table = common.markdown_table(rows, ["variant", "to_graph_ms", "to_graph_without_guards_ms", "guard_ms",
                                         "guard_managers", "forward_host_ms"])
    print(table)
    if args.out:
        env = common.environment(args.device)
        command = "python benchmarks/step_preamble.py " + " ".join(sys.argv[1:])
        common.write_markdown(os.path.join(args.out, "step_preamble.md"), "Host time before the first compiled graph",
                              {**env, "command": command}, [("Per step (median)", table)])
        common.write_json(os.path.join(args.out, "step_preamble.json"), {"environment": env, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
