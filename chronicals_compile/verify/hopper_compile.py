"""Compile every Triton kernel for Hopper (sm_90) on a machine with no GPU.

The interpreter that runs our kernels in CPU CI checks numerics but not code generation: a
kernel can pass every interpreted test and still fail to compile for CUDA (a constexpr-typed
branch, a dtype the backend rejects). Triton's compiler needs no GPU to produce a cubin, so we
record the launches the CPU checks make and compile each distinct specialisation for sm_90.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from typing import Any, Iterator

import torch

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
           torch.uint8: "u8", torch.bool: "i1"}


def _type_of(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


@contextlib.contextmanager
def recording_launches() -> Iterator[list[dict]]:
    """While active, every interpreted launch is recorded as a JSON-able specialisation."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        import inspect

        params = list(inspect.signature(self.fn).parameters.values())
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip([p.name for p in params], args))
        bound.update({k: v for k, v in kwargs.items() if k not in options})
        signature, constexprs = {}, {}
        for p in params:
            value = bound.get(p.name, p.default)
            if "constexpr" in str(p.annotation) or value is None:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value if not isinstance(value, torch.dtype) else str(value)
            else:
                signature[p.name] = _type_of(value)
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "signature": signature, "constexprs": constexprs, "options": options})
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def unique(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def compile_for_hopper(launch: dict) -> None:
    """Compile one recorded specialisation to a cubin for sm_90 (run with the interpreter off)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    source = triton.compiler.ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    assert compiled.asm.get("cubin"), f"{launch['name']}: no cubin"


def main() -> None:
    """Read launches (JSON) on stdin, compile each, print failures; exit 1 on any."""
    import sys

    failures = []
    launches = json.load(sys.stdin)
    for launch in launches:
        try:
            compile_for_hopper(launch)
        except Exception as err:  # noqa: BLE001 - collect them all
            failures.append(f"{launch['name']} {launch['constexprs']}: {str(err).strip().splitlines()[-1][:300]}")
    print(f"compiled {len(launches) - len(failures)}/{len(launches)} specialisations for sm_90")
    for f in failures:
        print("FAIL", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
