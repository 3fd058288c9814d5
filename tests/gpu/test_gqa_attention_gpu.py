"""The grouped-query pass on CUDA: a compiled tiny model with SDPA reading unexpanded k/v trains
like eager (whichever kernel SDPA picks for enable_gqa)."""
import pytest
import torch

from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gqa_compiled_equals_eager_on_cuda(family):
    torch._dynamo.reset()
    model = tiny_model(family, layers=2, hidden=128, heads=8, kv_heads=2).cuda()
    batch = {k: v.cuda() for k, v in random_batch(seq=64).items()}
    report, eager, compiled = compiled_vs_eager(model, batch, options={"enable": ["gqa_attention"]})
    assert report.swaps.get("gqa_attention") == 2, str(report)
    assert_same_training_step(eager, compiled, rtol=2e-3, atol=2e-4)
