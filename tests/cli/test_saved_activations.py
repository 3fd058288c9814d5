"""benchmarks/saved_activations.py on the CPU: the gate product is the one intermediate-wide
tensor a layer that gate_recompute stops holding."""
from __future__ import annotations

import os
import subprocess
import sys

from chronicals_compile.testing.cli_runner import REPO


def test_gate_recompute_drops_one_intermediate_tensor_a_layer():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "saved_activations.py"), "--preset", "tiny",
           "--layers", "0", "--seq", "32", "--device", "cpu", "--variants", "chronicals,chronicals-keep-gate"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| chronicals")}
    header = next(line for line in result.stdout.splitlines() if line.startswith("| variant"))
    column = [c.strip() for c in header.split("|")[2:-1]].index("intermediate")
    intermediate = 128  # the tiny preset's MLP width: a and b held with the tag, a, b and the product without
    assert float(rows["chronicals"][column].replace(",", "")) == 2 * intermediate, result.stdout
    assert float(rows["chronicals-keep-gate"][column].replace(",", "")) == 3 * intermediate, result.stdout
