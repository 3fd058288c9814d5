"""``chronicals::flash_attention`` on flash-attn-4's kernels against float64, output and every
gradient, and a compiled bf16 model whose attention it runs against eager. Needs FA4 on the
device: carry ``.qk`` (scripts/quack-wheels.sh) and unpack it as benchmarks/gpu_session.sh does."""

import pytest
import torch

import chronicals_compile.ops  # noqa: F401
from chronicals_compile.kernels import flash_attention4
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_compiled_half_step_matches_float64
from chronicals_compile.verify import flash_attention as case
from chronicals_compile.verify.tolerance import assert_all_ok

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def test_fa4_runs_here():
    """Not a skip: without FA4 the rest of this file would test the portable path only."""
    assert flash_attention4.unavailable_reason(torch.device("cuda"), torch.bfloat16, 64) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 1024, 14, 2, 64), (1, 777, 8, 8, 128), (3, 1, 4, 2, 64), (2, 200, 6, 3, 32)],
                         ids=["qwen0.5b-heads", "odd-length-mha-128", "one-token", "ragged-tiles-d32"])
def test_matches_float64(shape, dtype):
    assert_all_ok(case.check(*shape, dtype, device="cuda"))


def test_explicit_scale():
    assert_all_ok(case.check(1, 300, 4, 2, 64, torch.bfloat16, device="cuda", scale=0.2))


def test_compiled_bf16_model_trains_like_eager():
    """Loss and every gradient of the compiled bf16 model (FA4 attention, and the other passes)
    against a float64 copy, within bf16 eager's own error of it plus the bf16 slack."""
    base = tiny_model("qwen2", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=704, vocab=512).cuda()
    batch = {k: v.cuda() for k, v in random_batch(seq=128, vocab=512).items()}
    assert_compiled_half_step_matches_float64(base, batch, swaps={"flash_attention": 2}, options={"enable": ["flash_attention"]})