"""Linears on one input run as one GEMM: q/k/v and gate/up of every layer (and LoRA's adapters,
apart from the frozen base weights), training equal to eager, the concatenated weights rebuilt in
backward rather than held, and what cannot share a GEMM left alone with a reason."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import chronicals_compile
from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager, loss_and_grads
from chronicals_compile.report import collecting as report_collecting
from chronicals_compile.testing.saved import held_bytes

LAYERS = 2
ON = {"enable": ["concat_linear"]}


@pytest.mark.parametrize("family", ["qwen2", "llama"], ids=["qwen2-qkv-bias", "llama-no-bias"])
def test_projections_fused_and_training_unchanged(family):
    report, eager, compiled = compiled_vs_eager(tiny_model(family, layers=LAYERS), random_batch(seq=12),
                                                options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == LAYERS, str(report)  # q/k/v (gate/up: too wide to pay)
    assert report.swaps.get("linear_cross_entropy") == 1, str(report)
    assert report.swaps.get("gate_recompute") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_inductor_step_equal_and_weights_not_held_for_backward(kv_heads):
    """Through Inductor with every kernel of ours on: same loss and gradients as eager, and the
    forward holds no more for backward than without the pass, counted by storage (the
    concatenated weights are rebuilt from the parameters in backward, and attention's saved v is
    a copy: as a view it held the whole q/k/v buffer, 0.75 GiB at Qwen0.5B 8x2048)."""
    base = tiny_model("qwen2", layers=LAYERS, kv_heads=kv_heads)
    batch = random_batch(seq=24)
    eager = loss_and_grads(copy.deepcopy(base), batch)
    held = {}
    for label, enable in (("on", ["concat_linear", "rms_norm", "swiglu", "rope"]), ("off", ["rms_norm", "swiglu", "rope"])):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        report = chronicals_compile.explain(model, options={"enable": enable}, **batch)
        assert report.swaps.get("concat_linear", 0) == (LAYERS if label == "on" else 0), str(report)
        held[label] = held_bytes(report.output.loss, model.parameters())
        report.output.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same_training_step(eager, (report.output.loss.detach(), grads))
    assert held["on"] <= held["off"], held


def test_lora_adapters_fused_apart_from_frozen_base_weights():
    model = with_lora(tiny_model("llama", layers=LAYERS))
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={**ON, "compiler": "aot_eager"})
    # per layer: frozen q/k/v, their lora_A, gate/up's lora_A (frozen gate/up: too wide to pay)
    assert report.swaps.get("concat_linear") == 3 * LAYERS, str(report)
    assert_same_training_step(eager, compiled)
    assert all(n in compiled[1] for n in eager[1]) and eager[1], "every LoRA weight has its gradient"


class _Heads(torch.nn.Module):
    """Three linears on one input; ``frozen``/``bias`` make them disagree on what a GEMM shares."""

    def __init__(self, frozen=(), bias=(True, True, True), cast=False):
        super().__init__()
        self.cast = cast
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, n, bias=b) for n, b in zip((5, 3, 7), bias))
        for i in frozen:
            self.heads[i].requires_grad_(False)

    def forward(self, x):
        outs = [h(x.to(x.dtype) if self.cast else x) for h in self.heads]
        return sum((o * o).sum() for o in outs) + F.silu(outs[0]).mean()


def _grads(module, x):
    x = x.clone().requires_grad_(True)
    loss = module(x)
    loss.backward()
    params = {n.removeprefix("_orig_mod."): p for n, p in module.named_parameters()}
    return loss.detach(), {"x": x.grad, **{n: p.grad for n, p in params.items() if p.grad is not None}}


@pytest.mark.parametrize("kwargs,swaps", [
    ({}, 1),
    ({"cast": True}, 1),  # peft casts each adapter's input to the dtype it already has
    ({"frozen": (1,)}, 1),  # the two trainable ones share a GEMM, the frozen one stays apart
    ({"frozen": (0, 1)}, 1),  # frozen ones share one too (no weight gradient for either)
    ({"frozen": (0,), "bias": (True, True, False)}, 0),
    ({"bias": (True, False, True)}, 1),
    ({"bias": (True, False, False)}, 1),
], ids=["three", "through-cast", "one-frozen", "two-frozen", "none-alike", "mixed-bias", "mixed-bias-2"])
def test_grouping_and_gradients(kwargs, swaps):
    torch.manual_seed(0)
    module = _Heads(**kwargs)
    x = torch.randn(4, 6, 8)
    want = _grads(module, x)
    report = chronicals_compile.explain(copy.deepcopy(module), x, options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear", 0) == swaps, str(report)
    torch._dynamo.reset()
    options = {"chronicals.enable": ["concat_linear"], "chronicals.compiler": "aot_eager"}
    got = _grads(torch.compile(copy.deepcopy(module), backend="chronicals", options=options), x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)


class _NormThenHeads(torch.nn.Module):
    """``normed.type_as(x)`` then two linears: ``x`` is only the dtype's name there, so the
    linears' shared input is the normed value, never ``x`` (Gemma's RMSNorm ends this way)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)

    def forward(self, x):
        h = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)
        return self.a(h).sum() + (self.b(h) ** 2).sum()


