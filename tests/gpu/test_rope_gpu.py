"""QK-RoPE on the GPU at real shapes: the one-launch Triton kernel against float64, the op through
torch.compile, and a bf16 tiny-model step through the backend (swaps counted, loss like eager)."""
import pytest
import torch

from chronicals_compile.verify import rope as case
from chronicals_compile.verify.tolerance import assert_all_ok

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (batch, seq, kv_heads, group, head_dim): Qwen2.5-0.5B (14 q / 2 kv heads, D=64), Llama-3-8B
# (32 / 8, D=128), and the other head dims transformers models use.
SHAPES = [(8, 2048, 2, 7, 64), (8, 2048, 8, 4, 128), (2, 1024, 4, 4, 80), (2, 1024, 2, 8, 96),
          (1, 512, 1, 8, 256), (3, 77, 2, 2, 64)]


@pytest.mark.parametrize("batch,seq,kv_heads,group,head_dim", SHAPES)
@pytest.mark.parametrize("dtype,cos_dtype", [(torch.bfloat16, "same"), (torch.bfloat16, "float32"),
                                             (torch.float16, "same"), (torch.float32, "same")])
def test_kernel_matches_float64(batch, seq, kv_heads, group, head_dim, dtype, cos_dtype):
    assert_all_ok(case.check(batch=batch, seq=seq, kv_heads=kv_heads, group=group, head_dim=head_dim,
                             dtype=dtype, cos_dtype=cos_dtype, layout="hf", cos_batch=True,
                             seed=seq + head_dim, device="cuda"))


@pytest.mark.parametrize("layout", ["contiguous", "partial"])
def test_other_layouts(layout):
    assert_all_ok(case.check(batch=4, seq=1024, kv_heads=2, group=7, head_dim=64, dtype=torch.bfloat16,
                             layout=layout, cos_kind="random", seed=5, device="cuda"))


@pytest.mark.parametrize("layout", ["hf", "partial"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_interleaved_pairs_glm(layout, dtype):
    """GLM's rotate_half (pairs 2j, 2j + 1), GLM-4's shape: 32 q / 2 kv heads, D=128, half rotary."""
    assert_all_ok(case.check(batch=2, seq=2048, kv_heads=2, group=16, head_dim=128, dtype=dtype, layout=layout,
                             cos_kind="random", interleaved=True, seed=9, device="cuda"))


@pytest.mark.parametrize("batch,seq,kv_heads,group,head_dim", SHAPES[:2])
def test_32_and_64_bit_offsets_agree_bit_for_bit(batch, seq, kv_heads, group, head_dim):
    """The launcher's 32-bit offsets (every real shape here) against the 64-bit kernel, forward and
    backward, on the GPU's own code: the same elements addressed, the same bits out."""
    inputs = case.make_inputs(batch, seq, kv_heads, group, head_dim, torch.bfloat16, layout="hf", device="cuda")
    for narrow, wide in case.launches_side_by_side(inputs, {"index_64": False}, {"index_64": True}):
        assert torch.equal(narrow[0], wide[0]) and torch.equal(narrow[1], wide[1])


@pytest.mark.parametrize("batch,seq,kv_heads,group,head_dim", SHAPES[:2])
def test_row_block_per_tensor_agrees_with_the_shared_row_block(batch, seq, kv_heads, group, head_dim):
    """k in its own row block (session 29) against k in q's (the kernel before), both with the
    launcher's offset width, forward and backward: the same bits out."""
    inputs = case.make_inputs(batch, seq, kv_heads, group, head_dim, torch.bfloat16, layout="hf", device="cuda",
                              seed=3)
    for own, shared in case.launches_side_by_side(inputs, {}, {"shared_rows": True}):
        assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])


def test_op_through_compile_matches_reference():
    import chronicals_compile.ops  # noqa: F401

    q, k, cos, sin, *_ = case.make_inputs(4, 512, 2, 7, 64, torch.bfloat16, device="cuda")
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    q_out, k_out = torch.compile(lambda a, b: torch.ops.chronicals.rope(a, b, cos, sin))(q, k)
    ref_q, ref_k = case.torch_rope(q.double(), k.double(), cos.double(), sin.double())
    assert q_out.dtype == torch.bfloat16
    assert (q_out.double() - ref_q).abs().max() < 0.05 and (k_out.double() - ref_k).abs().max() < 0.05
    (q_out.float().sum() + k_out.float().sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_bf16_tiny_model_step_through_the_backend():
    from chronicals_compile.testing import random_batch, tiny_model
    from chronicals_compile.testing.equivalence import compiled_vs_eager

    model = tiny_model("qwen2", layers=2, hidden=128, heads=4, kv_heads=2, intermediate=352,
                       dtype=torch.bfloat16).cuda()
    batch = {k: v.cuda() for k, v in random_batch(batch=2, seq=64).items()}
    report, (loss_e, grads_e), (loss_c, grads_c) = compiled_vs_eager(
        # our swiglu kernel, not QuACK's epilogue GEMMs, which take the MLP first where they import
        model, batch, options={"enable": ["rope", "swiglu", "rms_norm"], "disable": ["mlp_epilogue"]})
    assert report.swaps.get("rope") == 2 and report.swaps.get("swiglu") == 2, str(report)
    assert abs(loss_c.item() - loss_e.item()) <= 2e-2 * abs(loss_e.item())
    for name, ge in grads_e.items():
        gc = grads_c[name]
        assert torch.isfinite(gc).all(), name
        rel = (gc.float() - ge.float()).norm() / ge.float().norm().clamp_min(1e-6)
        assert rel < 5e-2, (name, float(rel))


def test_inductor_launches_the_kernel_itself_forward_and_backward():
    """The ops are ``triton_op``s: Inductor's wrapper launches ``_rope_kernel`` (no opaque call
    through the dispatcher, whose host cost left the H200 idle after each layer's rope), and the
    gradients still equal the float64 rotation's."""
    import chronicals_compile.ops  # noqa: F401
    from torch._inductor.utils import run_and_get_code

    q, k, cos, sin, *_ = case.make_inputs(2, 256, 2, 7, 64, torch.bfloat16, device="cuda")
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    fn = torch.compile(lambda a, b: torch.ops.chronicals.rope(a, b, cos, sin))

    def step():
        q_out, k_out = fn(q, k)
        torch.autograd.backward((q_out, k_out), (gq, gk))
        return q_out, k_out

    (q_out, k_out), codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert code.count("_rope_kernel") >= 2, "Inductor did not launch the rope kernel itself"
    assert "torch.ops.chronicals.rope" not in code, "the rope op is still called opaquely"
    qd, kd = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    ref_q, ref_k = case.torch_rope(qd, kd, cos.double(), sin.double())
    torch.autograd.backward((ref_q, ref_k), (gq.double(), gk.double()))
    for got, ref in ((q_out, ref_q), (k_out, ref_k), (q.grad, qd.grad), (k.grad, kd.grad)):
        assert torch.isfinite(got).all()
        assert (got.double() - ref.detach()).abs().max() < 0.05 * ref.detach().abs().max().clamp_min(1.0)
