"""Instruction counts of the RoPE kernel's Hopper code with 32-bit and with 64-bit offsets, on a
machine without a GPU (Triton compiles to a cubin, its bundled nvdisasm lists the SASS).

Why: the kernel is one straight-line program per tile (no loops), so the static instruction count
is what every program executes; the kernel ran at 69% of copy bandwidth on the H200 where 32-bit
indexed peers ran at 81-86% (results/2026-11-28-h200-session2/micro.json). The launcher picks
32-bit offsets wherever they fit (``kernels.rope.needs_int64``); this shows what that removes.

    python benchmarks/rope_sass.py            # Qwen2.5-0.5B's launch: 4 rows x 16 heads x 32 pairs
"""
from __future__ import annotations

import collections
import inspect
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

#: Arguments Triton specialises to constants at a real launch (unit strides, broadcast cos/sin).
UNIT_OR_ZERO = {"sqd": 1, "skd": 1, "sqod": 1, "skod": 1, "scd": 1, "ssd": 1, "scb": 0, "ssb": 0}


def sass_counts(index_64: bool, backward: bool = False, block_r: int = 4, block_hq: int = 16,
                block_hk: int = 2, block_d2: int = 32, num_warps: int = 4) -> collections.Counter:
    import triton
    from triton.backends.compiler import GPUTarget

    from chronicals_compile.kernels import rope

    constexprs = {"BACKWARD": backward, "BLOCK_R": block_r, "BLOCK_HQ": block_hq, "BLOCK_HK": block_hk,
                  "BLOCK_D2": block_d2, "INDEX_64": index_64, **UNIT_OR_ZERO}
    signature = {}
    for name in inspect.signature(rope._rope_kernel.fn).parameters:
        signature[name] = ("constexpr" if name in constexprs else
                           "*bf16" if name in ("Q", "K", "QO", "KO", "COS", "SIN") else "i32")
    compiled = triton.compile(triton.compiler.ASTSource(fn=rope._rope_kernel, signature=signature,
                                                        constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        listing = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in listing.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("rope_sass: unset TRITON_INTERPRET (the interpreter does not generate code)", file=sys.stderr)
        return 2
    print("| phase | offsets | SASS instructions | IMAD | IADD3 | LEA | ISETP | LDG | STG |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backward in (False, True):
        for wide in (True, False):
            ops = sass_counts(wide, backward)
            print(f"| {'bwd' if backward else 'fwd'} | {'64' if wide else '32'}-bit | {sum(ops.values())} | "
                  + " | ".join(str(ops[k]) for k in ("IMAD", "IADD3", "LEA", "ISETP", "LDG", "STG")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
