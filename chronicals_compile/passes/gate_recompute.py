"""A gated MLP's product ``h = act(a) * b`` is recomputed in backward instead of saved.

Why: the down projection's weight gradient reads h, a [tokens, intermediate] tensor and the
largest activation of a decoder layer, and Inductor's partitioner keeps it from forward to
backward because a matmul reads it there ("materialized in backward", which it never
recomputes). a and b are kept anyway (the activation's backward reads them), so h can be
rebuilt from them inside the backward kernel that already reads a and b: one more write of h a
layer instead of holding it through the step. At Qwen2.5-0.5B's 8 x 2048 that is
24 x 16384 x 4864 bf16 = 3.6 GiB of peak memory.

How: the product's nodes are tagged ``CheckpointPolicy.MUST_RECOMPUTE``, the tag selective
activation checkpointing uses. AOTAutograd copies node metadata onto the aten ops it traces, and
the min-cut partitioner honours the tag (a and b, untagged inputs of the tagged region, are
saved). Any activation qualifies, fused by us or not: ``chronicals::swiglu``/``geglu``, or the
unfused ``silu``/``gelu``/``relu``/``a * sigmoid(a)`` times the other operand; the product must
feed a linear (the down projection, or peft LoRA's base and adapter linears).

The caches of AOTAutograd and Inductor hash a graph's code, not its node metadata: a graph
compiled with the tags would be served to the same graph without them (and the reverse), were
the caches not keyed by our source (``compile_cache``).
"""
from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .graph_utils import NoMatch, arg, meta, op
from .swiglu import _is_silu_product

NAME = "gate_recompute"
_ACTIVATIONS = ("silu", "gelu", "relu")
_ids = itertools.count(1)


def _fused_gates() -> tuple:
    ops = torch.ops.chronicals
    return (ops.swiglu.default, ops.geglu.default)


def _activation_interior(x: Any) -> list[fx.Node] | None:
    """The nodes of ``act(a)`` when ``x`` is one (single-use interior), else None."""
    if not isinstance(x, fx.Node) or len(x.users) != 1:
        return None
    if op(x) in _ACTIVATIONS:
        return [x]
    for operand in x.args[:2]:  # a * sigmoid(a)
        if op(operand) == "sigmoid" and len(operand.users) == 1 and _is_silu_product(x, operand):
            return [operand, x]
    return None


def _feeds_linear(node: fx.Node) -> bool:
    for user in node.users:
        if op(user) == "linear" and arg(user, 0, "input") is node:
            return True
        if op(user) == "dropout" and _feeds_linear(user):  # peft LoRA: lora_A(dropout(h))
            return True
        if user.target is torch.ops.chronicals.lora_linear.default and user.args[0] is node:  # fused LoRA
            return True
    return False


def is_anchor(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _fused_gates():
        return True
    return op(node) == "mul" and node.target is not operator.imul


def match(node: fx.Node, ctx=None) -> list[fx.Node]:
    if ctx is not None and node.graph is not ctx.root.graph:
        # a nested body (an activation-checkpointed layer): recomputed whole already, and its own
        # region ids would collide with ours
        raise NoMatch("inside a nested (checkpointed) body", quiet=True)
    if node.target in _fused_gates():
        tagged = [node]
    else:
        interiors = [i for i in map(_activation_interior, node.args[:2]) if i is not None]
        if not interiors:
            raise NoMatch("not an activation times a tensor", quiet=True)
        tagged = interiors[0] + [node]
    if not _feeds_linear(node):
        raise NoMatch("the gated product feeds no linear: nothing a matmul would keep", quiet=True)
    value = meta(node)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise NoMatch("the product is not a floating-point tensor")
    if any("recompute" in n.meta for n in tagged):
        raise NoMatch("already tagged by activation checkpointing", quiet=True)
    return tagged


def rewrite(gm: fx.GraphModule, tagged: list[fx.Node], ctx) -> fx.Node:
    region = next(_ids)  # one region per gate: the partitioner saves each region's inputs
    for node in tagged:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.meta["ac_graph_id"] = region
    return tagged[-1]

