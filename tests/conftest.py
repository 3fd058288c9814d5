"""The CPU suite runs Triton kernels through the interpreter on CPU tensors, also on a machine
that has a GPU; only ``tests/gpu`` compiles them for real. Set before anything imports Triton."""
import os

import torch
from hypothesis import settings


def pytest_configure(config):
    gpu_run = any(part in ("gpu", "gpu_multi") for a in config.args
                  for part in os.path.normpath(str(a).split("::")[0]).split(os.sep))
    if not gpu_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")


torch.set_num_threads(2)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits, no recompile limit carried over."""
    torch._dynamo.reset()
    yield
