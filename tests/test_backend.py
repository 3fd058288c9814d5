"""The backend as users meet it: by name, with options, with Inductor, with no pattern to find."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager


def test_backend_is_registered_by_entry_point_without_our_import():
    code = "import torch, sys; sys.exit(0 if 'chronicals' in torch._dynamo.list_backends() else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_by_name_with_inductor_matches_eager():
    """The one full Inductor compile of the suite: string backend, default compiler."""
    torch._dynamo.reset()
    model = tiny_model("qwen2", layers=2)
    twin = tiny_model("qwen2", layers=2)
    batch = random_batch(seq=12)
    compiled = torch.compile(twin, backend="chronicals")
    out = compiled(**batch)
    out.loss.backward()
    ref = model(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert torch._dynamo.utils.counters["chronicals"]["rms_norm"] >= 5


def test_disable_option_leaves_pattern_to_inductor():
    report = chronicals_compile.explain(tiny_model("llama"), options={"chronicals.disable": ["rms_norm"],
                                                                       "compiler": "aot_eager"},
                                        **random_batch())
    assert "rms_norm" not in report.swaps


def test_unknown_options_get_clear_errors():
    with pytest.raises(ValueError, match="unknown pattern"):
        chronicals_compile.compile(tiny_model("llama"), disable=["rmsnorm"])
    with pytest.raises(ValueError, match="chronicals.logits"):
        chronicals_compile.compile(tiny_model("llama"), logits="sometimes")
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="chronicals.memory_budget"):
            chronicals_compile.compile(tiny_model("llama"), memory_budget=bad)
    for bad in (0, -4, 2.5, "8192", True):
        with pytest.raises(ValueError, match="chronicals.cce_chunk_rows"):
            chronicals_compile.compile(tiny_model("llama"), cce_chunk_rows=bad)


def test_model_without_rms_norm_trains_with_zero_swaps():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options={"compiler": "aot_eager"})
    assert report.swaps.get("rms_norm", 0) == 0
    assert_same_training_step(eager, compiled)


def test_report_is_readable():
    report = chronicals_compile.explain(tiny_model("llama"), options={"compiler": "aot_eager"}, **random_batch())
    text = str(report)
    assert "rms_norm" in text and "5" in text
    assert torch._dynamo.utils.counters["chronicals"]["rms_norm"] >= 5


def test_compile_returns_same_module_with_signature():
    import inspect

    model = tiny_model("llama")
    compiled = chronicals_compile.compile(model, compiler="aot_eager")
    assert compiled is model
    assert "input_ids" in inspect.signature(model.forward).parameters
    assert torch.isfinite(model(**random_batch()).loss)


def test_cuda_defaults_follow_the_measurements():
    from chronicals_compile.config import CUDA_OFF_BY_DEFAULT, make_options

    default = make_options()
    for name in CUDA_OFF_BY_DEFAULT:
        assert not default.enabled(name, "cuda") and default.enabled(name, "cpu")
    assert default.enabled("linear_cross_entropy", "cuda") and default.enabled("causal_mask", "cuda")
    assert make_options(enable=["rms_norm"]).enabled("rms_norm", "cuda")
    with pytest.raises(ValueError, match="both enabled and disabled"):
        make_options(enable=["rope"], disable=["rope"])
    # add_rms_norm: off on every device by default; enabling it brings the RMSNorm pass it builds
    # on, except on CUDA, where it is never applied (config.CUDA_UNAVAILABLE says why)
    assert not default.enabled("add_rms_norm", "cpu") and not default.enabled("add_rms_norm", "cuda")
    fused = make_options(enable=["add_rms_norm"])
    assert fused.enabled("add_rms_norm", "cpu") and fused.enabled("rms_norm", "cpu")
    assert not fused.enabled("add_rms_norm", "cuda") and not fused.enabled("rms_norm", "cuda")


def test_enabling_a_pattern_unavailable_on_cuda_says_why(monkeypatch):
    import chronicals_compile.passes as passes
    from chronicals_compile.config import CUDA_UNAVAILABLE, make_options
    from chronicals_compile.report import collecting

    monkeypatch.setattr(passes, "_device_type", lambda inputs: "cuda")
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    with collecting() as rep:
        passes.run_passes(gm, [torch.randn(2)], make_options(enable=["add_rms_norm"]))
    assert any(n.startswith("add_rms_norm is not applied on CUDA") and CUDA_UNAVAILABLE["add_rms_norm"] in n
               for n in rep.notes), rep.notes
    assert not rep.swaps


def _pointwise_heavy(x, w1, w2):
    h = torch.nn.functional.silu(x @ w1) * torch.sigmoid(x @ w1).cos()
    h = (h.sin() + h.exp().tanh()) @ w2
    return (h.relu() * h.sigmoid()).sum()


def _saved_bytes_and_grads(options):
    """Bytes the compiled forward saves for backward (counted by autograd's saved-tensor hooks,
    which see what AOTAutograd's partition saves) and the input gradients."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(*shape, generator=gen, requires_grad=True) for shape in ((96, 32), (32, 80), (80, 32))]
    fn = torch.compile(_pointwise_heavy, backend="chronicals", options=options) if options is not None else _pointwise_heavy
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.backward()
    return saved[0], [a.grad for a in args]


def test_memory_budget_saves_less_for_backward_with_the_same_gradients():
    """chronicals.memory_budget reaches Inductor's partitioner: at 0 it keeps only what cannot be
    recomputed cheaply (the matmul outputs), and the gradients stay those of eager."""
    _, eager_grads = _saved_bytes_and_grads(None)
    default_bytes, default_grads = _saved_bytes_and_grads({})
    lean_bytes, lean_grads = _saved_bytes_and_grads({"chronicals.memory_budget": 0.0})
    assert lean_bytes < default_bytes, (lean_bytes, default_bytes)
    for ours, ref in zip(lean_grads + default_grads, eager_grads + eager_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options, expected", [
    ({"chronicals.pdl": True}, True),
    ({"chronicals.pdl": True, "triton.enable_pdl": False}, False),  # Inductor's own key wins
    ({}, None),
])
def test_pdl_option_reaches_inductor(monkeypatch, options, expected):
    """chronicals.pdl becomes Inductor's ``triton.enable_pdl`` patch (its effect on the GPU, the
    same bits with the waits present, is tests/gpu/test_pdl_gpu.py)."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    from chronicals_compile.backend import chronicals_backend

    gm = torch.fx.symbolic_trace(nn.Linear(4, 4))
    chronicals_backend(gm, [torch.randn(2, 4)], options=options)
    assert seen.get("triton.enable_pdl") is expected


@pytest.mark.parametrize("key", ["pdl", "mlp_keep_weight"])
def test_switch_options_must_be_bools(key):
    with pytest.raises(ValueError, match=f"chronicals.{key} must be True or False"):
        chronicals_compile.compile(tiny_model("llama"), **{key: "yes"})
