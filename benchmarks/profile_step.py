"""Where a training step's time goes, kernel by kernel (issue 7): plain Inductor vs chronicals.

Before optimising anything, measure: each variant runs in its own subprocess, builds the
Qwen2.5-0.5B-shaped model (random weights, bf16, tied embeddings, sdpa) and random tokens (8 x
2048), runs the same step as ``benchmarks/e2e.py`` (forward with labels, backward,
``clip_grad_norm_(1.0)``, fused AdamW, ``zero_grad``), ``--warmup`` steps untimed (compilation),
``--timed-steps`` timed without the profiler (the true wall step), then ``--steps`` under
``torch.profiler`` (CPU and CUDA activity, after one profiler warm-up step, so CUPTI start-up is
not counted). Every kernel of the trace is put in one category by its name (first rule that
matches, ``RULES``), and reported per step:

* ms and kernel count per category; the 15 kernels that take longest (80 in the JSON);
* GPU busy = the union of kernel intervals (all streams); gap = wall - busy: time the GPU waits
  on the host (Python, launches, the per-step synchronize, as in e2e.py);
* kernel time and TFLOP/s per GEMM call shape (``aten::mm``/``addmm``/``bmm``/``baddbmm`` and the
  kernels they launched): which matmuls run below the tensor-core rate. Shapes need
  ``record_shapes``, which adds host time to the profiled steps (from session 8 on): compare the
  profiled wall and gap within one session only; the unprofiled wall is unaffected.

Caveats: the loss category holds the CE-specific kernels only; the lm_head logits matmul (ours
uses cuBLAS for it by default) is counted under matmul. Inductor names kernels after the aten ops
they fuse (``triton_red_fused__log_softmax_...``), so the names decide, which is a heuristic.

    python benchmarks/profile_step.py                          # GPU: inductor, chronicals, chronicals-all
    python benchmarks/profile_step.py --device cpu --tiny      # CPU smoke run: CPU ops, tiny model

``--device cpu`` profiles CPU ops instead (self time, nesting removed) and, unless ``--compiler``
says otherwise, compiles with aot_eager: a smoke test of the pipeline, not a measurement.
Outputs ``<name>.md`` and ``<name>.json`` under ``--out`` (default ``$OUT``, else
``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

VARIANTS = ("eager", "inductor", "chronicals", "chronicals-all")
DEFAULT_VARIANTS = "inductor,chronicals,chronicals-all"
ALL_SWAPS = ["rms_norm", "add_rms_norm", "swiglu", "rope"]  # the off-by-default patterns (config.*OFF_BY_DEFAULT)
#: (category, regex on the lower-cased kernel or op name); order matters: flash attention's
#: template arguments mention cutlass, Inductor's names mention the aten ops they fuse.
RULES = [
    ("loss", r"_cce_|_ce_rows|linear_cross_entropy|cross_entropy|log_softmax|nll_loss"),
    ("ours_fused", r"_rms_norm|_gated_(fwd|bwd)|_swiglu|_geglu|_rope|chronicals::"),
    ("attention", r"flash|fmha|cudnn|sdpa|scaled_dot_product|efficient_attention|attention|varlen"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|gemv|splitkreduce|triton_tem_|aten::(mm|addmm|bmm|baddbmm|matmul)\b"),
    ("optimizer", r"multi_tensor|fused_adam|adamw?\b|_foreach|lpnorm"),
    ("inductor_triton", r"^triton_|triton_(poi|red|per)_"),
    ("copy_memset", r"memcpy|memset|copy|fill|clone|aten::zero_|aten::to\b|cat_?array"),
]
CATEGORIES = [c for c, _ in RULES] + ["other"]
_COMPILED = [(c, re.compile(r)) for c, r in RULES]
RESULT_TAG = "PROFILE_RESULT "
TOP = 15
#: kernels kept in the JSON (every kernel above 0.05 ms/step at these shapes): enough to tell which
#: ops Inductor fused together, e.g. whether a residual add lives in the norm's kernel.
TOP_JSON = 80


def classify(name: str) -> str:
    low = name.lower()
    for category, rx in _COMPILED:
        if rx.search(low):
            return category
    return "other"


# =========================================================================== trace analysis

def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def idle_by_neighbours(kernels: list[dict], steps: int, top: int = TOP) -> dict:
    """GPU idle time between busy stretches, summed by the kernels on either side of each hole.

    Why: ``gap`` says how long the GPU waits, not where; a hole after one kernel kind in every
    layer (a host-side launch that costs more than the GPU work it follows) shows up here as one
    pair with ~layers x steps holes. The profiler inflates host time, so read the pairs' shares,
    not their absolute ms, against the unprofiled gap. Each pair's median and largest hole say
    whether its time is spread over every layer (median near the mean) or sits in a few holes
    (one large hole a step, e.g. where the host is level with the GPU at the step's start).
    ``launched`` (a kernel's launch call's timestamp, where the trace has it) gives each pair's
    median launch-to-start lag: a few us means the host launched the kernel only as the GPU ran
    dry (the host is late); a lag far longer than the hole means the kernel sat queued and the
    GPU waited on something else.
    """
    spans = sorted((k["ts"], k["ts"] + k["dur"], k["name"], k.get("launched")) for k in kernels)
    holes: dict[tuple[str, str], list[float]] = {}
    lags: dict[tuple[str, str], list[float]] = {}
    end, last = None, None
    for s, e, name, launched in spans:
        if end is not None and s > end:
            key = (last[:70], name[:70])
            holes.setdefault(key, []).append(s - end)
            if launched is not None:
                lags.setdefault(key, []).append(s - launched)
        if end is None or e > end:
            end, last = e, name
    total = sum(sum(v) for v in holes.values())
    # the per-step synchronize leaves one hole between steps: listed like any other pair
    rows = [{"before": b, "after": a, "ms": sum(gaps) / 1e3 / steps, "holes": len(gaps) / steps,
             "median_us": statistics.median(gaps), "max_us": max(gaps),
             "launch_lag_us": statistics.median(lags[(b, a)]) if lags.get((b, a)) else None}
            for (b, a), gaps in sorted(holes.items(), key=lambda kv: -sum(kv[1]))[:top]]
    return {"idle_ms": total / 1e3 / steps, "holes": sum(len(v) for v in holes.values()) / steps, "pairs": rows}


def _cpu_self_times(ops: list[dict]) -> list[dict]:
    """CPU ops nest (aten::linear -> aten::addmm); keep each op's own time so nothing counts twice."""
    out = []
    by_thread: dict = {}
    for ev in ops:
        by_thread.setdefault((ev.get("pid"), ev.get("tid")), []).append(ev)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for ev in evs:
            item = {"name": ev["name"], "ts": ev["ts"], "dur": ev["dur"], "self": ev["dur"], "top": False}
            while stack and ev["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
                stack.pop()
            if stack:
                stack[-1]["self"] -= ev["dur"]
            else:
                item["top"] = True
            stack.append(item)
            out.append(item)
    return out


def host_ops(events: list[dict], steps: int, top: int = TOP) -> dict:
    """Host time by CPU op and annotation (Inductor's ``## Call CompiledFxGraph ##``, Dynamo's cache
    lookup, custom ops), inclusive and self, per step: which Python/C++ frames keep the host busy.
    Profiled (the profiler's own cost is in it): compare rows, not against the unprofiled wall."""
    ops = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]), "pid": e.get("pid"),
            "tid": e.get("tid")} for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    agg: dict[str, list] = {}
    for item in _cpu_self_times(ops):
        row = agg.setdefault(item["name"][:90], [0.0, 0.0, 0])
        row[0] += item["dur"]
        row[1] += item["self"]
        row[2] += 1
    rows = [{"op": n, "calls": c / steps, "inclusive_ms": inc / 1e3 / steps, "self_ms": own / 1e3 / steps}
            for n, (inc, own, c) in agg.items()]
    return {"by_inclusive": sorted(rows, key=lambda r: -r["inclusive_ms"])[:top],
            "by_self": sorted(rows, key=lambda r: -r["self_ms"])[:top]}


