"""``python -m chronicals_compile.testing.quack_compile_probe MAJOR MINOR GPU_NAME C_STAGES|quack``.

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


def main(capacity: tuple[int, int], gpu_name: str, stages: int | None) -> None:
    torch.cuda.get_device_capability = lambda device=None: capacity  # QuACK asks at import and for its config
    import quack.gemm_interface as quack_interface

    from chronicals_compile.kernels import quack_direct_launch as direct
    from chronicals_compile.kernels import quack_gated_gemm

    forward = quack_interface.default_config(torch.device("cuda"))
    backward = quack_gated_gemm.backward_config(gpu_name)
    dump = Path(os.environ["CUTE_DSL_DUMP_DIR"])
    for dtype, activation in COMBINATIONS:
        builds = {"forward": lambda: direct.compile_forward(dtype, activation, forward, capacity),
                  "backward": lambda: direct.compile_backward(dtype, activation, backward, capacity,
                                                               direct.backward_stages(stages, capacity))}
        for kind, build in builds.items():
            outcome = _compile(build)
            # Each kernel's cubin into its own folder: the DSL's file names leave out the activation.
            folder = dump / f"{kind}-{str(dtype)[6:]}-{activation}"
            folder.mkdir()
            cubins = [c.rename(folder / c.name).name for c in dump.glob("*.cubin")]
            print(json.dumps({"kernel": folder.name, "outcome": outcome, "cubins": cubins}), flush=True)


if __name__ == "__main__":
    major, minor, name, stages = sys.argv[1:5]
    main((int(major), int(minor)), name, None if stages == "quack" else int(stages))
