"""benchmarks/profile_step.py: the CPU smoke run end to end, and the GPU-side trace parsing on a
synthetic CUDA trace (the real one only exists on the device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import importlib.util

import pytest

from chronicals_compile.testing.cli_runner import REPO

_spec = importlib.util.spec_from_file_location("profile_step", os.path.join(REPO, "benchmarks", "profile_step.py"))
profile_step = importlib.util.module_from_spec(_spec)  # loaded by path: benchmarks/ stays off sys.path
_spec.loader.exec_module(profile_step)

#: Kernel names as an H200 trace spells them (shortened) -> the category they must land in.
GPU_NAMES = {
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas": "matmul",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "matmul",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t>, false, true>(pytorch_flash::Flash_fwd_params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention",
    "_cce_fwd_kernel": "loss",
    "_cce_grad_kernel": "loss",
    "triton_red_fused__log_softmax__to_copy_nll_loss_forward_0": "loss",
    "_rms_norm_fwd": "ours_fused",
    "_gated_bwd": "ours_fused",
    "_rope_kernel": "ours_fused",
    "triton_poi_fused__to_copy_add_mul_rsqrt_0": "inductor_triton",
    "triton_per_fused_add_mean_mul_pow_1": "inductor_triton",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void at::native::lpnorm_cleanup<c10::BFloat16, (at::native::NormType)1, float, float>": "optimizer",
    "Memcpy DtoD (Device -> Device)": "copy_memset",
    "Memset (Device)": "copy_memset",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copy_memset",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "other",
}


@pytest.mark.parametrize("name,category", sorted(GPU_NAMES.items()))
def test_classify_gpu_kernel_names(name, category):
    assert profile_step.classify(name) == category


def test_analyse_cuda_trace_busy_is_the_union_of_kernel_intervals():
    def ev(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        ev("nvjet_tst_128x256", 0, 10), ev("triton_poi_fused_add_0", 5, 10),  # overlap (two streams)
        ev("_cce_fwd_kernel", 30, 4), ev("Memset (Device)", 40, 2, "gpu_memset"),
        ev("cudaLaunchKernel", 0, 1, "cuda_runtime"), ev("cudaLaunchKernel", 20, 1, "cuda_runtime"),
        ev("aten::mm", 0, 50, "cpu_op"),  # CPU ops are not GPU time
    ]}
    r = profile_step.analyse_trace(trace, steps=2, device="cuda")
    assert r["busy_ms"] == pytest.approx((15 + 4 + 2) / 1e3 / 2)
    assert r["kernel_ms"] == pytest.approx((10 + 10 + 4 + 2) / 1e3 / 2)
    assert r["categories"]["matmul"]["ms"] == pytest.approx(10 / 1e3 / 2)
    assert r["categories"]["loss"]["count"] == 0.5
    assert r["kernels_per_step"] == 2 and r["launch_calls_per_step"] == 1
    assert r["top"][0]["name"] in ("nvjet_tst_128x256", "triton_poi_fused_add_0")
    # holes: 15 -> 30 after the kernel that ended last (the triton one), 34 -> 40
    assert r["idle"]["idle_ms"] == pytest.approx((15 + 6) / 1e3 / 2) and r["idle"]["holes"] == 1
    assert [(p["before"], p["after"]) for p in r["idle"]["pairs"]] == [
        ("triton_poi_fused_add_0", "_cce_fwd_kernel"), ("_cce_fwd_kernel", "Memset (Device)")]
    assert r["host"]["by_self"][0] == {"op": "aten::mm", "calls": 0.5, "inclusive_ms": 50 / 1e3 / 2,
                                       "self_ms": 50 / 1e3 / 2}


def test_profile_step_tiny_cpu(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "profile_step.py"), "--device", "cpu", "--tiny",
           "--variants", "inductor,chronicals", "--out", str(tmp_path), "--name", "prof", "--commit", "abc1234"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads((tmp_path / "prof.json").read_text())
    assert payload["environment"]["commit"] == "abc1234"
    assert {"date", "device", "torch", "transformers"} <= set(payload["environment"])
    assert payload["categories"] == profile_step.CATEGORIES
    runs = {r["variant"]: r for r in payload["results"]}
    assert set(runs) == {"inductor", "chronicals"}
    for r in runs.values():
        assert r["status"] == "ok", r["status"]
        assert set(r["categories"]) == set(profile_step.CATEGORIES)
        assert r["kernel_ms"] > 0 and r["busy_ms"] > 0 and r["wall_ms"] > 0
        assert r["categories"]["matmul"]["ms"] > 0 and r["categories"]["attention"]["ms"] > 0
        assert 0 < len(r["top"]) <= profile_step.TOP_JSON
    assert runs["chronicals"]["categories"]["loss"]["count"] >= 1  # the fused CE op
    md = (tmp_path / "prof.md").read_text()
    assert "| matmul |" in md and "Top 15 kernels: chronicals" in md


def test_gemm_shapes_attribute_kernels_to_their_op_and_rate():
    """A GEMM kernel counts for the CPU op that launched it (by External id, or through the launch
    call's correlation), split-K reductions included, and its rate comes from the op's shapes."""
    def ev(name, cat, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    m, k, n = 16384, 896, 128
    trace = {"traceEvents": [
        ev("aten::mm", "cpu_op", 0, 50, **{"External id": 1, "Input Dims": [[m, k], [k, n]]}),
        ev("nvjet_tst_gemm", "kernel", 10, 20, **{"External id": 1, "correlation": 7}),
        ev("aten::addmm", "cpu_op", 100, 50, **{"External id": 2, "Input Dims": [[n], [m, k], [k, n], [], []]}),
        ev("cudaLaunchKernel", "cuda_runtime", 101, 2, **{"External id": 2, "correlation": 9}),
        ev("nvjet_tst_splitK", "kernel", 110, 20, correlation=9),
        ev("void cublasLt::splitKreduce_kernel", "kernel", 131, 10, **{"External id": 2}),
        ev("triton_poi_fused_add_0", "kernel", 150, 5, **{"External id": 3}),
    ]}
    rows = profile_step.analyse_trace(trace, steps=1, device="cuda")["gemms"]
    by_op = {r["op"]: r for r in rows}
    assert set(by_op) == {"aten::mm", "aten::addmm"}
    assert by_op["aten::addmm"]["ms"] == pytest.approx(30 / 1e3)
    assert by_op["aten::mm"]["tflops"] == pytest.approx(2 * m * k * n / 20e-6 / 1e12)
    assert by_op["aten::addmm"]["calls"] == 1


def test_gpu_only_idle_reads_kernels_and_renders_its_table():
    """The CUDA-only pass: holes between kernels (CPU records, if any, ignored) and its own table."""
    def ev(name, ts, dur, cat="kernel", corr=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    trace = {"traceEvents": [ev("CatArrayBatchedCopy", 0, 10), ev("quack_gemm", 25, 100),
                             ev("aten::mm", 0, 200, "cpu_op"), ev("Memset (Device)", 130, 5, "gpu_memset"),
                             ev("CatArrayBatchedCopy", 135, 10), ev("quack_gemm", 147, 100),
                             ev("CatArrayBatchedCopy", 247, 10), ev("quack_gemm", 260, 100, corr=5),
                             ev("cuLaunchKernelEx", 256, 2, "cuda_driver", corr=5)]}
    idle = profile_step.gpu_only_idle(trace, steps=1, wall_ms=0.4)
    assert idle["busy_ms"] == pytest.approx(335 / 1e3) and idle["wall_ms"] == 0.4
    assert idle["idle_ms"] == pytest.approx(25 / 1e3) and idle["holes"] == 4
    assert [(p["before"], p["after"], p["ms"]) for p in idle["pairs"]] == [
        ("CatArrayBatchedCopy", "quack_gemm", pytest.approx(0.020)), ("quack_gemm", "Memset (Device)", pytest.approx(0.005))]
    # one 15 us hole and two of 2-3 us: the median and the largest tell a spread from a lump
    assert idle["pairs"][0]["median_us"] == 3 and idle["pairs"][0]["max_us"] == 15
    # the last gemm's launch call ran 4 us before it started: the host was late, not the GPU
    assert idle["pairs"][0]["launch_lag_us"] == 4 and idle["pairs"][1]["launch_lag_us"] is None
    result = {"variant": "chronicals", "status": "ok", "categories": {c: {"ms": 1.0, "count": 1} for c in profile_step.CATEGORIES},
              "kernel_ms": 1.0, "top": [], "idle_gpu_only": idle, "compiler": "inductor", "wall_ms": 0.2,
              "wall_profiled_ms": 0.3, "busy_ms": 0.1, "gap_ms": 0.1, "gap_profiled_ms": 0.2,
              "launch_calls_per_step": None, "kernels_per_step": 3, "warmup_s": 1.0,
              "clocks": {"unprofiled": {"sm_mhz": 1675.4, "power_w": 568.2, "clock_samples": 30},
                         "profiled": {"sm_mhz": 1980.0, "power_w": 400.0, "clock_samples": 40}, "cuda_only": {}}}
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))  # render reads benchmarks/common.py
    try:
        sections = dict(profile_step.render([result]))
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    title = next(t for t in sections if t.startswith("GPU idle by neighbouring kernels, CUDA-only trace: chronicals"))
    assert "| CatArrayBatchedCopy | quack_gemm | 0.02 | 3 | 3 | 15 | 4 |" in sections[title]
    clocks = sections[next(t for t in sections if t.startswith("Clocks by run"))]
    assert "| chronicals | unprofiled | 1675 | 568 | 30 |" in clocks and "| profiled | 1980 |" in clocks
    assert "cuda_only" not in clocks  # a run without samples (no nvidia-smi) gives no row
