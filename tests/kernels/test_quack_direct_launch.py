"""The direct launch of QuACK's gated GEMMs (``kernels/quack_direct_launch.py``) on the CPU: its views
equal the ones QuACK 0.3.0's public call builds (same shape, strides, dtype and address), and its
first-launch check keeps the direct path only when the outputs match bit for bit. The kernels
themselves run in tests/gpu/test_mlp_epilogue_gpu.py."""
from __future__ import annotations

import pytest
import torch

from chronicals_compile.kernels import quack_direct_launch as direct


class _Recorder:
    """Stands in for a compiled QuACK kernel: keeps the tensors it was called with."""

    def __init__(self):
        self.args = None

    def __call__(self, *args):
        self.args = args


class _Epilogue:
    def __init__(self, post, act, **kwargs):
        self.post = post


def _same_view(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert (ours.shape, ours.stride(), ours.dtype, ours.data_ptr()) == \
        (theirs.shape, theirs.stride(), theirs.dtype, theirs.data_ptr())


def _permuted(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 0)  # (L, rows, cols) -> (rows, cols, L), as QuACK's perm3d


@pytest.mark.parametrize("m,k,f", [(48, 16, 24), (7, 32, 40)])
def test_forward_views_are_quacks(m, k, f):
    x2, w1 = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(2 * f, k, dtype=torch.bfloat16)
    preact, postact = torch.empty(m, 2 * f, dtype=torch.bfloat16), torch.empty(m, f, dtype=torch.bfloat16)
    kernel = _Recorder()
    direct._forward_direct(direct._Launch(kernel, _Epilogue, None), x2, w1, preact, postact)
    a, b, d, c, epilogue, _, _ = kernel.args
    # QuACK: A.unsqueeze(0); B = (w1.t()).mT.unsqueeze(0); D, PostAct unsqueeze(0); then perm3d
    _same_view(a, _permuted(x2.unsqueeze(0)))
    _same_view(b, _permuted(w1.t().mT.unsqueeze(0)))
    _same_view(d, _permuted(preact.unsqueeze(0)))
    _same_view(epilogue.post, _permuted(postact.unsqueeze(0)))
    assert c is None


@pytest.mark.parametrize("m,h,f", [(48, 16, 24), (9, 8, 64)])
def test_backward_views_are_quacks(m, h, f):
    dy2, w_down = torch.randn(m, h, dtype=torch.bfloat16), torch.randn(h, f, dtype=torch.bfloat16)
    preact = torch.randn(m, 2 * f, dtype=torch.bfloat16)
    dpreact, postact = torch.empty(m, 2 * f, dtype=torch.bfloat16), torch.empty(m, f, dtype=torch.bfloat16)
    kernel = _Recorder()
    launch = direct._Launch(kernel, _Epilogue, lambda clusters, swizzle, sem: (clusters, swizzle, sem), 132, 8)
    direct._backward_direct(launch, dy2, w_down, preact, dpreact, postact)
    a, b, out, pre, epilogue, scheduler, _ = kernel.args
    # QuACK (swap_ab): A, B swapped; D, PreAct, PostAct transposed; the dgated pairs read as fp32
    swapped_a, swapped_b = w_down.mT.unsqueeze(0), dy2.unsqueeze(0)
    out_q = dpreact.unsqueeze(0).mT.mT.view(torch.float32).mT
    pre_q = preact.unsqueeze(0).mT.mT.view(torch.float32).mT
    _same_view(a, _permuted(swapped_a))
    _same_view(b, _permuted(swapped_b))
    _same_view(out, _permuted(out_q))
    _same_view(pre, _permuted(pre_q))
    _same_view(epilogue.post, _permuted(postact.unsqueeze(0).mT))
    assert scheduler[:2] == (132, 8) and scheduler[2].dtype == torch.int32 and int(scheduler[2]) == 0


def _run_first(direct_writes, raises=False):
    out = torch.empty(5)
    key = ("test", torch.float32, "swiglu", None)
    direct._LAUNCHES.pop(key, None)
    public_calls = []

    def public():
        public_calls.append(1)
        out.copy_(torch.arange(5.0))

    def run_direct(launch):
        if raises:
            raise RuntimeError("no such kernel")
        out.copy_(direct_writes)

    direct._first_launch(key, lambda: direct._Launch(_Recorder(), _Epilogue, None), run_direct, public, (out,))
    return direct._LAUNCHES.pop(key), out, len(public_calls)


def test_first_launch_keeps_a_matching_direct_path():
    launch, out, public_calls = _run_first(torch.arange(5.0))
    assert isinstance(launch, direct._Launch) and public_calls == 1
    assert torch.equal(out, torch.arange(5.0))


@pytest.mark.parametrize("writes", [torch.arange(5.0) + 1e-6, torch.full((5,), float("nan"))])
def test_first_launch_falls_back_when_outputs_differ(writes):
    launch, out, public_calls = _run_first(writes)
    assert launch is None and public_calls == 2  # the public call's outputs are restored
    assert torch.equal(out, torch.arange(5.0))


def test_first_launch_falls_back_when_the_lookup_fails():
    launch, out, public_calls = _run_first(torch.arange(5.0), raises=True)
    assert launch is None and public_calls == 2
    assert torch.equal(out, torch.arange(5.0))


def test_non_contiguous_inputs_take_the_public_call():
    x2 = torch.randn(16, 8).t()  # a view QuACK's call handles and our strided views would misread
    calls = []
    direct.gated_forward(x2, torch.randn(8, 16), torch.empty(8, 8), torch.empty(8, 4), "swiglu", None,
                         lambda: calls.append("public"))
    assert calls == ["public"]


@pytest.mark.parametrize("value,stages", [(None, 4), ("6", 6), ("quack", None), (" Quack ", None)])
def test_dgated_c_stages_setting(value, stages, monkeypatch):
    from chronicals_compile.kernels import quack_dgated_prefetch

    if value is None:
        monkeypatch.delenv("CHRONICALS_QUACK_DGATED_C_STAGES", raising=False)
    else:
        monkeypatch.setenv("CHRONICALS_QUACK_DGATED_C_STAGES", value)
    assert quack_dgated_prefetch.c_stages() == stages


@pytest.mark.parametrize("value", ["0", "four", "-2"])
def test_bad_dgated_c_stages_setting_names_the_variable(value, monkeypatch):
    from chronicals_compile.kernels import quack_dgated_prefetch

    monkeypatch.setenv("CHRONICALS_QUACK_DGATED_C_STAGES", value)
    with pytest.raises(ValueError, match="CHRONICALS_QUACK_DGATED_C_STAGES"):
        quack_dgated_prefetch.c_stages()


def test_deep_c_prefetch_refuses_other_than_hopper():
    """sm100 keeps QuACK's own kernel (the direct launch asks only on capability 9); asked anyway,
    the compile says why instead of building a Hopper kernel there."""
    from chronicals_compile.kernels import quack_dgated_prefetch

    with pytest.raises(ValueError, match="Hopper"):
        quack_dgated_prefetch.compile_dgated(None, None, "swiglu", None, (10, 0), 4)


@pytest.mark.parametrize("name,cluster", [("NVIDIA H100 80GB HBM3", (2, 1)), ("NVIDIA H100 PCIe", (2, 1)),
                                          ("NVIDIA H200", (1, 2)), ("NVIDIA B200", (1, 2))])
def test_backward_cluster_follows_the_gpu(name, cluster, monkeypatch):
    """The MLP backward's tile cluster by GPU, as measured: 2 x 1 on the H100 (session 23), 1 x 2,
    the H200's autotuned choice (session 12), elsewhere."""
    from chronicals_compile.kernels import quack_gated_gemm

    monkeypatch.delenv("CHRONICALS_QUACK_DGATED_CLUSTER", raising=False)
    assert quack_gated_gemm.backward_cluster(name) == cluster


@pytest.mark.parametrize("value,cluster", [("1x2", (1, 2)), (" 2X1 ", (2, 1))])
def test_backward_cluster_setting_overrides_the_table(value, cluster, monkeypatch):
    from chronicals_compile.kernels import quack_gated_gemm

    monkeypatch.setenv("CHRONICALS_QUACK_DGATED_CLUSTER", value)
    assert quack_gated_gemm.backward_cluster("NVIDIA H100 80GB HBM3") == cluster
    assert quack_gated_gemm.backward_cluster("NVIDIA H200") == cluster


@pytest.mark.parametrize("value", ["2x2", "1", "wide"])
def test_bad_backward_cluster_setting_names_the_variable(value, monkeypatch):
    from chronicals_compile.kernels import quack_gated_gemm

    monkeypatch.setenv("CHRONICALS_QUACK_DGATED_CLUSTER", value)
    with pytest.raises(ValueError, match="CHRONICALS_QUACK_DGATED_CLUSTER"):
        quack_gated_gemm.backward_cluster("NVIDIA H100 80GB HBM3")