#: GEMM ops whose kernels the shape table attributes. M, N, K (and a batch) come from the profiler's
#: "Input Dims" (record_shapes): the first two matrices, after the added input of addmm/baddbmm
#: (an ``out=`` tensor comes after them).
_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
TOP_GEMMS = 20


def _gemm_flop(op: str, dims: list) -> float | None:
    operands = dims[1:] if op in ("aten::addmm", "aten::baddbmm") else dims
    mats = [d for d in operands if isinstance(d, list) and len(d) in (2, 3)]
    if len(mats) < 2:
        return None
    a, b = mats[0], mats[1]
    batch = a[0] if len(a) == 3 else 1
    m, k, n = a[-2], a[-1], b[-1]
    return 2.0 * batch * m * n * k


def gemm_shapes(events: list[dict], steps: int) -> list[dict]:
    """Kernel time per GEMM call shape: which matmuls run below the tensor-core rate. A kernel
    belongs to the CPU op whose "External id" it carries (directly, or through its launch call's
    correlation id); cuBLAS split-K reduction kernels count with their GEMM."""
    ops = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "cpu_op" and e["name"] in _GEMM_OPS and "External id" in args:
            ops[args["External id"]] = (e["name"], args.get("Input Dims") or [])
    launch_ext = {(e.get("args") or {}).get("correlation"): (e.get("args") or {}).get("External id")
                  for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    agg: dict[tuple, dict] = {}
    for e in events:
        if e.get("cat") != "kernel":
            continue
        args = e.get("args") or {}
        ext = args.get("External id")
        if ext not in ops:
            ext = launch_ext.get(args.get("correlation"))
        if ext not in ops:
            continue
        op, dims = ops[ext]
        key = (op, json.dumps(dims))
        row = agg.setdefault(key, {"op": op, "dims": dims, "us": 0.0, "ext": set()})
        row["us"] += float(e["dur"])
        row["ext"].add(ext)
    rows = []
    for row in agg.values():
        flop = _gemm_flop(row["op"], row["dims"])
        calls = len(row["ext"])
        rows.append({"op": row["op"], "dims": row["dims"], "ms": row["us"] / 1e3 / steps, "calls": calls / steps,
                     "tflops": flop * calls / (row["us"] * 1e-6) / 1e12 if flop and row["us"] else None})
    return sorted(rows, key=lambda r: -r["ms"])[:TOP_GEMMS]


def analyse_trace(trace: dict, steps: int, device: str) -> dict:
    """Per-step category totals, busy time, launches and the top kernels of a chrome trace."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if device.startswith("cuda"):
        kernels = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]), "self": float(e["dur"])}
                   for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        busy = _union_us([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
        launch = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and "aunch" in e["name"]]
    else:
        ops = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]), "pid": e.get("pid"),
                "tid": e.get("tid")} for e in events if e.get("cat") == "cpu_op"]
        kernels = _cpu_self_times(ops)
        busy = _union_us([(k["ts"], k["ts"] + k["dur"]) for k in kernels if k["top"]])
        launch = []
    cats = {c: {"ms": 0.0, "count": 0} for c in CATEGORIES}
    by_name: dict[str, list] = {}
    for k in kernels:
        c = classify(k["name"])
        cats[c]["ms"] += k["self"] / 1e3 / steps
        cats[c]["count"] += 1
        agg = by_name.setdefault(k["name"], [0.0, 0, c])
        agg[0] += k["self"] / 1e3 / steps
        agg[1] += 1
    for c in cats.values():
        c["count"] = c["count"] / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP_JSON]
    return {
        "categories": cats,
        "kernel_ms": sum(c["ms"] for c in cats.values()),
        "busy_ms": busy / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "launch_calls_per_step": len(launch) / steps if launch else None,
        "launch_api_ms": sum(float(e["dur"]) for e in launch) / 1e3 / steps if launch else None,
        "top": [{"name": n[:300], "category": c, "ms": ms, "calls": calls / steps} for n, (ms, calls, c) in top],
        "gemms": gemm_shapes(events, steps) if device.startswith("cuda") else [],
        "idle": idle_by_neighbours(kernels, steps) if device.startswith("cuda") else None,
        "host": host_ops(events, steps) if device.startswith("cuda") else None,
    }


# =========================================================================== worker

def worker(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity

    from chronicals_compile.cli import presets

    if not spec["device"].startswith("cuda"):
        torch.set_num_threads(1)  # a smoke run: no OpenMP oversubscription on a shared small CPU
    device, variant, compiler = spec["device"], spec["variant"], spec["compiler"]
    on_gpu = device.startswith("cuda")
    preset = presets.PRESETS[spec["preset"]]
    vocab = preset.vocab or spec["tiny_vocab"]
    model = presets.build_model(preset, vocab, dtype=getattr(torch, spec["dtype"]), device=device, seed=0)
    model.config.use_cache = False
    if spec.get("lora_r"):  # the same adapters as e2e.py's LoRA mode
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=spec["lora_adapter_dtype"] == "fp32")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=on_gpu or None)
    if variant == "inductor":
        model.compile(**({} if compiler == "inductor" else {"backend": compiler}))
    elif variant.startswith("chronicals"):
        import chronicals_compile

        options = {} if compiler == "inductor" else {"compiler": compiler}
        if variant == "chronicals-all":
            options["enable"] = ALL_SWAPS
        chronicals_compile.compile(model, **options)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen).to(device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    phases: list[dict] = []

    def step(record: bool = False) -> float:
        """One step; with ``record``, when the host returned from each phase and when the GPU
        finished it (CUDA events), both from the step's start: a phase whose host return comes
        after the GPU finished the previous one leaves the GPU waiting on Python/launches."""
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if record and on_gpu else None
        sync()
        t0 = time.perf_counter()
        if events:
            events[0].record()
        host = []
        loss = model(input_ids=ids, labels=ids).loss
        host.append(time.perf_counter())
        if events:
            events[1].record()
        loss.backward()
        host.append(time.perf_counter())
        if events:
            events[2].record()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        host.append(time.perf_counter())
        if events:
            events[3].record()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
        if events:
            gpu = [events[0].elapsed_time(e) for e in events[1:]]
            phases.append({name: {"host_return_ms": (h - t0) * 1e3, "gpu_done_ms": g}
                           for name, h, g in zip(("forward", "backward", "optimizer"), host, gpu)})
        return wall

    from gpu_clocks import ClockSampler

    # Why clocks per run: a power-capped chip clocks higher when a slowed (profiled) host leaves it
    # idle, so a profiled trace's busy time can be shorter than the unprofiled step's kernels take.
    def sampled(name: str, run):
        sampler = ClockSampler(torch.cuda.current_device() if on_gpu else 0, period_ms=20)
        sampler.start()
        try:
            return run()
        finally:
            sampler.stop()
            clocks[name] = sampler.summary()

    clocks: dict[str, dict] = {}
    t0 = time.perf_counter()
    first = [step() for _ in range(spec["warmup"])]
    compile_s = time.perf_counter() - t0
    wall = sampled("unprofiled", lambda: [step(record=True) for _ in range(spec["timed_steps"])])
    # CPU ops too on the GPU: the common, well-trodden configuration; kernel times are unaffected
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    keep_as = os.path.join(spec["trace_dir"], f"trace-{variant}.json") if spec.get("trace_dir") else None
    trace, profiled = sampled("profiled", lambda: _traced_steps(step, spec["steps"], activities,
                                                               record_shapes=True, keep_as=keep_as))
    res = analyse_trace(trace, spec["steps"], device)
    if on_gpu:
        res["idle_gpu_only"] = sampled("cuda_only", lambda: _gpu_only_idle(step, spec["steps"]))
    res["clocks"] = clocks
    if not res["kernels_per_step"]:
        raise RuntimeError("the profiler trace holds no kernel events (CUPTI unavailable?)")
    wall_ms = statistics.median(wall) if wall else statistics.median(profiled)
    res.update({"variant": variant, "status": "ok", "compiler": "-" if variant == "eager" else compiler,
                "wall_ms": wall_ms,
                "wall_profiled_ms": statistics.mean(profiled), "gap_ms": wall_ms - res["busy_ms"],
                "gap_profiled_ms": statistics.mean(profiled) - res["busy_ms"],
                "warmup_s": compile_s, "first_step_ms": first[0] if first else None,
                "phases": {name: {key: statistics.median(p[name][key] for p in phases) for key in phases[0][name]}
                           for name in phases[0]} if phases else None})
    if variant.startswith("chronicals"):
        from torch._dynamo.utils import counters

        res["swaps"] = {k: v for k, v in counters["chronicals"].items() if not k.endswith("_fallback")}
    return res


def _traced_steps(step, steps: int, activities, record_shapes: bool = False,
                  keep_as: str | None = None) -> tuple[dict, list[float]]:
    """The Chrome trace of ``steps`` steps after one warm-up step, and each traced step's wall ms;
    ``keep_as``: where the trace file is kept."""
    from torch.profiler import profile, schedule

    walls = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        # The trace is exported when the active window closes (after that the profiler clears it).
        with profile(activities=activities, record_shapes=record_shapes,
                     schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                     on_trace_ready=lambda p: p.export_chrome_trace(path)) as prof:
            for i in range(steps + 1):
                ms = step()
                if i:
                    walls.append(ms)
                prof.step()
        with open(path) as f:
            trace = json.load(f)
        if keep_as:
            os.makedirs(os.path.dirname(keep_as), exist_ok=True)
            shutil.move(path, keep_as)
    return trace, walls


def _gpu_only_idle(step, steps: int) -> dict:
    """Idle by neighbouring kernels from a trace of CUDA activity alone.

    Why: recording every CPU op slows the host several-fold (the profiled gap is 2-3x the real
    one), so the full trace's holes show where a slowed host falls behind, not where the real
    step waits. Kernel records alone cost the host little, so these holes are close to the
    unprofiled step's.
    """
    from torch.profiler import ProfilerActivity

    trace, walls = _traced_steps(step, steps, [ProfilerActivity.CUDA])
    return gpu_only_idle(trace, steps, statistics.mean(walls))


def gpu_only_idle(trace: dict, steps: int, wall_ms: float) -> dict:
    """``idle_by_neighbours`` of a CUDA-activity trace, with its busy time and the steps' wall."""
    events = trace.get("traceEvents", [])
    launches = {(e.get("args") or {}).get("correlation"): float(e["ts"]) for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")}
    launches.pop(None, None)
    kernels = [{"name": e["name"], "ts": float(e["ts"]), "dur": float(e["dur"]),
                "launched": launches.get((e.get("args") or {}).get("correlation"))}
               for e in events if e.get("ph") == "X" and "dur" in e
               and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    busy = _union_us([(k["ts"], k["ts"] + k["dur"]) for k in kernels]) / 1e3 / steps
    # a library launching on a stream of its own (not torch's current one) shows as a second stream
    streams: dict[str, float] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            key = str((e.get("args") or {}).get("stream", e.get("tid")))
            streams[key] = streams.get(key, 0) + 1 / steps
    return {**idle_by_neighbours(kernels, steps), "wall_ms": wall_ms, "busy_ms": busy, "kernels_by_stream": streams}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        result = worker(spec)
    except Exception as err:  # noqa: BLE001 - recorded in the table, not raised
        traceback.print_exc()
        oom = "out of memory" in str(err).lower()
        result = {"variant": spec["variant"], "status": "OOM" if oom else f"error: {str(err).splitlines()[0][:200]}"}
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


_CHILD: list = []


def _on_term(signum, frame):
    """``timeout`` in gpu_session.sh signals only us; the worker has its own session: end it too,
    or it would keep the GPU busy under the next section."""
    for proc in _CHILD:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(124)


def run_variant(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _CHILD[:] = [proc]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"variant": spec["variant"], "status": f"timeout ({timeout:.0f} s)"}
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            if result["status"] != "ok" and err.strip():
                result["stderr_tail"] = err.strip().splitlines()[-12:]
            return result
    tail = (err.strip().splitlines() or ["(no output)"])[-1]
    return {"variant": spec["variant"], "status": f"crashed (exit {proc.returncode}): {tail[:200]}"}


# =========================================================================== report

def _na(value):
    return "n/a" if value is None else value


def _idle_row(pair: dict) -> dict:
    return {"kernel before": pair["before"], "kernel after": pair["after"], "idle ms/step": pair["ms"],
            "holes/step": pair["holes"], "median hole us": _na(pair.get("median_us")),
            "largest hole us": _na(pair.get("max_us")), "launch-to-start us": _na(pair.get("launch_lag_us"))}


def render(results: list[dict]) -> list[tuple[str, str]]:
    from common import markdown_table

    ok = [r for r in results if r["status"] == "ok"]
    summary = [{"variant": r["variant"], "status": r["status"],
                **({"compiler": r["compiler"], "wall ms": r["wall_ms"], "profiled wall ms": r["wall_profiled_ms"],
                    "busy ms": r["busy_ms"],
                    "gap ms": r["gap_ms"], "gap %": f"{r['gap_ms'] / r['wall_ms']:.1%}",
                    "profiled gap ms": r["gap_profiled_ms"], "launch API calls/step": _na(r["launch_calls_per_step"]),
                    "kernels/step": r["kernels_per_step"], "warm-up s": r["warmup_s"]} if r["status"] == "ok" else {})}
               for r in results]
    per_cat = []
    for c in CATEGORIES:
        row = {"category": c}
        for r in ok:
            cat = r["categories"][c]
            row[r["variant"]] = f"{cat['ms']:.2f} ({cat['ms'] / max(r['kernel_ms'], 1e-9):.0%}, {cat['count']:.0f})"
        per_cat.append(row)
    sections = [("Step", markdown_table(summary)),
                ("ms per step by category (share of kernel time, kernels per step)", markdown_table(per_cat))]
    for r in ok:
        rows = [{"kernel": t["name"][:110], "category": t["category"], "ms/step": t["ms"], "calls/step": t["calls"]}
                for t in r["top"][:TOP]]
        sections.append((f"Top {TOP} kernels: {r['variant']}", markdown_table(rows)))
    phase_rows = [{"variant": r["variant"], **{f"{name} {key.replace('_ms', '')} ms": v[key]
                                               for name, v in r["phases"].items() for key in v}}
                  for r in ok if r.get("phases")]
    clock_rows = [{"variant": r["variant"], "run": run, "SM MHz": round(c["sm_mhz"]), "W": round(c["power_w"]),
                   "samples": c["clock_samples"]}
                  for r in ok for run, c in (r.get("clocks") or {}).items() if c]
    if clock_rows:
        sections.append(("Clocks by run (nvidia-smi every 20 ms: the unprofiled timed steps, the full profile, "
                         "the CUDA-only trace)", markdown_table(clock_rows)))
    if phase_rows:
        sections.append(("Host against GPU by phase (unprofiled steps, median, ms from the step's start: "
                         "the host returned from the phase / the GPU finished it)", markdown_table(phase_rows)))
    for r in ok:
        if r.get("idle"):
            rows = [_idle_row(p) for p in r["idle"]["pairs"]]
            sections.append((f"GPU idle by neighbouring kernels: {r['variant']} (profiled: "
                             f"{r['idle']['idle_ms']:.2f} ms in {r['idle']['holes']:.0f} holes a step)",
                             markdown_table(rows)))
    for r in ok:
        idle = r.get("idle_gpu_only")
        if idle:
            rows = [_idle_row(p) for p in idle["pairs"]]
            sections.append((f"GPU idle by neighbouring kernels, CUDA-only trace: {r['variant']} "
                             f"(wall {idle['wall_ms']:.1f} ms, busy {idle['busy_ms']:.1f}: "
                             f"{idle['idle_ms']:.2f} ms in {idle['holes']:.0f} holes a step; kernels a step by "
                             f"stream: {json.dumps(idle.get('kernels_by_stream', {}))})", markdown_table(rows)))
    for r in ok:
        for key, label in (("by_inclusive", "inclusive"), ("by_self", "self")):
            if r.get("host"):
                rows = [{"host op": h["op"], "calls/step": h["calls"], "inclusive ms": h["inclusive_ms"],
                         "self ms": h["self_ms"]} for h in r["host"][key]]
                sections.append((f"Host time by op, top by {label} time: {r['variant']} (profiled)",
                                 markdown_table(rows)))
    for r in ok:
        if r.get("gemms"):
            rows = [{"op": g["op"], "input dims": json.dumps(g["dims"]), "ms/step": g["ms"], "calls/step": g["calls"],
                     "TFLOP/s": _na(g["tflops"] and round(g["tflops"]))} for g in r["gemms"]]
            sections.append((f"GEMMs by shape: {r['variant']} (kernel time per op shape, split-K reductions "
                             "included)", markdown_table(rows)))
    return sections


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny preset, 2 x 64 tokens: a smoke run")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, compilation (default 3; 2 with --tiny)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="steps timed without the profiler: the wall step (default 5; 2 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="profiled steps (default 3; 2 with --tiny)")
    p.add_argument("--compiler", default=None, choices=("inductor", "aot_eager", "eager"),
                   help="what compiles the compiled variants (default: inductor; aot_eager on CPU)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    p.add_argument("--lora-r", type=int, default=None, help="profile LoRA of this rank on all linear projections")
    p.add_argument("--lora-adapter-dtype", default="fp32", choices=("fp32", "model"),
                   help="LoRA A/B weights: fp32 (peft's default for bf16 models) or the model's dtype")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default profile-<date>-<gpu>)")
    p.add_argument("--commit", default=None, help="commit to record (trees without .git); also $CHRONICALS_COMMIT")
    p.add_argument("--trace-dir", default=None, help="keep each variant's chrome trace here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def main(argv=None) -> int:
    for path in (HERE, REPO):  # here, not at import: tests import this module for its parsers
        if path not in sys.path:
            sys.path.insert(0, path)
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    import torch

    import common

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        print(f"profile_step: error: unknown variant(s) {bad}; known: {list(VARIANTS)}", file=sys.stderr)
        return 2
    if args.commit:
        os.environ["CHRONICALS_COMMIT"] = args.commit
    spec = {"device": device, "preset": "tiny" if args.tiny else "qwen2.5-0.5b", "tiny_vocab": 512,
            "batch": args.batch or (2 if args.tiny else 8), "seq": args.seq or (64 if args.tiny else 2048),
            "dtype": "bfloat16" if device.startswith("cuda") else "float32",
            "warmup": _default(args.warmup, 2 if args.tiny else 3),
            "timed_steps": _default(args.timed_steps, 2 if args.tiny else 5),
            "steps": max(1, _default(args.steps, 2 if args.tiny else 3)),
            "compiler": args.compiler or ("inductor" if device.startswith("cuda") else "aot_eager"),
            "trace_dir": args.trace_dir, "lora_r": args.lora_r, "lora_adapter_dtype": args.lora_adapter_dtype}
    env = common.environment(device)
    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    stem = args.name or common.stamp("profile", device)
    settings = {k: spec[k] for k in ("preset", "batch", "seq", "dtype", "warmup", "timed_steps", "steps", "compiler",
                                     "lora_r", "lora_adapter_dtype")}
    note = (f"{settings}. AdamW(fused) + clip_grad_norm_ each step, synchronized per step as in e2e.py. "
            "wall = median unprofiled step; busy = union of kernel intervals (CPU: of top-level ops); "
            "gap = wall - busy (profiled gap: against the profiled steps' mean wall). "
            f"Categories by kernel name (first match): {RULES}.")
    signal.signal(signal.SIGTERM, _on_term)
    print("profile_step: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    results = []
    for variant in variants:
        t0 = time.perf_counter()
        r = run_variant({**spec, "variant": variant}, args.timeout)
        results.append(r)
        msg = (f"wall {r['wall_ms']:.1f} ms, busy {r['busy_ms']:.1f} ms, gap {r['gap_ms']:.1f} ms"
               if r["status"] == "ok" else r["status"])
        print(f"profile_step: {variant}: {msg} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for line in r.get("stderr_tail", [])[-6:]:
            print(f"      {line}", flush=True)
        # written after every variant: a session timeout keeps what was measured
        sections = [("", f"Command: `{command.strip()}`"), *render(results), ("", note)]
        md = common.write_markdown(os.path.join(args.out, stem + ".md"), "Training step profile", env, sections)
        js = common.write_json(os.path.join(args.out, stem + ".json"),
                               {"environment": env, "command": command, "settings": settings,
                                "categories": CATEGORIES, "rules": RULES, "results": results})
    print("\n\n".join(text for _, text in render(results)))
    print(f"profile_step: wrote {md}, {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
