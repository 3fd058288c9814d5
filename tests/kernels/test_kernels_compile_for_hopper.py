"""Every kernel specialisation the CPU checks launch also compiles to an sm_90 cubin.

Interpreted tests prove numerics; this proves code generation, which the interpreter skips
(a constexpr-typed branch once passed every CPU test and failed to compile on the H200).
"""
import json
import os
import subprocess
import sys

import torch
from hypothesis import HealthCheck, given, settings

from chronicals_compile.verify import add_rms_norm, hopper_compile, linear_cross_entropy, rms_norm, rope, swiglu


def _record(module, examples: int) -> list[dict]:
    with hopper_compile.recording_launches() as launches:
        @settings(max_examples=examples, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(module.cases())
        def run(case):
            try:
                module.check(**case)
            except Exception:  # noqa: BLE001 - numerics are other tests' business; launches are ours
                pass
        run()
    return launches


def test_every_recorded_kernel_compiles_for_sm90():
    launches = []
    for module in (rms_norm, add_rms_norm, swiglu, rope, linear_cross_entropy):
        launches += _record(module, examples=12)
    # The interpreter computes bf16 tl.dot wrongly, so CPU cases of the cut cross-entropy leave
    # bf16 out; its code generation is checked here all the same.
    launches += _record(_Bf16(linear_cross_entropy), examples=6)
    launches = hopper_compile.unique(launches)
    assert len(launches) >= 8, launches
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-m", "chronicals_compile.verify.hopper_compile"],
                            input=json.dumps(launches, default=str), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


class _Bf16:
    """A verify module whose cases are all bf16."""

    def __init__(self, module):
        self.module = module

    def cases(self):
        return self.module.cases(dtypes=[torch.bfloat16])

    def check(self, **case):
        return self.module.check(**case)
