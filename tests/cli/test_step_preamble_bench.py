"""benchmarks/step_preamble.py on a one-layer model: its stamp on Inductor's compiled forward is
reached every step, so the times it reports exist and are ordered (a torch that renamed
``CompiledFxGraph.__call__`` would fail here, not silently report nothing)."""
import math
import os
import sys

import torch

from chronicals_compile.testing.cli_runner import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import step_preamble  # noqa: E402


def test_worker_times_the_host_before_the_compiled_forward():
    from torch._inductor import output_code

    original = output_code.CompiledFxGraph.__call__
    try:
        row = step_preamble.worker("inductor", "cpu", reps=3, layers=1)
    finally:
        torch._dynamo.reset()  # the compiled model's cache entries stay with this test
    assert output_code.CompiledFxGraph.__call__ is original  # the stamp is removed again
    assert row["variant"] == "inductor"
    for key in ("to_graph_ms", "to_graph_without_guards_ms", "forward_host_ms"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert row["to_graph_ms"] < row["forward_host_ms"]
