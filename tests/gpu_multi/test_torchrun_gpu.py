"""Two GPUs (device kind nvidia-h200-x2): the main job under torchrun with NCCL, bf16, Inductor and
our Triton kernels. Apart from tests/gpu (one GPU) so that neither run needs the other machine:
``python3 -m pytest tests/gpu_multi -o addopts=`` on a machine with two GPUs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from chronicals_compile.testing.cli_runner import REPO


def test_two_gpus_are_present():
    assert torch.cuda.device_count() >= 2, "this file needs two GPUs (device kind nvidia-h200-x2)"


def test_finetune_under_torchrun_nccl(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chronicals_compile", "finetune", "--model", "tiny", "--steps", "20", "--max-len", "256",
           "--output-dir", str(out), "--seed", "0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(out / "metrics.json") as f:
        m = json.load(f)
    assert m["world_size"] == 2 and m["dtype"] == "bfloat16" and m["compiled"]
    assert min(m["grad_norms"]) > 0 and sum(m["losses"][-5:]) / 5 < m["losses"][0]
    assert m["swaps"].get("linear_cross_entropy") == 1
