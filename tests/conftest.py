"""Without a GPU, Triton kernels run through the interpreter: set it before anything imports
Triton. With one (tests/gpu on the device), they must compile for real, so leave it unset."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings  # noqa: E402

torch.set_num_threads(2)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache hits, no recompile limit carried over."""
    torch._dynamo.reset()
    yield
