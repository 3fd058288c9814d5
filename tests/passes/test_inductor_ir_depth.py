"""Our ops must leave Inductor an IR whose printed form grows linearly with the model's depth.

Inductor prints an extern kernel (each of our ops, each GEMM) with its inputs, recursively, and
stops only at its own buffers. When every residual add went into ``add_rms_norm``, one layer's op
reached the next one's twice (through the residual and through the GEMMs), the printed tree
doubled per layer, and a 24-layer compile hung on the H200 inside ``ir.__str__``. The size of that
tree is counted here without printing it (each node once per path that reaches it), for the
patterns CUDA may apply, beside the one it may not, which shows the measure catches the blowup.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from chronicals_compile.testing import random_batch, tiny_model


def _children(value, seen_layouts=None):
    from torch._inductor import ir

    if isinstance(value, ir.IRNode):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _children(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _children(v)
    elif isinstance(value, ir.Layout) and dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _children(getattr(value, field.name, None))


def _printed_tree_size(node, memo: dict) -> int:
    """Nodes in the tree ``str(node)`` walks: 1 + the trees of the IR nodes in its fields."""
    key = id(node)
    if key not in memo:
        memo[key] = 1  # guards cycles (none expected)
        fields = dataclasses.fields(node) if dataclasses.is_dataclass(node) else ()
        memo[key] = 1 + sum(_printed_tree_size(child, memo)
                            for f in fields for child in _children(getattr(node, f.name, None)))
    return memo[key]


def _largest_printed_tree(layers: int, enable: list[str], monkeypatch) -> int:
    import chronicals_compile
    from torch._inductor import graph, ir

    lowered = []
    original = graph.GraphLowering.run_node

    def run_node(self, n):
        result = original(self, n)
        lowered.append(result)
        return result

    monkeypatch.setattr(graph.GraphLowering, "run_node", run_node)
    torch._dynamo.reset()
    model = tiny_model("qwen2", layers=layers, hidden=32, intermediate=64, vocab=64)
    chronicals_compile.compile(model, enable=enable)
    batch = random_batch(batch=1, seq=8, vocab=64, seed=layers)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        model(**batch).loss.backward()
    memo: dict = {}
    sizes = [_printed_tree_size(r, memo) for r in lowered if isinstance(r, ir.IRNode)]
    assert sizes, "nothing was lowered: the measure saw no graph"
    return max(sizes)


@pytest.mark.parametrize("enable, grows", [
    (["rms_norm", "swiglu", "rope"], False),  # what CUDA may apply: linear in depth
    (["rms_norm", "swiglu", "rope", "add_rms_norm"], True),  # why add_rms_norm is not applied on CUDA
])
def test_printed_ir_grows_linearly_with_depth(enable, grows, monkeypatch):
    two, four = (_largest_printed_tree(n, enable, monkeypatch) for n in (2, 4))
    if grows:
        assert four >= 4 * two, (two, four)
    else:
        assert four <= 3 * two, (two, four)
