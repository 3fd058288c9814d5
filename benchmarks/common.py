"""Timing, formulas and writers shared by the benchmarks (end-to-end and per-op).

* ``bench(fn, ...)``: median milliseconds after warm-up; ``triton.testing.do_bench`` on CUDA (it
  flushes L2 between repetitions), a ``perf_counter`` loop elsewhere. With ``make_inputs``, every
  repetition gets fresh inputs (built outside the timed region), so no run is served from a
  cache warmed by the previous one.
* ``gbps`` / ``tflops`` / ``mfu``: the figures a result is judged by. The MFU FLOP count is the one
  of ``chronicals_compile/cli/metrics.py`` (stated there), so ``chronicals finetune`` and the
  benchmarks agree.
* ``measure_phases(...)``: the per-op kernel harness of bench_rms_norm/swiglu/rope: forward alone,
  backward alone and forward+backward per variant, each timed under CUDA graphs
  (``do_bench_cudagraph``) and with ``do_bench``, rotating through enough input sets that no call
  is served from L2, with minimal bytes, GB/s, %copy, a check against the reference variant and a
  speed ratio to torch.compile. Its docstring defines every column.
* ``environment()``: date, commit, device name, library versions: the header of every result.
* ``write_markdown`` / ``write_json`` / ``bar_charts``: results under ``benchmarks/results/``.
  Charts need matplotlib; without it they are skipped (the GPU machine may lack it), never fatal.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------- timing

def synchronize(device: str = "cuda") -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn: Callable[..., Any], *, warmup: int = 10, rep: int = 50, device: str = "cuda",
          make_inputs: Callable[[], tuple] | None = None) -> float:
    """Median milliseconds of ``fn()`` (or ``fn(*make_inputs())``, fresh inputs every call)."""
    if make_inputs is None and str(device).startswith("cuda"):
        import triton.testing

        # do_bench's warmup/rep are milliseconds of running, not counts.
        return float(triton.testing.do_bench(fn, warmup=max(25, warmup), rep=max(100, rep),
                                             return_mode="median"))
    times = []
    for i in range(warmup + rep):
        args = make_inputs() if make_inputs is not None else ()
        synchronize(device)
        t0 = time.perf_counter()
        fn(*args)
        synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --------------------------------------------------------------------------- per-op kernel phases

#: The three phases every elementwise bench reports, in table order.
PHASES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass
class Variant:
    """One implementation of an op, as three callables on an input set ``s`` (a dict of tensors a
    bench builds with ``make_set(seed)``):

    * ``fwd(s)``: the forward alone, run under ``torch.no_grad`` (no autograd graph, nothing saved
      beyond what the implementation saves on its own, e.g. Liger's rstd);
    * ``bwd(s)``: the backward alone from the incoming gradients in ``s``, under ``torch.no_grad``;
    * ``fwd_bwd(s)``: forward then backward through autograd (``torch.autograd.grad`` with respect
      to ``s["leaves"]``, gradients ``s["grads"]``): what a training step pays, host work included;
    * ``prepare(s)``, optional, untimed, once per set before ``bwd`` (Liger: run its forward so
      the context its backward reads exists).
    """

    fwd: Callable[[dict], Any]
    bwd: Callable[[dict], Any]
    fwd_bwd: Callable[[dict], Any]
    prepare: Callable[[dict], None] | None = None

    def phase(self, name: str) -> Callable[[dict], Any]:
        if name == "fwd_bwd" or name == "fwd+bwd":
            return self.fwd_bwd
        fn = {"fwd": self.fwd, "bwd": self.bwd}[name]

        def no_grad(s: dict) -> Any:
            import torch

            with torch.no_grad():
                return fn(s)

        return no_grad


class FakeCtx:
    """Stands in for an ``autograd.Function`` context so that a peer's ``Function.forward`` and
    ``Function.backward`` (static methods) can be called directly, without autograd."""

    needs_input_grad = (True,) * 16

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def autograd_grads(outputs: Any, s: dict) -> tuple:
    """``torch.autograd.grad`` of ``outputs`` with respect to ``s["leaves"]``, gradients
    ``s["grads"]``: fresh gradient tensors every call, nothing accumulated into ``.grad``."""
    import torch

    outs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    return torch.autograd.grad(outs, s["leaves"], s["grads"])


def tensors_of(value: Any) -> list:
    """The tensors in a result (a tensor, or a tuple with Nones), in order."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def rel_err(result: Any, reference: list | None) -> float:
    """Largest ``max|a - b| / max|b|`` over the result's tensors against the reference's, in fp32
    (nan without a reference, inf when the tensor counts or sizes differ)."""
    if reference is None:
        return float("nan")
    got = tensors_of(result)
    if len(got) != len(reference):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, reference):
        if a.numel() != b.numel():
            return float("inf")
        a = a.detach().float().reshape(b.shape)
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def l2_cache_bytes(device: str) -> int:
    """The device's L2 size (0 off CUDA; 60 MB where torch does not say)."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return 0
    props = torch.cuda.get_device_properties(torch.device(device))
    return int(getattr(props, "L2_cache_size", 0) or 60 * 2**20)


def rotation_count(bytes_per_call: float, l2_bytes: int, factor: int = 4, cap: int = 64) -> int:
    """Input sets to rotate through so that between two calls on the same set the other sets
    move at least ``factor`` x L2 bytes: nothing a call reads is still in L2 from its last turn."""
    if bytes_per_call <= 0:
        return 2
    return max(2, min(cap, 1 + math.ceil(factor * l2_bytes / bytes_per_call)))


def rotating(call: Callable[[dict], Any], sets: Sequence[dict]) -> Callable[[], None]:
    """``fn()`` running ``call`` on the next set in turn. Each result is kept until that set's
    next turn, so outputs rotate through ``len(sets)`` buffers as well (the allocator cannot hand
    back the block a previous call just wrote, whose dirty lines may still sit in L2). Under
    ``do_bench_cudagraph`` the unrolled graph records the calls in that order."""
    state = {"i": 0}
    keep: list = [None] * len(sets)

    def fn() -> None:
        i = state["i"]
        state["i"] = (i + 1) % len(sets)
        keep[i] = None
        keep[i] = call(sets[i])

    fn.sets = sets  # type: ignore[attr-defined]
    fn.keep = keep  # type: ignore[attr-defined]
    return fn


def cudagraph_ms(fn: Callable[[], Any], rep: int = 20) -> float:
    """Median over 10 replays of one CUDA graph holding ``rep`` ms worth of unrolled calls, per
    call: kernel time without launch overhead (``triton.testing.do_bench_cudagraph``)."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def do_bench_ms(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> float:
    """Median of single calls, each bracketed by CUDA events after an L2 flush
    (``triton.testing.do_bench``): includes whatever host work the call cannot hide."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def host_ms(fn: Callable[[], Any], reps: int = 2) -> float:
    """Stand-in timer off CUDA (the CPU smoke path): median wall time of ``reps`` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_timers(device: str) -> dict[str, Callable[[Callable[[], Any]], float]]:
    """Column name -> timer. On CUDA the two real ones; elsewhere both are ``host_ms``."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {"cudagraph": cudagraph_ms, "do_bench": do_bench_ms}
    return {"cudagraph": host_ms, "do_bench": host_ms}


def measure_phases(label: dict, make_set: Callable[[int], dict], variants: dict[str, Variant],
                   phase_bytes: dict[str, float], *, device: str, copy_gbps: float,
                   timers: dict[str, Callable] | None = None, reference: str = "eager",
                   baseline: str = "torch.compile", l2_bytes: int | None = None,
                   log: Callable[[str], Any] | None = print,
                   phases: Sequence[str] = PHASES) -> list[dict]:
    """Rows ``{**label, phase, variant, MB, <timer> ms, <timer> GB/s, <timer> %copy, ...,
    speedup vs compile, err, sets}`` for every variant and phase of one shape.

    * ``MB``: the minimal traffic of the phase (``phase_bytes``, 1e6 bytes): each tensor the phase
      must read or write, once. GB/s and %copy are that over the median time, and that over
      ``copy_gbps`` (the device's measured copy bandwidth).
    * ``cudagraph ms``: :func:`cudagraph_ms` (launch overhead removed); ``do_bench ms``:
      :func:`do_bench_ms` (host overhead included where the GPU outruns the host).
    * ``speedup vs compile``: the ``baseline`` variant's cudagraph time over this one's, same
      phase: above 1 is faster than Inductor.
    * ``err``: :func:`rel_err` against the ``reference`` variant on one seeded set, same dtype
      (bf16 rounding shows as ~1e-2; a wrong result as ~1).
    * ``sets``: input sets rotated through (:func:`rotation_count`, :func:`rotating`).

    A variant or phase that raises becomes a row with ``error``; the others still run.
    """
    import gc

    import torch

    timers = timers if timers is not None else kernel_timers(device)
    l2 = l2_cache_bytes(device) if l2_bytes is None else l2_bytes
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    refs: dict[str, list] = {}
    rows = []
    for name, variant in variants.items():
        for phase in phases:
            nbytes = phase_bytes[phase]
            row = {**label, "phase": phase, "variant": name, "MB": round(nbytes / 1e6, 1)}
            sets = fn = None
            try:
                call = variant.phase(phase)
                check = make_set(0)
                if phase == "bwd" and variant.prepare is not None:
                    variant.prepare(check)
                out = call(check)
                if name == reference:
                    refs[phase] = [t.detach().float().clone() for t in tensors_of(out)]
                err = rel_err(out, refs.get(phase))
                del check, out
                count = rotation_count(nbytes, l2)
                sets = [make_set(i + 1) for i in range(count)]
                if phase == "bwd" and variant.prepare is not None:
                    for s in sets:
                        variant.prepare(s)
                fn = rotating(call, sets)
                failures = []
                for tname, timer in timers.items():
                    try:  # one timer failing (say, a capture) must not hide the other's figure
                        if cuda:  # the sets were built on the default stream; cudagraph runs on its own
                            torch.cuda.synchronize()
                        ms = float(timer(fn))
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{tname}: {exc!r}"[:160])
                        continue
                    rate = gbps(nbytes, ms)
                    row[f"{tname} ms"] = round(ms, 4)
                    row[f"{tname} GB/s"] = round(rate)
                    row[f"{tname} %copy"] = round(100 * rate / copy_gbps, 1)
                row["err"] = float(f"{err:.2g}")
                row["sets"] = count
                if failures:
                    row["error"] = "; ".join(failures)
            except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the rest
                row["error"] = repr(exc)[:160]
            del sets, fn
            if cuda:  # give the sets' memory back before the next variant allocates its own
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            if log is not None:
                log(" ".join(f"{k}={v}" for k, v in row.items()))
    first = next(iter(timers), None)
    base = {r["phase"]: r.get(f"{first} ms") for r in rows if r["variant"] == baseline}
    tail = ("err", "sets", "error")
    for i, r in enumerate(rows):
        ms, b = r.get(f"{first} ms"), base.get(r["phase"])
        ratio = {"speedup vs compile": round(b / ms, 2)} if ms and b else {}
        rows[i] = {**{k: v for k, v in r.items() if k not in tail}, **ratio,
                   **{k: r[k] for k in tail if k in r}}
    order = list(variants)
    rows.sort(key=lambda r: (PHASES.index(r["phase"]), order.index(r["variant"])))
    return rows


def bench_main(run: Callable[..., list], smoke_shapes: Sequence) -> list[dict]:
    """The command line of bench_rms_norm/swiglu/rope: on the GPU, every shape; with
    ``--cpu-smoke``, the tiny ``smoke_shapes`` on the CPU through the Triton interpreter with the
    stand-in timer (every code path runs, no figure means anything)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --cpu-smoke)")
    parser.add_argument("--copy-gbps", type=float, default=4300.0)
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
    import torch

    from table import markdown

    dtype = getattr(torch, args.dtype or ("float32" if args.cpu_smoke else "bfloat16"))
    kwargs = {"shapes": smoke_shapes} if args.cpu_smoke else {}
    rows = run(device="cpu" if args.cpu_smoke else args.device, dtype=dtype, copy_gbps=args.copy_gbps, **kwargs)
    print(markdown(rows))
    return rows


