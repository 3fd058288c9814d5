"""Instruction counts of the RoPE kernel's Hopper code, per program and per element, on a machine
without a GPU (Triton compiles to a cubin, its bundled nvdisasm lists the SASS).

Why: a program is straight-line code (no loops) on one of two paths, q or k, so the static count of
a path is what each warp of its programs issues, and programs x warps x path length is the
launch's issue work. The
kernel ran at 69% of copy bandwidth on the H200 where Liger's and Inductor's ran at 81-86%
(results/2026-11-28-h200-session2/micro.json). Two changes are measured here: 32-bit offsets
wherever they fit (``kernels.rope.needs_int64``, session 28) and a row block per tensor (session
29: k's 2 heads got q's 4-row block, so half the grid moved 256 elements a program).

    python benchmarks/rope_sass.py            # Qwen2.5-0.5B's launch at 8 x 2048
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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from chronicals_compile.kernels import rope  # noqa: E402

#: Arguments Triton specialises to constants at a real launch (unit strides, broadcast cos/sin).
UNIT_OR_ZERO = {"sxd": 1, "sod": 1, "scd": 1, "ssd": 1, "scb": 0, "ssb": 0}
#: Qwen2.5-0.5B's q heads, k heads and rotary pairs (head_dim 64), at 8 x 2048 rows.
QWEN = (14, 2, 32)
ROWS = 8 * 2048


@triton.jit
def _one_path(X, O, COS, SIN, R, S, H, half, step, partner, n_blocks,
              sxb, sxh, sxs, sxd, sob, soh, sos, sod, scb, scs, scd, ssb, sss, ssd,
              BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_D2: tl.constexpr, INDEX_64: tl.constexpr):
    """One branch of ``rope._rope_kernel`` as its own kernel: the same call, on one tensor."""
    pid = tl.program_id(0)
    rope._rotate_rows(X, O, COS, SIN, pid // n_blocks, pid % n_blocks, R, S, H, half, step, partner,
                      sxb, sxh, sxs, sxd, sob, soh, sos, sod, scb, scs, scd, ssb, sss, ssd,
                      BACKWARD, BLOCK_R, BLOCK_H, BLOCK_D2, INDEX_64)


def tiling(shared_rows: bool, heads_pairs: tuple[int, int, int] = QWEN, rows: int = ROWS) -> dict:
    """The launcher's tiles (``kernels.rope._blocks``) and grid, per tensor."""
    hq, hk, half = heads_pairs
    rq, bhq, wq, rk, bhk, wk, d2 = rope._blocks(hq, hk, half, shared_rows)
    warps = max(wq, wk)  # one launch, one warp count
    return {t: {"BLOCK_R": r, "BLOCK_H": bh, "BLOCK_D2": d2, "num_warps": warps,
                "programs": triton.cdiv(rows, r) * triton.cdiv(h, bh), "elements": r * bh * d2 * 2}
            for t, r, bh, h in (("q", rq, bhq, hq), ("k", rk, bhk, hk))}


def _opcodes(cubin: bytes) -> collections.Counter:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in listing.splitlines():
        m = re.search(r"/\*[0-9a-f]{4}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def sass_counts(index_64: bool, backward: bool, tile: dict) -> collections.Counter:
    """Opcode counts of one path's program, compiled for sm_90 as Qwen2.5-0.5B's launch specialises it."""
    from triton.backends.compiler import GPUTarget

    constexprs = {"BACKWARD": backward, "INDEX_64": index_64, **UNIT_OR_ZERO,
                  **{k: v for k, v in tile.items() if k.startswith("BLOCK_")}}
    signature = {name: ("constexpr" if name in constexprs else "*bf16" if name in ("X", "O", "COS", "SIN") else "i32")
                 for name in inspect.signature(_one_path.fn).parameters}
    compiled = triton.compile(triton.compiler.ASTSource(fn=_one_path, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": tile["num_warps"]})
    return _opcodes(compiled.asm["cubin"])


def table() -> list[dict]:
    rows = []
    elements = ROWS * (QWEN[0] + QWEN[1]) * 2 * QWEN[2]
    for backward in (False, True):
        for shared in (True, False):
            tiles = tiling(shared)
            for wide in (True, False):
                paths = {t: sass_counts(wide, backward, tiles[t]) for t in ("q", "k")}
                # warp instructions: every warp of a program issues its path once
                executed = sum(tiles[t]["programs"] * tiles[t]["num_warps"] * sum(paths[t].values()) for t in paths)
                for t, ops in paths.items():
                    rows.append({"phase": "bwd" if backward else "fwd", "rows": "shared" if shared else "per-tensor",
                                 "offsets": "64-bit" if wide else "32-bit", "path": t,
                                 "programs": tiles[t]["programs"], "elements": tiles[t]["elements"],
                                 "instructions": sum(ops.values()), "ops": ops,
                                 "per_element": executed / elements})
    return rows


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("rope_sass: unset TRITON_INTERPRET (the interpreter does not generate code)", file=sys.stderr)
        return 2
    cols = ("IMAD", "IADD3", "LEA", "ISETP", "LDG", "STG")
    print("| phase | row blocks | offsets | path | programs | elements a program | SASS instructions a program | "
          + " | ".join(cols) + " | launch: warp instructions per element |")
    print("|---" * (8 + len(cols)) + "|")
    for r in table():
        print(f"| {r['phase']} | {r['rows']} | {r['offsets']} | {r['path']} | {r['programs']} | {r['elements']} | "
              f"{r['instructions']} | " + " | ".join(str(r['ops'][c]) for c in cols) + f" | {r['per_element']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
