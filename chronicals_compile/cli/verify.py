"""``chronicals verify``: property-based equivalence of every fused op, as a table.

Each module in ``chronicals_compile/verify/`` (other than ``tolerance``) exposes ``NAME``,
``cases()`` (a hypothesis strategy of keyword arguments) and ``check(**case, device=...)`` returning
``Measurement``s against the float64 reference under the project's one tolerance rule. Here
hypothesis draws the cases (fixed seed, no example database), every measurement is recorded
rather than raised, and the table shows each op and dtype: examples tried, the worst
error / bound ratio (<= 1 passes) and pass or fail.

On a machine without CUDA the kernels run in the Triton interpreter: ``TRITON_INTERPRET=1`` is
set before anything imports Triton (the ``main`` entry point does it before importing this).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import math
import pkgutil
import sys
import time
from typing import Any

#: The ops in the order the passes run; any other verify module found is appended.
OPS = ("rms_norm", "add_rms_norm", "lora_linear", "swiglu", "rope", "linear_cross_entropy")
NOT_OPS = {"tolerance"}

#: --quick: small shapes for modules that take the usual size arguments (keyword names vary per
#: module, so only those a module's ``cases`` accepts are passed). A module may instead define
#: ``quick_cases()``, which wins.
QUICK_KWARGS = {
    "max_rows": 8,
    "hiddens": (7, 64, 100),
    "widths": (7, 33, 100),
    "max_batch": 1,
    "max_seq": 5,
    "head_dims": (8, 16, 64),
    "max_tokens": 16,
    "max_vocab": 300,
    "max_hidden": 64,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="a few small examples per op (under a minute on a CPU)")
    p.add_argument("--examples", type=int, default=None,
                   help="hypothesis examples per op (default: 20 with --quick, 50 otherwise on CPU, 100 on GPU)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed (default: 0, reproducible)")
    p.add_argument("--ops", default=None, help="comma-separated subset of ops (default: all that exist)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="default: cuda if present, else the Triton interpreter on CPU")


def resolve_device(choice: str) -> str:
    """Decide the device without importing torch/triton: interpreter mode must be set first."""
    if choice == "cpu":
        return "cpu"
    if choice == "cuda":
        return "cuda"
    try:
        import torch  # torch itself does not import triton

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "cpu"


def discover() -> list[tuple[str, Any]]:
    """(name, module) of every verify module that follows the interface, ops first in pass order."""
    from .. import verify as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in NOT_OPS and not m.name.startswith("_")]
    ordered = [n for n in OPS if n in names] + sorted(n for n in names if n not in OPS)
    found = []
    for name in ordered:
        module = importlib.import_module(f"{pkg.__name__}.{name}")
        if callable(getattr(module, "cases", None)) and callable(getattr(module, "check", None)):
            found.append((getattr(module, "NAME", name), module))
    return found


def strategy(module, quick: bool):
    if quick and callable(getattr(module, "quick_cases", None)):
        return module.quick_cases()
    if not quick:
        return module.cases()
    params = inspect.signature(module.cases).parameters
    return module.cases(**{k: v for k, v in QUICK_KWARGS.items() if k in params})


@dataclasses.dataclass
class Row:
    op: str
    dtype: str
    examples: int = 0
    worst_ratio: float = 0.0
    worst_name: str = ""
    failures: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    failed_cases: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failures == 0 and not self.errors


def _show(case: dict) -> str:
    """The case as keyword arguments of ``check``, to reproduce it."""
    return "dict(" + ", ".join(f"{k}={v!r}" if not str(v).startswith("torch.") else f"{k}={v}"
                               for k, v in case.items()) + ")"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def run_op(name: str, module, *, examples: int, seed: int, quick: bool,
           device: str) -> tuple[dict[str, Row], int]:
    """Draw ``examples`` cases; every case's measurements (or exception) land in per-dtype rows."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    rows: dict[str, Row] = {}
    drawn = [0]

    def row_for(dtype_name: str) -> Row:
        return rows.setdefault(dtype_name, Row(name, dtype_name))

    @hseed(seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(strategy(module, quick))
    def draw(case: dict) -> None:
        drawn[0] += 1
        label = _dtype_name(case.get("dtype", "?"))
        try:
            measurements = module.check(**case, device=device)
        except Exception as err:  # a crash is a failure of this case, not of the command
            row = row_for(label)
            row.examples += 1
            row.errors.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''} "
                              f"for {_show(case)}")
            return
        seen: set[str] = set()
        for m in measurements:
            row = row_for(_dtype_name(m.dtype))
            if row.dtype not in seen:
                seen.add(row.dtype)
                row.examples += 1
            ratio = m.ratio if not math.isnan(m.ratio) else math.inf
            if ratio >= row.worst_ratio or not row.worst_name:
                row.worst_ratio, row.worst_name = ratio, m.name
            if not m.ok:
                row.failures += 1
                if len(row.failed_cases) < 3:
                    row.failed_cases.append(f"{m} for {_show(case)}")

    draw()
    return rows, drawn[0]


def format_table(rows: list[Row]) -> str:
    header = ("op", "dtype", "examples", "worst err/bound", "worst tensor", "result")
    body = []
    for r in rows:
        ratio = "inf" if math.isinf(r.worst_ratio) else f"{r.worst_ratio:.3f}"
        result = "pass" if r.ok else f"FAIL ({r.failures + len(r.errors)})"
        body.append((r.op, r.dtype, str(r.examples), ratio, r.worst_name or "-", result))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 4, 5) else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(b) for b in body]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from .arguments import UsageError

    device = args.device_resolved
    if args.examples is not None and args.examples < 1:
        raise UsageError(f"--examples must be positive, got {args.examples}")
    modules = discover()
    if args.ops:
        wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
        known = [n for n, _ in modules]
        unknown = [o for o in wanted if o not in known]
        if unknown:
            raise UsageError(f"unknown op(s) {', '.join(unknown)} for --ops (available: {', '.join(known)})")
        modules = [(n, m) for n, m in modules if n in wanted]
    if not modules:
        raise UsageError("no verify modules found in chronicals_compile/verify")
    examples = args.examples or (20 if args.quick else (100 if device == "cuda" else 50))
    where = "CUDA" if device == "cuda" else "CPU, Triton interpreter"
    import torch

    if device == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name()})"
    print(f"chronicals verify: {len(modules)} op(s), {examples} hypothesis examples each, seed {args.seed}, on {where}")
    print("tolerance: |ours - ref64| <= |torch same dtype - ref64| + atol + rtol*|ref64| (verify/tolerance.py)")
    sys.stdout.flush()
    rows: list[Row] = []
    t_all = time.perf_counter()
    for name, module in modules:
        t0 = time.perf_counter()
        op_rows, cases = run_op(name, module, examples=examples, seed=args.seed, quick=args.quick, device=device)
        rows += sorted(op_rows.values(), key=lambda r: r.dtype)
        print(f"  {name}: {cases} cases in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    print()
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    if failed:
        print()
    for r in failed:
        for e in r.errors[:3]:
            print(f"  {r.op} [{r.dtype}] error: {e}")
        for c in r.failed_cases:
            print(f"  {r.op} [{r.dtype}] {c}")
    print()
    total = time.perf_counter() - t_all
    if failed:
        print(f"chronicals verify: FAILED: {len(failed)} of {len(rows)} op/dtype rows ({total:.1f} s)")
        return 1
    print(f"chronicals verify: all {len(rows)} op/dtype rows pass ({total:.1f} s)")
    return 0
