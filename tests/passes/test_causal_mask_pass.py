"""The causal-mask pass: proven plain-causal masks become is_causal=True; anything else stays."""
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

FAST = {"compiler": "aot_eager"}


def test_plain_causal_mask_becomes_is_causal_static_and_dynamic():
    for dynamic in (False, True):
        torch._dynamo.reset()
        report, eager, compiled = compiled_vs_eager(tiny_model("qwen2", layers=3), random_batch(seq=13),
                                                    options=FAST, dynamic=dynamic)
        assert report.swaps.get("causal_mask") == 3, str(report)
        assert_same_training_step(eager, compiled)


def test_padding_mask_is_left_alone():
    batch = random_batch(seq=13)
    batch["attention_mask"] = torch.ones(2, 13, dtype=torch.long)
    batch["attention_mask"][0, :4] = 0
    report, eager, compiled = compiled_vs_eager(tiny_model("llama"), batch, options=FAST)
    assert "causal_mask" not in report.swaps
    assert any("input tensor" in f.reason for f in report.fallbacks if f.pattern == "causal_mask"), str(report)
    assert_same_training_step(eager, compiled)


def test_sliding_window_is_not_causal():
    model = tiny_model("mistral", sliding_window=4)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=13), options=FAST, dynamic=True)
    assert "causal_mask" not in report.swaps
    assert any("not plain causal" in f.reason for f in report.fallbacks), str(report)
    assert_same_training_step(eager, compiled)


def test_disable_keeps_the_dense_mask():
    report = chronicals_compile.explain(tiny_model("llama"), options={**FAST, "disable": ["causal_mask"]},
                                        **random_batch())
    assert "causal_mask" not in report.swaps
