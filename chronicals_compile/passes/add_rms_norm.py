"""Residual add + RMSNorm -> ``chronicals::add_rms_norm`` (runs after the RMSNorm pass).

Pattern, in transformers' words (every decoder layer, twice)::

    hidden_states = residual + hidden_states       # s: also read by the next residual add
    hidden_states = self.post_attention_layernorm(hidden_states)   # already chronicals::rms_norm

becomes ``s, y = add_rms_norm(residual, hidden_states, w, eps)``: the sum's readers get ``s``,
the norm's get ``y``. Off by default (``enable=["add_rms_norm"]`` turns it on, and the RMSNorm
pass with it): Inductor fuses the add into its own norm kernel already (the H200 measured ours at
0.90-1.00x of it, forward+backward). Never on CUDA (``config.CUDA_UNAVAILABLE``): with every
residual add inside our ops no Inductor buffer is left between one layer's op and the next, and
Inductor's printing of its IR (each extern kernel prints its inputs, recursively) doubles per
layer; a 24-layer model's compile hung on the H200.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_utils import NoMatch, binary_operands, dtype_of, erase_dead, meta, op, set_fake_value
from .sizes import same_size

NAME = "add_rms_norm"


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.chronicals.rms_norm.default


def match(node: fx.Node, ctx=None) -> tuple:
    x, weight, eps = node.args
    if op(x) != "add":
        raise NoMatch("the norm's input is not a sum", quiet=True)  # e.g. the first layer's embeddings
    if x.kwargs.get("alpha", 1) != 1:
        raise NoMatch("add with alpha")
    a, b = binary_operands(x)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise NoMatch("a sum with a constant, not a residual add")
    ma, mb, mx = meta(a), meta(b), meta(x)
    if not all(isinstance(t, torch.Tensor) for t in (ma, mb, mx)):
        raise NoMatch("no tensor metadata on the sum")
    if not (ma.dim() == mb.dim() == mx.dim()
            and all(same_size(p, q) and same_size(p, r) for p, q, r in zip(ma.shape, mb.shape, mx.shape))):
        raise NoMatch(f"broadcasting add {tuple(ma.shape)} + {tuple(mb.shape)}")
    if not (dtype_of(a) == dtype_of(b) == dtype_of(x)):
        raise NoMatch(f"mixed dtypes in the sum ({dtype_of(a)}, {dtype_of(b)})")
    if x.graph is not node.graph:
        raise NoMatch("the sum lives in another graph")
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    early = [u.name for u in x.users if u is not node and order[u] < order[node]]
    if early:
        raise NoMatch(f"the sum is read before the norm (by {', '.join(early)})")
    return a, b, weight, eps, x


def rewrite(gm: fx.GraphModule, found: tuple, ctx) -> fx.Node:
    a, b, weight, eps, add = found
    norm = next(u for u in add.users if u.op == "call_function"
                and u.target is torch.ops.chronicals.rms_norm.default and u.args[0] is add)
    graph = gm.graph
    with graph.inserting_before(norm):
        fused = graph.call_function(torch.ops.chronicals.add_rms_norm.default, (a, b, weight, eps))
        set_fake_value(gm, fused)
        total = graph.call_function(operator.getitem, (fused, 0))
        normed = graph.call_function(operator.getitem, (fused, 1))
    for node in (fused, total, normed):
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in norm.meta:
                node.meta[key] = norm.meta[key]
    for i, node in enumerate((total, normed)):
        if isinstance(fused.meta.get("example_value"), (tuple, list)):
            node.meta["example_value"] = fused.meta["example_value"][i]
    norm.replace_all_uses_with(normed)
    add.replace_all_uses_with(total, delete_user_cb=lambda user: user is not norm)
    erase_dead(gm, [norm, add])
    return fused