def test_type_as_names_a_dtype_not_the_shared_input():
    torch.manual_seed(0)
    module = _NormThenHeads()
    x = torch.randn(3, 5, 8) * 3
    want = _grads(module, x)
    report = chronicals_compile.explain(copy.deepcopy(module), x, options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == 1, str(report)
    options = {"chronicals.enable": ["concat_linear"], "chronicals.compiler": "aot_eager"}
    got = _grads(torch.compile(copy.deepcopy(module), backend="chronicals", options=options), x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)


class _Regimes(torch.nn.Module):
    """Linears on one input under different autocast / grad modes must not share a GEMM."""

    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 4) for _ in range(4))

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = self.heads[0](x), self.heads[1](x)  # these two alike
            with torch.autocast("cpu", enabled=False):
                c = self.heads[2](x)  # fp32
        d = self.heads[3](x)  # fp32, outside autocast
        return (a.float() * b.float()).sum() + (c * d).sum()


def test_autocast_regions_are_respected():
    torch.manual_seed(0)
    module = _Regimes()
    x = torch.randn(3, 5, 8)
    want = _grads(module, x)
    report = chronicals_compile.explain(copy.deepcopy(module), x, options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == 1, str(report)  # heads 0 and 1 only
    options = {"chronicals.enable": ["concat_linear"], "chronicals.compiler": "aot_eager"}
    got = _grads(torch.compile(copy.deepcopy(module), backend="chronicals", options=options), x)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        # fp32 heads exactly; the bf16 pair (and x, which sums all four) to bf16 rounding: one GEMM
        # rounds the pair's input gradient once where eager rounds each and adds
        bf16 = name == "x" or name.startswith(("heads.0", "heads.1"))
        tol = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(got[1][name], want[1][name], **tol, msg=name)


class _Tricky(torch.nn.Module):
    """What a column slice of a wider GEMM output must survive, or be refused for."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6)

    def forward(self, x):
        if self.kind == "inplace-output":  # peft's result += ... on a fused projection
            q, k = self.a(x), self.b(x)
            q.mul_(2.0)
            return (q * q).sum() + k.sum()
        if self.kind == "inplace-between":  # conservatively refused: any in-place op between them
            q = self.a(x)
            q.mul_(2.0)
            return (q * q).sum() + self.b(x).sum()
        if self.kind == "flat-view":  # a view merging the sliced dimension
            return (self.a(x).view(-1) ** 2).sum() + self.b(x).sum()
        if self.kind == "head-view":  # HF's q.view(*input_shape, -1, head_dim): allowed
            return (self.a(x).view(*x.shape[:-1], 2, 2).transpose(-1, -2) ** 2).sum() + self.b(x).sum()
        if self.kind == "mutation-between":  # the second linear reads the mutated input
            h = x * 1.0
            q = self.a(h)
            h.add_(1.0)
            return (q * q).sum() + self.b(h).sum()
        if self.kind == "inference-mode":
            q = self.a(x)
            with torch.inference_mode():
                k = self.b(x)
            return (q * q).sum() + k.sum()
        raise AssertionError(self.kind)


@pytest.mark.parametrize("kind,swaps", [("inplace-output", 1), ("inplace-between", 0), ("flat-view", 0), ("head-view", 1),
                                        ("mutation-between", 0), ("inference-mode", 0)])
def test_what_a_slice_must_survive(kind, swaps):
    torch.manual_seed(0)
    module = _Tricky(kind)
    x = torch.randn(3, 5, 8)
    grad_free = kind == "mutation-between"  # eager raises on the mutated leaf-like input otherwise
    with torch.no_grad() if grad_free else contextlib.nullcontext():
        want = module(x) if grad_free else _grads(module, x)
    torch._dynamo.reset()
    options = {"chronicals.enable": ["concat_linear"], "chronicals.compiler": "aot_eager"}
    compiled = torch.compile(copy.deepcopy(module), backend="chronicals", options=options)
    with report_collecting() as report:
        with torch.no_grad() if grad_free else contextlib.nullcontext():
            got = compiled(x) if grad_free else _grads(compiled, x)
    assert report.swaps.get("concat_linear", 0) == swaps, str(report)
    if grad_free:
        torch.testing.assert_close(got, want)
        return
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_dynamic_shapes():
    model = tiny_model("llama", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), dynamic=True,
                                                options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


def test_left_alone_quietly_when_no_two_can_share():
    """The common case (a LoRA'd projection: frozen base, trainable lora_A) is no line in explain;
    a group refused for a reason is."""
    report = chronicals_compile.explain(_Heads(frozen=(0,), bias=(True, True, False)), torch.randn(3, 8),
                                        options={**ON, "compiler": "aot_eager"})
    assert "concat_linear" not in report.swaps
    assert not [f for f in report.fallbacks if f.pattern == "concat_linear"], str(report)
    report = chronicals_compile.explain(_Tricky("flat-view"), torch.randn(3, 5, 8), options={**ON, "compiler": "aot_eager"})
    assert any(f.pattern == "concat_linear" and "column slice" in f.reason for f in report.fallbacks), str(report)


class _WideHeads(torch.nn.Module):
    """An MLP's gate and up: two outputs each wider than twice the input."""

    def __init__(self, width_in=8, width_out=24):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(width_in, width_out), torch.nn.Linear(width_in, width_out)

    def forward(self, x):
        return (F.silu(self.gate(x)) * self.up(x)).sum()


def test_wide_groups_left_alone_with_the_reason():
    """Gathering the gradient of a 48-column output costs more than the second read of an
    8-column input saves (the cost rule: 2 x out <= 5 x (linears - 1) x in); 20 columns pay."""
    report = chronicals_compile.explain(_WideHeads(), torch.randn(3, 8), options={**ON, "compiler": "aot_eager"})
    assert "concat_linear" not in report.swaps, str(report)
    assert any(f.pattern == "concat_linear" and "48 columns" in f.reason and "too wide" in f.reason
               for f in report.fallbacks), str(report)
    report = chronicals_compile.explain(_WideHeads(width_out=10), torch.randn(3, 8), options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == 1, str(report)


def test_off_by_default():
    report = chronicals_compile.explain(_Heads(frozen=(0, 1)), torch.randn(3, 8), options={"compiler": "aot_eager"})
    assert "concat_linear" not in report.swaps, str(report)


def test_checkpointed_layers_fused_untagged_and_training_unchanged():
    model = tiny_model("qwen2", layers=LAYERS)
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == LAYERS, str(report)
    assert_same_training_step(eager, compiled)


class _RandomHeads(torch.nn.Module):
    """Linears on one input with drawn widths, biases and trainability, some through a no-op cast."""

    def __init__(self, d, heads):
        super().__init__()
        self.casts = [cast for *_, cast in heads]
        self.heads = torch.nn.ModuleList(torch.nn.Linear(d, out, bias=bias) for out, bias, _, _ in heads)
        for head, (_, _, frozen, _) in zip(self.heads, heads):
            head.requires_grad_(not frozen)

    def forward(self, x):
        outs = [h(x.to(x.dtype) if cast else x) for h, cast in zip(self.heads, self.casts)]
        return sum(((i + 1) * o.tanh()).sum() for i, o in enumerate(outs))


@settings(max_examples=12)
@given(d=st.integers(1, 40), rows=st.integers(1, 9),
       heads=st.lists(st.tuples(st.integers(1, 24), st.booleans(), st.booleans(), st.booleans()), min_size=2, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_any_grouping_trains_like_eager(d, rows, heads, dtype, seed):
    """Whatever mix of widths, biases, frozen weights and casts: exactly the groups that may share
    a GEMM are fused, and the loss and every gradient equal eager's."""
    torch.manual_seed(seed)
    module = _RandomHeads(d, heads).to(dtype)
    x = torch.randn(rows, d, dtype=dtype)
    want = _grads(module, x)
    torch._dynamo.reset()
    options = {"chronicals.enable": ["concat_linear"], "chronicals.compiler": "aot_eager"}
    with report_collecting() as report:
        got = _grads(torch.compile(copy.deepcopy(module), backend="chronicals", options=options), x)
    kinds = [(bias, frozen) for _, bias, frozen, _ in heads]
    widths = {kind: [out for out, *k, _ in heads if tuple(k) == kind] for kind in set(kinds)}
    # a group is fused where it pays: 2 x its output columns <= 5 x (linears - 1) x the input's
    expected = sum(1 for w in widths.values() if len(w) >= 2 and 2 * sum(w) <= 5 * (len(w) - 1) * d)
    assert report.swaps.get("concat_linear", 0) == expected, str(report)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got[0], want[0], **tol)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **tol, msg=name)
