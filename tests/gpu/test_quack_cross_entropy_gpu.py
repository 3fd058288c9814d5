"""The cut cross-entropy with QuACK's row kernel (``rows="quack"``) against float64: loss, dh and dW
at real lm_head shapes, ragged chunks, ignored and out-of-range targets, both half dtypes, and the
op's deferred row weight; then a compiled bf16 model with ``CHRONICALS_CCE_ROWS=quack`` against
eager. Needs QuACK on the device: carry ``.qk`` as benchmarks/gpu_session.sh does."""
import math

import pytest
import torch

import chronicals_compile.ops  # noqa: F401
from chronicals_compile.kernels import linear_cross_entropy as k
from chronicals_compile.kernels import quack_cross_entropy
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_compiled_half_step_matches_float64
from chronicals_compile.verify import linear_cross_entropy as case
from chronicals_compile.verify.tolerance import assert_all_ok

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def test_quack_runs_here():
    """Not a skip: without QuACK the rest of this file would test our row kernel only."""
    assert quack_cross_entropy.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None


@pytest.fixture
def quack_calls(monkeypatch):
    """Counts the chunks QuACK's kernel took, so a silent fallback cannot pass for the QuACK path."""
    calls = []
    real = quack_cross_entropy.rows_in_place

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(quack_cross_entropy, "rows_in_place", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,hidden,vocab,chunk_rows,reduction", [
    (2048, 896, 151936, None, "mean"),   # Qwen2.5-0.5B's lm_head
    (1024, 4096, 128256, None, "mean"),  # Llama-3-8B's
    (1000, 896, 151936, 384, "sum"),     # ragged last chunk
    (1, 64, 4096, None, "mean"),         # one row
    (333, 96, 32000, 128, "mean"),
])
def test_matches_float64(quack_calls, tokens, hidden, vocab, chunk_rows, reduction, dtype):
    assert_all_ok(case.check(tokens=tokens, hidden=hidden, vocab=vocab, dtype=dtype, reduction=reduction,
                             ignore="some", mode="fused_quack", chunk_rows=chunk_rows, seed=vocab % 97,
                             device="cuda", dw_rows=16384))
    assert quack_calls, "QuACK's row kernel never ran"


@pytest.mark.parametrize("vocab", [4099, 32003, 32004])
def test_vocabularies_it_cannot_compile_stay_with_our_kernel(quack_calls, vocab):
    """Rows that are not a multiple of 16 bytes: QuACK's async copies failed to compile at 4099 and
    32003 (session 18), so they never reach it; the result is still right."""
    assert_all_ok(case.check(tokens=333, hidden=96, vocab=vocab, dtype=torch.bfloat16, ignore="some",
                             mode="fused_quack", chunk_rows=128, seed=1, device="cuda"))
    assert not quack_calls


@pytest.mark.parametrize("ignore", ["all", "in_vocab", "none"])
def test_ignored_rows(quack_calls, ignore):
    assert_all_ok(case.check(tokens=300, hidden=128, vocab=5000, dtype=torch.bfloat16, ignore=ignore,
                             mode="fused_quack", seed=3, device="cuda"))
    assert quack_calls


def test_options_it_cannot_compute_stay_with_our_kernel(quack_calls):
    assert_all_ok(case.check(tokens=257, hidden=128, vocab=5000, dtype=torch.bfloat16, label_smoothing=0.1,
                             softcap=3.0, scale=0.5, mode="fused_quack", seed=5, device="cuda"))
    assert not quack_calls


def test_out_of_range_target_gives_nan_not_a_crash(quack_calls):
    h, w, t, _ = case.make_inputs(64, 128, 1000, torch.bfloat16, "none", 1, "cuda")
    t[5] = 1000
    t[9] = -7
    loss, dh, dw = k.fused(h, w, t, rows="quack")
    torch.cuda.synchronize()
    assert quack_calls and math.isnan(float(loss))
    assert torch.isfinite(dh.float()).all() and torch.isfinite(dw.float()).all()


def test_same_as_our_row_kernel_at_the_training_shape(quack_calls):
    """Both row kernels against each other on the step's own call (16384 x 896 x 151936, five
    chunks): loss, dh and dW within the bf16 rounding of G."""
    h, w, t, _ = case.make_inputs(16384, 896, 151936, torch.bfloat16, "some", 11, "cuda")
    ours = k.fused(h, w, t, keep_fp32=True, defer_weight=True, rows="triton")
    theirs = k.fused(h, w, t, keep_fp32=True, defer_weight=True, rows="quack")
    assert quack_calls
    torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-5)
    assert float(ours[3]) == 1.0 and math.isclose(float(theirs[3]), 1.0 / int((t != -100).sum()), rel_tol=1e-6)
    for a, b in zip(theirs[1:3], ours[1:3]):
        a = a * theirs[3]
        err = (a - b).abs().max() / b.abs().max()
        assert err < 2e-2, float(err)


def test_compiled_bf16_model_matches_float64(monkeypatch, quack_calls):
    """Loss and every gradient of a compiled bf16 model whose loss takes QuACK's row kernel, against
    a float64 copy, within bf16 eager's own error of it plus the bf16 slack."""
    monkeypatch.setattr(k, "FUSED_ROWS", "quack")
    base = tiny_model("qwen2", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=704, vocab=4096).cuda()
    batch = {name: v.cuda() for name, v in random_batch(seq=128, vocab=4096).items()}
    assert_compiled_half_step_matches_float64(base, batch, swaps={"linear_cross_entropy": 1})
    assert quack_calls, "QuACK's row kernel never ran in the compiled step"
