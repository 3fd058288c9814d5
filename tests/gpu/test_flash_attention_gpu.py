"""``chronicals::flash_attention`` on flash-attn-4's kernels against float64, output and every
gradient, and a compiled bf16 model whose attention it runs against eager. Needs FA4 on the
device: carry ``.qk`` (scripts/quack-wheels.sh) and unpack it as benchmarks/gpu_session.sh does."""
import copy

import pytest
import torch

import chronicals_compile
import chronicals_compile.ops  # noqa: F401
from chronicals_compile.kernels import flash_attention4
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.verify import flash_attention as case
from chronicals_compile.verify.tolerance import assert_all_ok, measure

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

    def step(model, compiled):
        model.zero_grad(set_to_none=True)
        if compiled:
            report = chronicals_compile.explain(model, **batch, options={"enable": ["flash_attention"]})
            assert report.swaps.get("flash_attention") == 2, str(report)
            loss = report.output.loss
        else:
            loss = model(**batch).loss
        loss.backward()
        return [loss.detach()] + [p.grad for _, p in sorted(model.named_parameters())]

    ref = step(copy.deepcopy(base).double(), False)
    same = step(copy.deepcopy(base).bfloat16(), False)
    torch._dynamo.reset()
    ours = step(copy.deepcopy(base).bfloat16(), True)
    names = ["loss"] + [n for n, _ in sorted(base.named_parameters())]
    assert any(g.abs().sum() > 0 for g in ours[1:])
    assert_all_ok([measure(n, o, s, r, dtype=torch.bfloat16, slack_scale=2.0) for n, o, s, r in zip(names, ours, same, ref)])
