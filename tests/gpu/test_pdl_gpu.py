"""Programmatic Dependent Launch (Inductor's ``triton.enable_pdl``) through our backend.

PDL changes when a kernel may start, never what it computes: a kernel launched early waits on the
GPU (``gdc_wait``) before it touches what the kernel before it wrote. So a compiled training run
with it must give the very bits of the same compile without it, loss and weights, step after step;
a missing wait would show up as a race, i.e. different bits. The generated code is checked to hold
the waits, so the comparison cannot pass because the switch did nothing.
"""
import copy

import pytest
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import train_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="CUDA sm90+ only (tests/gpu)")


def _train(base, batches, options):
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    chronicals_compile.compile(model, **options)
    from torch._inductor.utils import run_and_get_code

    losses, codes = run_and_get_code(train_losses, model, batches, lr=1e-3)
    return losses, model, "\n".join(codes)


def test_pdl_trains_bit_equal_to_the_same_compile_without_it():
    torch.manual_seed(0)
    base = tiny_model("qwen2", layers=2, hidden=256, heads=8, kv_heads=2).cuda().to(torch.bfloat16)
    batches = [{k: v.cuda() for k, v in random_batch(batch=4, seq=128, seed=s).items()} for s in range(6)]
    # no on-device autotuning that could pick other reduction configs (other rounding) per compile
    fixed = {"deterministic": True} if hasattr(torch._inductor.config, "deterministic") else {}
    plain, plain_model, plain_code = _train(base, batches, fixed)
    pdl, pdl_model, pdl_code = _train(base, batches, {**fixed, "chronicals.pdl": True})
    assert "gdc_wait" not in plain_code
    assert "gdc_wait" in pdl_code, "enable_pdl generated no waits: the comparison would prove nothing"
    assert torch.isfinite(pdl).all()
    assert torch.equal(pdl, plain), (pdl, plain)
    for (name, p), q in zip(pdl_model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p, q), name
    eager_model = copy.deepcopy(base)
    eager = train_losses(eager_model, batches, lr=1e-3)
    torch.testing.assert_close(pdl, eager, rtol=2e-2, atol=2e-2)  # bf16 step to step
