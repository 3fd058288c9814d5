"""Timing, formulas and writers shared by the benchmarks (end-to-end and per-op).

* ``bench(fn, ...)``: median milliseconds after warm-up; ``triton.testing.do_bench`` on CUDA (it
  flushes L2 between repetitions), a ``perf_counter`` loop elsewhere. With ``make_inputs``, every
  repetition gets fresh inputs (built outside the timed region), so no run is served from a
  cache warmed by the previous one.
* ``gbps`` / ``tflops`` / ``mfu``: the figures a result is judged by. The MFU FLOP count is the one
  of ``chronicals_compile/cli/metrics.py`` (stated there), so ``chronicals finetune`` and the
  benchmarks agree.
* ``environment()``: date, commit, device name, library versions: the header of every result.
* ``write_markdown`` / ``write_json`` / ``bar_charts``: results under ``benchmarks/results/``.
  Charts need matplotlib; without it they are skipped (the GPU machine may lack it), never fatal.
"""
from __future__ import annotations

import datetime
import json
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
    for name in ("transformers", "triton", "peft", "liger_kernel"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except Exception:
            env[name] = "n/a"
    if env["liger_kernel"] == "?":
        try:
            from importlib.metadata import version

            env["liger_kernel"] = version("liger-kernel")
        except Exception:
            pass
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
