"""``chronicals verify``: the table, the exit code, and failures recorded rather than raised."""
from __future__ import annotations

import types

from hypothesis import strategies as st

from chronicals_compile.cli import verify
from chronicals_compile.verify.tolerance import Measurement
from chronicals_compile.testing.cli_runner import run_module


def test_verify_quick_passes_and_prints_a_table():
    """Fresh interpreter: TRITON_INTERPRET is set by the command itself before Triton loads."""
    result = run_module("verify", "--quick", timeout=110, env={"TRITON_INTERPRET": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Triton interpreter" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "dtype", "examples", "worst", "err/bound", "worst", "tensor", "result"]
    ops = {line.split()[0] for line in out.splitlines()[out.splitlines().index(header) + 2:] if line.strip()
           and not line.startswith("chronicals")}
    assert {"rms_norm", "add_rms_norm", "lora_linear", "swiglu", "rope", "linear_cross_entropy"} <= ops
    assert "all" in out.splitlines()[-1] and "pass" in out.splitlines()[-1]


def test_discover_finds_every_verify_module():
    names = [n for n, _ in verify.discover()]
    assert names == ["rms_norm", "add_rms_norm", "lora_linear", "swiglu", "rope", "linear_cross_entropy"]


def test_failures_and_crashes_are_recorded_not_raised():
    import torch

    def check(x: int, dtype, device: str = "cpu"):
        if x == 3:
            raise RuntimeError("kernel exploded")
        ratio = 2.0 if x == 1 else 0.5
        return [Measurement("fake.out", dtype, ratio, 0.1, ratio <= 1)]

    module = types.SimpleNamespace(
        NAME="fake", check=check,
        cases=lambda: st.fixed_dictionaries({"x": st.sampled_from([0, 1, 2, 3]),
                                             "dtype": st.just(torch.float32)}))
    rows, cases = verify.run_op("fake", module, examples=30, seed=0, quick=False, device="cpu")
    row = rows["float32"]
    assert cases == row.examples > 4
    assert not row.ok and row.failures > 0 and row.worst_ratio == 2.0
    assert any("kernel exploded" in e for e in row.errors)
    assert "x=1" in row.failed_cases[0]
    table = verify.format_table([row])
    assert "FAIL" in table and "2.000" in table
