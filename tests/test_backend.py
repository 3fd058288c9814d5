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
