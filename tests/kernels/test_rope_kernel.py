"""The QK-RoPE Triton kernel, interpreted on CPU, against float64 on q_out, k_out, dq and dk."""
import math

import pytest
import torch
from hypothesis import given

from chronicals_compile.verify import rope as case
from chronicals_compile.verify.tolerance import assert_all_ok, measure


@given(case.cases())
def test_matches_float64(params):
    assert_all_ok(case.check(**params))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_real_head_dims_with_gqa(head_dim):
    for dtype, cos_dtype in ((torch.bfloat16, "same"), (torch.bfloat16, "float32"), (torch.float16, "same"),
                             (torch.float32, "same")):
        assert_all_ok(case.check(batch=2, seq=3, kv_heads=2, group=7, head_dim=head_dim, dtype=dtype,
                                 cos_dtype=cos_dtype, layout="hf", seed=head_dim))


@pytest.mark.parametrize("layout", ["hf", "partial"])
def test_interleaved_pairs_glm(layout):
    """GLM's rotate_half pairs (2j, 2j + 1); partial: rotary on the first D of a wider head."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert_all_ok(case.check(batch=2, seq=5, kv_heads=2, group=3, head_dim=64, dtype=dtype, layout=layout,
                                 cos_kind="random", interleaved=True, seed=5))


def test_outputs_keep_the_input_layout():
    """No hidden copies: q as Dynamo records it (a transposed view) comes back in the same layout."""
    from chronicals_compile.kernels.rope import rope_forward

    q, k, cos, sin, *_ = case.make_inputs(2, 5, 2, 2, 16, torch.float32, layout="hf")
    q_out, k_out = rope_forward(q, k, cos, sin)
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


def test_mixed_precision_promotes_like_torch():
    """bf16 q with fp32 cos/sin: torch's q*cos is fp32, so ours must be fp32 too; grads are bf16."""
    from chronicals_compile.kernels.rope import rope_backward, rope_forward

    q, k, cos, sin, dq_out, dk_out = case.make_inputs(1, 4, 1, 2, 8, torch.bfloat16, cos_dtype="float32")
    q_out, k_out = rope_forward(q, k, cos, sin)
    ref_q, ref_k = case.torch_rope(q, k, cos, sin)
    assert q_out.dtype == ref_q.dtype == torch.float32 and k_out.dtype == torch.float32
    torch.testing.assert_close(q_out, ref_q)
    dq, dk = rope_backward(dq_out, dk_out, cos, sin, q.dtype, k.dtype)
    assert dq.dtype == dk.dtype == torch.bfloat16


def test_op_gradcheck_float64():
    """The registered autograd formula (CPU reference path) against finite differences."""
    import chronicals_compile.ops  # noqa: F401

    q, k, cos, sin, *_ = case.make_inputs(1, 3, 1, 2, 4, torch.float64, cos_kind="random")
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.chronicals.rope(a, b, cos, sin), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.chronicals.rope_interleaved(a, b, cos, sin), (q, k))


def test_op_refuses_to_differentiate_cos():
    import chronicals_compile.ops  # noqa: F401

    q, k, cos, sin, *_ = case.make_inputs(1, 3, 1, 2, 4, torch.float32)
    cos = cos.clone().requires_grad_(True)
    q_out, k_out = torch.ops.chronicals.rope(q, k, cos, sin)
    with pytest.raises(RuntimeError, match="cos/sin"):
        (q_out.sum() + k_out.sum()).backward()


def test_opcheck():
    import chronicals_compile.ops  # noqa: F401

    q, k, cos, sin, *_ = case.make_inputs(2, 3, 2, 2, 8, torch.bfloat16, cos_dtype="float32")
    for fused in (torch.ops.chronicals.rope, torch.ops.chronicals.rope_interleaved):
        torch.library.opcheck(fused.default,
                              (q.detach().requires_grad_(True), k.detach().requires_grad_(True), cos, sin))


def test_nan_and_inf_propagate_like_torch():
    from chronicals_compile.kernels.rope import rope_forward

    q, k, cos, sin, *_ = case.make_inputs(1, 4, 1, 2, 8, torch.float32)
    q[0, 1, 2, 3], k[0, 0, 1, 6] = math.nan, math.inf
    q_out, k_out = rope_forward(q, k, cos, sin)
    ref_q, ref_k = case.torch_rope(q.double(), k.double(), cos.double(), sin.double())
    assert torch.equal(torch.isnan(q_out), torch.isnan(ref_q))
    assert measure("q_out", q_out, q_out, ref_q).ok and measure("k_out", k_out, k_out, ref_k).ok


@pytest.mark.parametrize("interleaved", [False, True])
def test_32_and_64_bit_offsets_give_identical_results(interleaved):
    """The launcher picks 32-bit offsets where every address fits; both paths address the same
    elements, so forward and backward agree bit for bit (odd rows, GQA, non-contiguous q/k)."""
    inputs = case.make_inputs(3, 7, 2, 3, 16, torch.bfloat16, layout="hf", cos_kind="random")
    for narrow, wide in case.launches_side_by_side(inputs, {"index_64": False}, {"index_64": True}, interleaved):
        assert torch.equal(narrow[0], wide[0]) and torch.equal(narrow[1], wide[1])
        assert not narrow[0].isnan().any()


