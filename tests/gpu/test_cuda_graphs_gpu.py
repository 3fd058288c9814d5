"""``mode="reduce-overhead"`` (CUDA graphs) through our backend: several optimizer steps give
eager's losses and final weights. Graph outputs are overwritten by the next replay, so the loop
clones the loss it keeps, as a user's loop must."""
import copy

import pytest
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import train_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def test_reduce_overhead_trains_like_eager():
    torch._dynamo.reset()
    base = tiny_model("llama", layers=2, hidden=128, heads=8, kv_heads=2).cuda()
    batches = [{k: v.cuda() for k, v in random_batch(seq=64, seed=s).items()} for s in range(4)]
    eager_model, ours = copy.deepcopy(base), copy.deepcopy(base)
    eager = train_losses(eager_model, batches, lr=1e-3)
    chronicals_compile.compile(ours, mode="reduce-overhead")
    compiled = train_losses(ours, batches, lr=1e-3, cuda_graphs=True)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-4)
    for (name, p), q in zip(ours.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")
