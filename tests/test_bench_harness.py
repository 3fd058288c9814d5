"""The per-op benchmark harness (benchmarks/common.py ``measure_phases`` and bench_rms_norm/swiglu/
rope) on tiny CPU tensors: our launchers through the Triton interpreter, torch.compile with the
aot_eager backend (Dynamo and AOTAutograd run, Inductor's codegen is skipped for time), a stand-in
timer. Checks the rows (every variant and phase), the byte formulas, GB/s and %copy arithmetic,
the buffer rotation and that every variant computes what eager does."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import bench_add_rms_norm  # noqa: E402
import bench_distributed  # noqa: E402
import bench_rms_norm  # noqa: E402
import bench_rope  # noqa: E402
import bench_swiglu  # noqa: E402
import common  # noqa: E402

STAND_IN_MS = 0.001  # every "timing" is 1 microsecond: GB/s = bytes / 1e3 exactly
COPY_GBPS = 100.0
VARIANTS = ["eager", "torch.compile", "chronicals"]
ROPE_VARIANTS = VARIANTS + ["chronicals-shared-rows", "chronicals-64bit"]  # the kernel at sessions 28 and 27


def _timer(calls):
    def timer(fn):
        fn()
        fn()  # two calls: both rotating sets are used
        calls.append(fn)
        return STAND_IN_MS
    return timer


def _aot_eager(f):
    return torch.compile(f, backend="aot_eager", dynamic=False)


def test_minimal_bytes_at_known_shapes():
    bf16 = torch.bfloat16
    m, n = 16384, 896
    assert bench_rms_norm.phase_bytes(m, n, bf16) == {
        "fwd": 2 * (2 * m * n + n), "bwd": 2 * (3 * m * n + 2 * n), "fwd+bwd": 2 * (5 * m * n + 3 * n)}
    assert bench_rms_norm.phase_bytes(m, n, bf16)["fwd"] == 58_722_048
    assert bench_rms_norm.phase_bytes(m, n, torch.float32)["bwd"] == 2 * 88_083_968
    assert bench_swiglu.phase_bytes(16384, 4864, bf16) == {
        "fwd": 478_150_656, "bwd": 796_917_760, "fwd+bwd": 1_275_068_416}
    # rope, B8 S2048 Hq14 Hk2 D64: q+k = 33,554,432 B, cos = sin = 2,097,152 B.
    assert bench_rope.phase_bytes(8, 2048, 14, 2, 64, bf16) == {
        "fwd": 71_303_168, "bwd": 71_303_168, "fwd+bwd": 142_606_336}


def test_rotation_count_and_rotating_buffers():
    l2 = 60 * 2**20
    assert common.rotation_count(58_722_304, l2) == 1 + math.ceil(4 * l2 / 58_722_304) == 6
    assert common.rotation_count(4 * l2, l2) == 2  # never fewer than two sets
    assert common.rotation_count(1, l2) == 64  # capped
    assert common.rotation_count(1000, 0) == 2  # off CUDA
    seen = []
    sets = [{"id": i} for i in range(3)]
    fn = common.rotating(lambda s: (seen.append(s["id"]), torch.full((2,), s["id"]))[1], sets)
    for _ in range(7):
        fn()
    assert seen == [0, 1, 2, 0, 1, 2, 0]
    # each set's last output is kept alive until its next turn, so outputs rotate too
    assert [int(t[0]) for t in fn.keep] == [0, 1, 2]
    assert len({t.data_ptr() for t in fn.keep}) == 3


def test_fake_ctx_runs_a_function_like_autograd():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g if ctx.needs_input_grad[0] else None

    x, g = torch.randn(5), torch.randn(5)
    ctx = common.FakeCtx()
    assert torch.equal(Square.forward(ctx, x), x * x)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(Square.apply(xr), xr, g)
    torch.testing.assert_close(Square.backward(ctx, g), expected)


def _check_rows(rows, labels, phase_bytes, variants=VARIANTS):
    """Every (shape, phase, variant) once, no error, figures consistent with the byte formulas."""
    got = {(r["shape"], r["phase"], r["variant"]) for r in rows}
    want = {(lab, ph, v) for lab in labels for ph in common.PHASES for v in variants}
    assert got == want and len(rows) == len(want)
    for r in rows:
        assert "error" not in r, r
        nbytes = phase_bytes[r["shape"]][r["phase"]]
        assert r["MB"] == round(nbytes / 1e6, 1)
        for t in ("cudagraph", "do_bench"):
            assert r[f"{t} ms"] == STAND_IN_MS
            assert r[f"{t} GB/s"] == round(nbytes / 1e3)
            assert r[f"{t} %copy"] == round(100 * (nbytes / 1e3) / COPY_GBPS, 1)
        assert r["speedup vs compile"] == 1.0
        assert r["sets"] == 2
        # float32 throughout: every variant agrees with eager to rounding
        assert r["err"] < 1e-4, r
    # rows read shape by shape, phase by phase, variants side by side
    for lab in labels:
        block = [r for r in rows if r["shape"] == lab]
        assert [(r["phase"], r["variant"]) for r in block] == [(p, v) for p in common.PHASES for v in variants]


def test_rms_norm_bench_rows():
    calls = []
    timer = _timer(calls)
    rows = bench_rms_norm.run("cpu", torch.float32, COPY_GBPS, shapes=[(6, 40)], compile_fn=_aot_eager,
                              timers={"cudagraph": timer, "do_bench": timer}, liger=False, log=None)
    _check_rows(rows, ["6x40"], {"6x40": bench_rms_norm.phase_bytes(6, 40, torch.float32)})
    assert len(calls) == 2 * 3 * len(VARIANTS)


def test_add_rms_norm_bench_rows():
    calls = []
    timer = _timer(calls)
    rows = bench_add_rms_norm.run("cpu", torch.float32, COPY_GBPS, shapes=[(7, 40)], compile_fn=_aot_eager,
                                  timers={"cudagraph": timer, "do_bench": timer}, liger=False, log=None)
    _check_rows(rows, ["7x40"], {"7x40": bench_add_rms_norm.phase_bytes(7, 40, torch.float32)})
    assert len(calls) == 2 * 3 * len(VARIANTS)


def test_swiglu_bench_rows():
    timer = _timer([])
    cases = [("swiglu", "contiguous", (4, 24)), ("geglu", "contiguous", (4, 24)), ("swiglu", "chunk", (4, 24))]
    rows = bench_swiglu.run("cpu", torch.float32, COPY_GBPS, shapes=cases, compile_fn=_aot_eager,
                            timers={"cudagraph": timer, "do_bench": timer}, liger=False, log=None)
    b = bench_swiglu.phase_bytes(4, 24, torch.float32)
    for op in ("swiglu", "geglu"):
        sub = [r for r in rows if r["op"] == op]
        labels = sorted({r["shape"] for r in sub})
        assert labels == (["4x24", "4x24 (chunk)"] if op == "swiglu" else ["4x24"])
        _check_rows(sub, labels, {lab: b for lab in labels})


def test_rope_bench_rows():
    timer = _timer([])
    shape = (2, 4, 4, 2, 16)
    rows = bench_rope.run("cpu", torch.float32, COPY_GBPS, shapes=[shape], compile_fn=_aot_eager,
                          timers={"cudagraph": timer, "do_bench": timer}, liger=False, log=None)
    label = "B2 S4 Hq4 Hk2 D16"
    _check_rows(rows, [label], {label: bench_rope.phase_bytes(*shape, torch.float32)}, ROPE_VARIANTS)


def test_rope_bench_rows_interleaved():
    timer = _timer([])
    rows = bench_rope.run("cpu", torch.float32, COPY_GBPS, shapes=[(2, 4, 4, 2, 16, True)], compile_fn=_aot_eager,
                          timers={"cudagraph": timer, "do_bench": timer}, liger=False, log=None)
    label = "B2 S4 Hq4 Hk2 D16 interleaved"
    _check_rows(rows, [label], {label: bench_rope.phase_bytes(2, 4, 4, 2, 16, torch.float32)}, ROPE_VARIANTS)


def test_a_failing_variant_is_a_row_not_a_crash():
    def boom(s):
        raise RuntimeError("no kernel")

    ok = common.Variant(fwd=lambda s: s["x"] * 2, bwd=lambda s: s["x"] * 2, fwd_bwd=lambda s: s["x"] * 2)
    bad = common.Variant(fwd=boom, bwd=lambda s: s["x"] * 3, fwd_bwd=boom)
    rows = common.measure_phases({"op": "toy"}, lambda seed: {"x": torch.ones(4)},
                                 {"eager": ok, "torch.compile": ok, "broken": bad},
                                 {p: 16 for p in common.PHASES}, device="cpu", copy_gbps=COPY_GBPS,
                                 timers={"t": lambda fn: (fn(), 0.5)[1]}, log=None)
    by = {(r["phase"], r["variant"]): r for r in rows}
    assert "no kernel" in by[("fwd", "broken")]["error"]
    assert by[("bwd", "broken")]["err"] == pytest.approx(0.5)  # 3x vs 2x: caught by the check
    assert by[("fwd", "eager")]["t GB/s"] == round(16 / 0.5e-3 / 1e9)


def test_a_failing_timer_keeps_the_other_timers_figure():
    ok = common.Variant(fwd=lambda s: s["x"] * 2, bwd=lambda s: s["x"] * 2, fwd_bwd=lambda s: s["x"] * 2)

    def capture_fails(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    rows = common.measure_phases({"op": "toy"}, lambda seed: {"x": torch.ones(4)}, {"eager": ok},
                                 {p: 16 for p in common.PHASES}, device="cpu", copy_gbps=COPY_GBPS,
                                 timers={"cudagraph": capture_fails, "do_bench": lambda fn: 0.5}, log=None)
    assert len(rows) == 3
    for r in rows:
        assert "cudagraph ms" not in r and r["do_bench ms"] == 0.5 and r["err"] == 0.0
        assert r["error"].startswith("cudagraph: RuntimeError")


def test_rms_norm_backward_sweep_rows_are_all_correct():
    """Every launch shape the GPU sweep tries computes the same gradients (odd rows, width not a
    power of two; several programs, several loop steps each)."""
    configs = [(1, None), (2, 1), (8, 4), (16, 1)]
    rows = bench_rms_norm.sweep_bwd("cpu", torch.float32, COPY_GBPS, shapes=[(37, 40)], configs=configs,
                                    compile_fn=_aot_eager, timers={"cudagraph": _timer([])}, log=None)
    names = [r["variant"] for r in rows]
    assert names == ["eager", "torch.compile", "ours p1 mauto", "ours p2 m1", "ours p8 m4", "ours p16 m1"]
    for r in rows:
        assert r["phase"] == "bwd" and "error" not in r, r
        assert r["err"] < 1e-5, r


def test_rms_norm_backward_rejects_a_block_that_is_not_a_power_of_two():
    from chronicals_compile.kernels.rms_norm import rms_norm_backward

    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_backward(torch.randn(4, 8), x, torch.ones(8), 1e-6, block_m=3)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups need a POSIX host")
def test_distributed_bench_ddp_and_fsdp2_losses_equal_one_process(tmp_path):
    """bench_distributed.py end to end on CPU: three torchrun launches (gloo, aot_eager), the same
    global batches, so DDP's and FSDP2's all-reduced losses equal the single process's step by step."""
    argv = ["--device", "cpu", "--preset", "tiny", "--global-batch", "4", "--seq", "32", "--steps", "2",
            "--warmup", "1", "--gpus", "2", "--engines", "single,ddp,fsdp2", "--compiler", "aot_eager",
            "--out", str(tmp_path), "--name", "dist"]
    assert bench_distributed.main(argv) == 0
    payload = json.loads((tmp_path / "dist.json").read_text())
    assert payload["complete"] and (tmp_path / "dist.md").exists()
    by = {r["engine"]: r for r in payload["results"]}
    assert list(by) == ["single", "ddp", "fsdp2"]
    assert [by[e]["gpus"] for e in by] == [1, 2, 2]
    for r in by.values():
        assert r["status"] == "ok", r
        assert len(r["losses"]) == len(r["grad_norms"]) == 3
        assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"]), r["grad_norms"]
        assert r["tokens_per_s"] > 0 and r["scaling_efficiency"] > 0
    for engine in ("ddp", "fsdp2"):
        torch.testing.assert_close(by[engine]["losses"], by["single"]["losses"], rtol=1e-4, atol=0)
