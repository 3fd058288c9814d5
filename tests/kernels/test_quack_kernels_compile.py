"""QuACK's kernels as the package launches them, lowered to Hopper and Blackwell device code on the
CPU: the gated forward, and the dgated backward (on Hopper our subclass with four C buffers, by each
GPU's cluster). CuTe-DSL generates the cubin without a GPU, so a change of QuACK, cutlass-dsl or our
subclass that no longer compiles fails here instead of in a device call
(tests/gpu/test_mlp_epilogue_gpu.py runs the kernels against float64)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chronicals_compile.kernels import quack_dgated_prefetch

ROOT = Path(__file__).resolve().parents[2]


def _probe(tmp_path: Path, arch: str, capacity: tuple[int, int], gpu: str, stages: str) -> list[dict]:
    env = {**os.environ, "CUTE_DSL_ARCH": arch, "CUTE_DSL_KEEP_CUBIN": "1", "CUTE_DSL_DUMP_DIR": str(tmp_path),
           "QUACK_CACHE_ENABLED": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "chronicals_compile.testing.quack_compile_probe", *map(str, capacity),
                          gpu, stages], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def _assert_one_cubin_each(dump: Path, results: list[dict], arch: str) -> None:
    """Forward and backward, bf16 with SwiGLU and fp16 with GeGLU: each lowered to one cubin for ``arch``."""
    assert sorted(r["kernel"] for r in results) == sorted(
        f"{kind}-{combo}" for kind in ("forward", "backward") for combo in ("bfloat16-swiglu", "float16-geglu")), results
    for r in results:
        assert len(r["cubins"]) == 1 and r["cubins"][0].endswith(f".{arch}.cubin"), r
        assert (dump / r["kernel"] / r["cubins"][0]).stat().st_size > 10_000, r


@pytest.mark.parametrize("arch,capacity,gpu", [
    ("sm_90a", (9, 0), "NVIDIA H200"),            # backward cluster 1 x 2
    ("sm_90a", (9, 0), "NVIDIA H100 80GB HBM3"),  # backward cluster 2 x 1
    ("sm_100a", (10, 0), "NVIDIA B200"),          # QuACK's own backward kernel
])
def test_the_launched_kernels_compile(tmp_path, arch, capacity, gpu):
    results = _probe(tmp_path, arch, capacity, gpu, str(quack_dgated_prefetch.DEFAULT_C_STAGES))
    _assert_one_cubin_each(tmp_path, results, arch)
    subclass = [r for r in results if "GemmDGatedDeepCSm90" in r["cubins"][0]]
    assert [r["kernel"] for r in subclass] == ([r["kernel"] for r in results if r["kernel"].startswith("backward")]
                                               if capacity[0] == 9 else []), results


def test_quacks_own_backward_compiles_on_hopper(tmp_path):
    """CHRONICALS_QUACK_DGATED_C_STAGES=quack: the kernel QuACK itself would run."""
    results = _probe(tmp_path, "sm_90a", (9, 0), "NVIDIA H200", "quack")
    _assert_one_cubin_each(tmp_path, results, "sm_90a")
    assert not [r for r in results if "GemmDGatedDeepCSm90" in r["cubins"][0]], results