def test_64_bit_offsets_only_where_an_address_reaches_two_to_the_31():
    from chronicals_compile.kernels.rope import needs_int64

    # Qwen2.5-0.5B's q as Dynamo hands it: [8, 14, 2048, 64] viewing [8, 2048, 14, 64] (16 heads padded)
    qwen = (16, 127, 2048 * 896, 896, 64)
    assert not needs_int64(8 * 2048, 2048, 4, [qwen])
    # the same layout with 2**31 / (2048 * 896) + 1 sequences in the batch: its last row is past 2**31
    big_batch = 2**31 // (2048 * 896) + 1
    assert needs_int64(big_batch * 2048, 2048, 4, [qwen])
    # one sequence whose last position starts at 2**31 - 2**20: fits; a second sequence at 2**31: does not
    pos = 2**20
    assert not needs_int64(2**11, 2**11, 4, [(1, 0, 2**31, pos, 0)])
    assert needs_int64(2**11 + 1, 2**11, 1, [(1, 0, 2**31, pos, 0)])
    # no second sequence, but the last row block's padded lanes (2048 rows in blocks of 3) reach it
    assert needs_int64(2**11, 2**11, 3, [(1, 0, 2**31, pos, 0)])
    # the column a lane's pair reaches, and padded heads, count too
    assert needs_int64(2**11, 2**11, 4, [(1, 2**20, 0, pos, 0)])
    assert not needs_int64(2**11, 2**11, 4, [(1, 2**20 - 1, 0, pos, 0)])
    assert needs_int64(1, 1, 1, [(2**20 + 1, 0, 0, 0, 2**11)])
    assert not needs_int64(1, 1, 1, [(2**20, 0, 0, 0, 2**11)])
    # a symbolic size keeps 64 bits rather than guard on it
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    sym = ShapeEnv().create_unbacked_symint()
    assert needs_int64(sym, 2048, 4, [qwen])


def test_32_bit_offsets_and_row_blocks_per_tensor_shrink_the_hopper_code():
    """benchmarks/rope_sass.py compiled for sm_90 (no GPU needed). 32-bit offsets: each path runs
    the same loads and stores with fewer instructions. A row block per tensor: k's programs carry as
    many elements as q's, and the launch executes fewer instructions per element. A change that
    quietly widens the index math again, or shrinks k's tiles, shows here, not only as a slower
    kernel on the device."""
    import os
    import subprocess
    import sys

    from chronicals_compile.testing.cli_runner import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "rope_sass.py")], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {}
    for line in out.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:4])] = [float(c) for c in cells[4:]]
    assert len(rows) == 16
    programs, elements, instructions, ldg, stg, per_element = 0, 1, 2, -3, -2, -1
    for phase in ("fwd", "bwd"):
        for blocks in ("shared", "per-tensor"):
            for path in ("q", "k"):
                wide, narrow = rows[(phase, blocks, "64-bit", path)], rows[(phase, blocks, "32-bit", path)]
                assert (narrow[ldg], narrow[stg]) == (wide[ldg], wide[stg])
                assert narrow[instructions] < 0.85 * wide[instructions], (phase, blocks, path)
        shared_k, own_k = rows[(phase, "shared", "32-bit", "k")], rows[(phase, "per-tensor", "32-bit", "k")]
        own_q = rows[(phase, "per-tensor", "32-bit", "q")]
        assert shared_k[elements] == 512 and own_k[elements] == own_q[elements] == 4096
        assert own_k[programs] * 8 == shared_k[programs]
        assert own_k[per_element] < 0.9 * shared_k[per_element]


@pytest.mark.parametrize("interleaved", [False, True])
def test_row_block_per_tensor_and_shared_row_block_agree_bit_for_bit(interleaved):
    """k's own row block only regroups the same per-element arithmetic, so both tilings give the
    same bits; odd rows (the last block padded), GQA and non-contiguous q/k, forward and backward."""
    from chronicals_compile.kernels.rope import _blocks

    assert _blocks(14, 2, 32) == (4, 16, 4, 32, 2, 4, 32)  # Qwen2.5-0.5B: k's tile 32 rows x 2 heads
    assert _blocks(14, 2, 32, shared_rows=True)[3] == 4
    for bsz, seq, kv, group, d in ((3, 7, 2, 3, 16), (1, 37, 1, 14, 64), (2, 1, 4, 2, 32)):
        inputs = case.make_inputs(bsz, seq, kv, group, d, torch.bfloat16, layout="hf", cos_kind="random")
        for own, shared in case.launches_side_by_side(inputs, {}, {"shared_rows": True}, interleaved):
            assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
            assert not own[1].isnan().any()
