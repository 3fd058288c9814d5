"""Linears narrower than their input share a GEMM (GQA's k and v); q, as wide as its input, keeps
its own; training equal to eager, through AOTAutograd and through Inductor."""
import copy

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

import chronicals_compile
from chronicals_compile.testing import random_batch, tiny_model
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager, loss_and_grads

LAYERS = 2
ON = {"enable": ["concat_narrow_linear"]}


@pytest.mark.parametrize("family", ["qwen2", "llama"], ids=["qwen2-kv-bias", "llama-no-bias"])
def test_kv_fused_q_apart_and_training_unchanged(family):
    model = tiny_model(family, layers=LAYERS, kv_heads=2)  # hidden 64: k, v 32 columns each, q 64
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=12), options={**ON, "compiler": "aot_eager"})
    assert report.swaps.get("concat_narrow_linear") == LAYERS, str(report)
    assert "concat_linear" not in report.swaps, str(report)
    assert_same_training_step(eager, compiled)


def test_only_the_narrow_weights_are_concatenated():
    """The graph after the pass: each concatenated weight is k's and v's (2 x 32 rows of the
    64-wide input), rebuilt in backward (MUST_RECOMPUTE), and q's linear is still its own."""
    from chronicals_compile.config import Options
    from chronicals_compile.passes import PassContext, concat_narrow_linear, run_pattern
    from chronicals_compile.passes.graph_utils import meta

    model = tiny_model("qwen2", layers=1, kv_heads=2)
    graphs = []

    def backend(gm, example_inputs):
        run_pattern(concat_narrow_linear, gm, PassContext(Options(), example_inputs, gm))
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    batch = random_batch(seq=8)
    torch.compile(model, backend=backend)(**batch)
    cats = [n for gm in graphs for n in gm.graph.nodes  # weights and biases (rope's cats aside)
            if n.target is torch.cat and any(u.target is torch._C._nn.linear for u in n.users)]
    weight_cats = [n for n in cats if meta(n).dim() == 2]
    assert [tuple(meta(n).shape) for n in weight_cats] == [(64, 64)], weight_cats
    assert all(n.meta.get("recompute") == CheckpointPolicy.MUST_RECOMPUTE for n in cats)
    linears = [n for gm in graphs for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    widths = sorted(meta(n).shape[-1] for n in linears)
    assert 64 in widths and widths.count(64) >= 2, widths  # q apart, the fused k/v, o
    torch._dynamo.reset()


def test_mha_has_nothing_narrow_to_fuse():
    report, eager, compiled = compiled_vs_eager(tiny_model("llama", layers=LAYERS, kv_heads=4), random_batch(seq=12),
                                                options={**ON, "compiler": "aot_eager"})
    assert "concat_narrow_linear" not in report.swaps, str(report)
    assert_same_training_step(eager, compiled)


def test_beside_concat_linear_the_wider_grouping_wins():
    report, eager, compiled = compiled_vs_eager(
        tiny_model("qwen2", layers=LAYERS, kv_heads=2), random_batch(seq=12),
        options={"enable": ["concat_linear", "concat_narrow_linear"], "compiler": "aot_eager"})
    assert report.swaps.get("concat_linear") == LAYERS and "concat_narrow_linear" not in report.swaps, str(report)
    assert_same_training_step(eager, compiled)


def test_inductor_step_equal_to_eager():
    base = tiny_model("qwen2", layers=LAYERS, kv_heads=2)
    batch = random_batch(seq=24)
    eager = loss_and_grads(copy.deepcopy(base), batch)
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    report = chronicals_compile.explain(model, options=ON, **batch)
    assert report.swaps.get("concat_narrow_linear") == LAYERS, str(report)
    report.output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert_same_training_step(eager, (report.output.loss.detach(), grads))
    torch._dynamo.reset()