# --------------------------------------------------------------------------- formulas

def gbps(bytes_moved: float, ms: float) -> float:
    """Achieved bandwidth: bytes read + written once each, over the median time."""
    return bytes_moved / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def peak_bf16_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    from chronicals_compile.cli.metrics import peak_bf16_flops as peak

    return peak(device_name)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation; FLOPs per token as in ``chronicals_compile/cli/metrics.py``."""
    from chronicals_compile.cli.metrics import mfu as _mfu

    return _mfu(flops_per_token, tokens_per_s, peak)


# --------------------------------------------------------------------------- environment

def git_commit() -> str:
    if os.environ.get("CHRONICALS_COMMIT"):
        return os.environ["CHRONICALS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except Exception:
        pass
    return "unknown"


def device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: str) -> dict[str, str]:
    import torch

    env = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for module, dist in (("transformers", "transformers"), ("triton", "triton"), ("peft", "peft"),
                         ("liger_kernel", "liger-kernel"), ("cut_cross_entropy", "cut-cross-entropy")):
        try:
            env[module] = version(dist)
        except PackageNotFoundError:  # importable from a path (device runs: --target dirs) or absent
            try:
                env[module] = getattr(__import__(module), "__version__", "?")
            except Exception:
                env[module] = "n/a"
    return env


def stamp(prefix: str, device: str) -> str:
    """``<prefix>-<YYYY-MM-DD>-<gpu|cpu>``: result file names."""
    tag = "cpu" if not str(device).startswith("cuda") else device_name(device).split()[-1].lower()
    tag = "".join(c for c in tag if c.isalnum() or c in "-_") or "gpu"
    return f"{prefix}-{datetime.date.today().isoformat()}-{tag}"


# --------------------------------------------------------------------------- writers

def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_markdown(path: str, title: str, env: dict, sections: Sequence[tuple[str, str]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    body = [f"# {title}", "", header, ""]
    for heading, text in sections:
        if heading:
            body += [f"## {heading}", ""]
        body += [text, ""]
    with open(path, "w") as f:
        f.write("\n".join(body))
    return path


def write_json(path: str, payload: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def bar_charts(path: str, groups: dict[str, dict[str, float | None]], ylabel: str, title: str) -> str | None:
    """One bar chart per group (e.g. per shape and mode), bars per variant; ``None`` bars are
    drawn as an empty slot labelled with nothing measured. Returns the path, or None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    if not groups:
        return None
    n = len(groups)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), dpi=110, squeeze=False)
    for ax, (group, values) in zip(axes.flat, groups.items()):
        names = list(values)
        heights = [values[k] if isinstance(values[k], (int, float)) else 0.0 for k in names]
        colors = ["tab:orange" if k.startswith("chronicals") else "tab:blue" for k in names]
        bars = ax.bar(range(len(names)), heights, color=colors)
        for bar, name in zip(bars, names):
            v = values[name]
            label = f"{v:,.0f}" if isinstance(v, (int, float)) and v >= 100 else (
                f"{v:.3g}" if isinstance(v, (int, float)) else "n/a")
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
