"""The grouped-query pass: SDPA reads the unexpanded k and v (enable_gqa) once its mask is gone;
with a mask, with plain multi-head attention, or when disabled, nothing changes (on by default
since the H200 measured it faster)."""
import torch

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import (assert_same_training_step, compile_and_capture,
                                                    compiled_vs_eager)

ON = {"compiler": "aot_eager", "enable": ["gqa_attention"]}


def test_repeat_kv_becomes_enable_gqa_static_and_dynamic():
    for family in ("qwen2", "llama"):
        for dynamic in (False, True):
            torch._dynamo.reset()
            model = tiny_model(family, layers=3, heads=4, kv_heads=2)
            report, eager, compiled = compiled_vs_eager(model, random_batch(seq=13), options=ON, dynamic=dynamic)
            assert report.swaps.get("gqa_attention") == 3, str(report)
            assert report.swaps.get("causal_mask") == 3, str(report)
            assert_same_training_step(eager, compiled)


def test_rewritten_graph_passes_unexpanded_key_and_value():
    model = tiny_model("qwen2", layers=1, heads=6, kv_heads=2)
    report, graphs, _ = compile_and_capture(model, random_batch(seq=9)["input_ids"], enable=["gqa_attention"])
    sdpas = [n for g in graphs for n in g.graph.nodes
             if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    assert len(sdpas) == 1
    sdpa = sdpas[0]
    key = sdpa.args[1] if len(sdpa.args) > 1 else sdpa.kwargs["key"]
    assert sdpa.kwargs.get("enable_gqa") is True and sdpa.kwargs.get("is_causal") is True
    assert key.meta["example_value"].shape[1] == 2  # the two kv heads, not six
    assert not any(n.op == "call_method" and n.target == "expand" for g in graphs for n in g.graph.nodes)


def test_on_by_default_and_disable_turns_it_off():
    report = chronicals_compile.explain(tiny_model("qwen2"), options={"compiler": "aot_eager"}, **random_batch())
    assert report.swaps.get("gqa_attention") == 2 and report.swaps.get("causal_mask") == 2, str(report)
    torch._dynamo.reset()
    report = chronicals_compile.explain(tiny_model("qwen2"), options={"compiler": "aot_eager", "disable": ["gqa_attention"]},
                                        **random_batch())
    assert "gqa_attention" not in report.swaps and report.swaps.get("causal_mask") == 2, str(report)


def test_a_padding_mask_keeps_the_expanded_heads():
    batch = random_batch(seq=11)
    batch["attention_mask"] = torch.ones(2, 11, dtype=torch.long)
    batch["attention_mask"][1, :3] = 0
    report, eager, compiled = compiled_vs_eager(tiny_model("mistral"), batch, options=ON)
    assert "gqa_attention" not in report.swaps and "causal_mask" not in report.swaps
    assert_same_training_step(eager, compiled)


def test_multi_head_attention_has_nothing_to_rewrite():
    report, eager, compiled = compiled_vs_eager(tiny_model("llama", heads=4, kv_heads=4), random_batch(), options=ON)
    assert "gqa_attention" not in report.swaps
    assert_same_training_step(eager, compiled)


def test_inductor_compiles_the_grouped_attention():
    torch._dynamo.reset()
    model = tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={"enable": ["gqa_attention"]})
    assert report.swaps.get("gqa_attention") == 2, str(report)
    assert_same_training_step(eager, compiled, rtol=1e-4, atol=1e-5)
