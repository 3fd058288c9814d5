"""``python -m chronicals_compile.testing.quack_compile_probe MAJOR MINOR GPU_NAME C_STAGES|quack [VARIANT ...]``.

Run by tests/kernels/test_quack_kernels_compile.py in a fresh process whose CUTE_DSL_ARCH is the
target (the DSL reads it once, at import): compiles the QuACK kernels the direct launch runs and
prints one JSON line per kernel. On a machine without a CUDA driver the DSL stops after code
generation, at its JIT's driver check; the cubin has been written by then (CUTE_DSL_KEEP_CUBIN)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


#: bf16 with SwiGLU and fp16 with GeGLU: every dtype and activation the op takes, each compile ~3.5 s.
COMBINATIONS = ((torch.bfloat16, "swiglu"), (torch.float16, "geglu"))


def _compile(build) -> str:
    try:
        build()
    except Exception as err:  # noqa: BLE001 - only the driver check after code generation is expected
        if "CUDA Driver" not in str(err) and "cuInit" not in str(err):
            raise
        return "stopped at the driver check"
    return "compiled and loaded"


def _folder_for(dump: Path, name: str) -> list[str]:
    """Move the cubins (and PTX, with CUTE_DSL_KEEP_PTX) just written into ``dump/name``; their names."""
    folder = dump / name
    folder.mkdir()
    cubins = [c.rename(folder / c.name).name for c in dump.glob("*.cubin")]
    for ptx in dump.glob("*.ptx"):
        ptx.rename(folder / ptx.name)
    return cubins


def main(capacity: tuple[int, int], gpu_name: str, stages: int | None,
         variants: list[tuple[bool, tuple[int, int] | None]] | None = None) -> None:
    """The forward and backward as launched by default, for every dtype and activation; or, with
    ``variants`` ((early C, epilogue subtile) pairs), only the bf16 SwiGLU backward of each."""
    torch.cuda.get_device_capability = lambda device=None: capacity  # QuACK asks at import and for its config
    import quack.gemm_interface as quack_interface

    from chronicals_compile.kernels import quack_direct_launch as direct
    from chronicals_compile.kernels import quack_gated_gemm

    forward = quack_interface.default_config(torch.device("cuda"))
    backward = quack_gated_gemm.backward_config(gpu_name)
    dump = Path(os.environ["CUTE_DSL_DUMP_DIR"])
    c_stages = direct.backward_stages(stages, capacity)
    if variants:
        for early_c, epi_tile in variants:
            outcome = _compile(lambda: direct.compile_backward(torch.bfloat16, "swiglu", backward, capacity, c_stages,
                                                               early_c, epi_tile))
            name = "backward" + ("-early-c" if early_c else "") + (f"-epi{epi_tile[0]}x{epi_tile[1]}" if epi_tile else "")
            print(json.dumps({"kernel": name, "outcome": outcome, "cubins": _folder_for(dump, name)}), flush=True)
        return
    for dtype, activation in COMBINATIONS:
        builds = {"forward": lambda: direct.compile_forward(dtype, activation, forward, capacity),
                  "backward": lambda: direct.compile_backward(dtype, activation, backward, capacity, c_stages)}
        for kind, build in builds.items():
            outcome = _compile(build)
            # Each kernel's cubin into its own folder: the DSL's file names leave out the activation.
            name = f"{kind}-{str(dtype)[6:]}-{activation}"
            print(json.dumps({"kernel": name, "outcome": outcome, "cubins": _folder_for(dump, name)}), flush=True)


def _variant(spec: str) -> tuple[bool, tuple[int, int] | None]:
    """``early-c``, ``epi=64x64`` or ``early-c+epi=64x64``."""
    parts = spec.split("+")
    epi = next((tuple(int(v) for v in p[4:].split("x")) for p in parts if p.startswith("epi=")), None)
    return "early-c" in parts, epi


if __name__ == "__main__":
    major, minor, name, stages = sys.argv[1:5]
    specs = sys.argv[5:]  # backward variants, each ``early-c``, ``epi=MxN`` or both joined by ``+``
    main((int(major), int(minor)), name, None if stages == "quack" else int(stages),
         [_variant(s) for s in specs] or None)
