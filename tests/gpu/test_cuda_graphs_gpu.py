"""``mode="reduce-overhead"`` (CUDA graphs) through our backend: several optimizer steps give
eager's losses and final weights. Graph outputs are overwritten by the next replay, so the loop
clones the loss it keeps, as a user's loop must."""
import copy

import pytest
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def _train(model, batches, compiled: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return torch.stack(losses)


def test_reduce_overhead_trains_like_eager():
    torch._dynamo.reset()
    base = tiny_model("llama", layers=2, hidden=128, heads=8, kv_heads=2).cuda()
    batches = [{k: v.cuda() for k, v in random_batch(seq=64, seed=s).items()} for s in range(4)]
    eager_model, ours = copy.deepcopy(base), copy.deepcopy(base)
    eager = _train(eager_model, batches, compiled=False)
    chronicals_compile.compile(ours, mode="reduce-overhead")
    compiled = _train(ours, batches, compiled=True)
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=2e-3, atol=2e-4)
    for (name, p), q in zip(ours.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")
