"""``chronicals::gated_mlp`` on QuACK's epilogue GEMMs against float64, output and every gradient,
and a compiled bf16 model whose MLPs it runs against eager. Needs QuACK on the device: carry
``.qk`` (scripts/quack-wheels.sh) and unpack it as benchmarks/gpu_session.sh does."""

import pytest
import torch

import chronicals_compile.ops  # noqa: F401
from chronicals_compile.kernels import quack_gated_gemm
from chronicals_compile.verify import gated_mlp as gated_mlp_case
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_compiled_half_step_matches_float64
from chronicals_compile.verify.tolerance import assert_all_ok

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (tests/gpu)")


def test_quack_runs_here():
    """Not a skip: without QuACK the rest of this file would test the torch path only."""
    assert quack_gated_gemm.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None


def _check(shape, f, dtype, activation, **kw):
    return gated_mlp_case.check(shape, f, dtype, activation, device="cuda", **kw)


@pytest.mark.parametrize("activation", quack_gated_gemm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,f", [((4096, 896), 4864), ((2, 999, 896), 4864), ((1, 64), 96), ((37, 128), 352),
                                     ((3, 517, 1024), 2816)],
                         ids=["qwen0.5b", "odd-rows-3d", "one-row", "ragged-tiles", "wide"])
def test_matches_float64(shape, f, dtype, activation):
    assert_all_ok(_check(shape, f, dtype, activation))


def test_non_contiguous_input():
    assert_all_ok(_check((2, 200, 256), 512, torch.bfloat16, "swiglu", transposed_x=True))


def test_frozen_weights_get_no_gradient():
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(256, 128, device="cuda", dtype=torch.bfloat16), torch.randn(256, 128, device="cuda", dtype=torch.bfloat16),
          torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)]
    y, *_ = torch.ops.chronicals.gated_mlp(x, *ws, "swiglu")
    y.sum().backward()
    assert ws[0].grad is None and ws[1].grad is None
    assert x.grad is not None and ws[2].grad is not None and x.grad.abs().sum() > 0


def test_kept_weight_gives_the_same_bits_on_quack():
    """``keep_weight`` (``chronicals.mlp_keep_weight``): the backward's input gradient GEMM reads
    the forward's interleaved weight instead of a new interleave; every output is bit-identical."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 999, 896, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [torch.randn(4864, 896, device="cuda", dtype=torch.bfloat16, generator=gen) / 30,
          torch.randn(4864, 896, device="cuda", dtype=torch.bfloat16, generator=gen) / 30,
          torch.randn(896, 4864, device="cuda", dtype=torch.bfloat16, generator=gen) / 70]
    dy = torch.randn_like(x)
    results = []
    for keep in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *ws)]
        y, _, w1 = torch.ops.chronicals.gated_mlp(*leaves, "swiglu", keep)
        assert w1.numel() == (2 * 4864 * 896 if keep else 0)
        results.append([y, *torch.autograd.grad(y, leaves, dy)])
    for got, want in zip(*results):
        assert torch.isfinite(got).all() and torch.equal(got, want)


def test_compiled_bf16_model_trains_like_eager():
    """Loss and every gradient of the compiled bf16 model (QuACK MLPs, and the other passes)
    against a float64 copy, within bf16 eager's own error of it plus the bf16 slack."""
    base = tiny_model("qwen2", layers=2, hidden=256, heads=4, kv_heads=2, intermediate=704, vocab=512).cuda()
    batch = {k: v.cuda() for k, v in random_batch(seq=128, vocab=512).items()}
    assert_compiled_half_step_matches_float64(base, batch, swaps={"mlp_epilogue": 2}, options=None)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_direct_launch_is_kept_and_matches_the_public_call(dtype, monkeypatch):
    """The direct launch (kernels/quack_direct_launch.py) passed its first-launch comparison with
    QuACK's public call for both GEMMs, and later calls still agree with it bit for bit."""
    from chronicals_compile.kernels import quack_dgated_prefetch, quack_direct_launch

    x = torch.randn(1000, 256, device="cuda", dtype=dtype)
    wg, wu = (torch.randn(512, 256, device="cuda", dtype=dtype) * 0.05 for _ in range(2))
    wd = torch.randn(256, 512, device="cuda", dtype=dtype) * 0.05
    dy = torch.randn(1000, 256, device="cuda", dtype=dtype)
    w1 = torch.stack([wg, wu], dim=1).reshape(1024, 256)
    for _ in range(2):  # the first call decides, the second runs the direct path alone
        preact, postact = quack_gated_gemm.gated_forward(x, w1, "swiglu")
        dpre, post_b = quack_gated_gemm.gated_backward(dy, wd, preact, "swiglu")
    for kind in ("forward", "backward"):
        assert isinstance(quack_direct_launch._LAUNCHES.get((kind, dtype, "swiglu", x.device.index)),
                          quack_direct_launch._Launch), kind
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: the backward runs the deeper C prefetch
        backward = quack_direct_launch._LAUNCHES[("backward", dtype, "swiglu", x.device.index)]
        assert backward.c_stages == quack_dgated_prefetch.DEFAULT_C_STAGES
    monkeypatch.setenv("CHRONICALS_QUACK_LAUNCH", "public")
    preact_p, postact_p = quack_gated_gemm.gated_forward(x, w1, "swiglu")
    dpre_p, post_bp = quack_gated_gemm.gated_backward(dy, wd, preact_p, "swiglu")
    for ours, theirs in ((preact, preact_p), (postact, postact_p), (dpre, dpre_p), (post_b, post_bp)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cluster", ["1x2", "2x1"])
def test_each_backward_cluster_matches_float64(cluster, monkeypatch):
    """Both thread-block clusters the backward tile takes by GPU (``backward_cluster``: 1 x 2 on the
    H200, 2 x 1 on the H100) give d(preact) and the recomputed h of float64 math, through the direct
    launch with its deep C prefetch, and agree with each other bit for bit (a cluster shares loads
    between CTAs; it does not change any tile's arithmetic)."""
    from chronicals_compile.kernels import quack_direct_launch
    from chronicals_compile.ops.gated_mlp import _dpreact_reference

    torch.manual_seed(0)
    dy = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    preact = torch.randn(1000, 1024, device="cuda", dtype=torch.bfloat16)
    want_dpre, want_h = _dpreact_reference(dy.double() @ wd.double(), preact.double(), "swiglu")
    results = {}
    for setting in (cluster, "2x1" if cluster == "1x2" else "1x2"):
        monkeypatch.setenv("CHRONICALS_QUACK_DGATED_CLUSTER", setting)
        quack_gated_gemm._backward_config.cache_clear()
        quack_direct_launch._LAUNCHES.clear()
        try:
            config = quack_gated_gemm._backward_config(dy.device)
            assert f"{config.cluster_m}x{config.cluster_n}" == setting
            results[setting] = quack_gated_gemm.gated_backward(dy, wd, preact, "swiglu")
        finally:
            quack_gated_gemm._backward_config.cache_clear()
            quack_direct_launch._LAUNCHES.clear()
    dpre, h = results[cluster]
    # bf16 outputs of fp32 math: one bf16 rounding (2^-8 relative) on values of order 1
    for got, want in ((dpre, want_dpre), (h, want_h)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max().item() <= 2 ** -8 * (want.abs().max().item() + 1)
    for got, other in zip(results["1x2"], results["2x1"]):
        assert torch.equal(got, other)
