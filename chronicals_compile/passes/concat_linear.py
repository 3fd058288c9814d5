"""Linears that read the same input become one GEMM over their concatenated weights.

Why: a decoder layer's q, k and v projections read the same normed hidden state, and so do the
MLP's gate and up projections (and, under peft LoRA, the adapters' ``lora_A`` of each). Run apart,
each GEMM reads the input again in forward and again for its weight gradient, and the input's
gradient is the sum of one GEMM output per projection, each written in bf16 and added back up.
As one GEMM, the input is read once, the input's gradient is one GEMM whose reduction runs over
all projections in fp32 (no intermediate rounding), and the small k/v projections (128 output
features at Qwen2.5-0.5B) stop being wave-quantised GEMMs of their own. Inductor only does this
for frozen weights (its freezing passes, inference); for training the weights change every step,
so the concatenation is rebuilt every step (a copy of the weights, ~20 MB a layer at Qwen0.5B).

How: ``linear(x, W1, b1)``, ``linear(x, W2, b2)``, ... on one input (seen through casts that do not
change its dtype) with plain floating-point weights of one dtype and device become
``split(linear(x, cat([W1, W2, ...]), cat([b1, b2, ...])), sizes, -1)``. Weights are grouped by
whether they train, so a frozen base weight never shares a GEMM with a trainable adapter (its
weight gradient would be computed for nothing). The concatenated weight is tagged
``CheckpointPolicy.MUST_RECOMPUTE`` so backward rebuilds it from the parameters instead of
holding a second copy of every projection's weights from forward to backward. The split outputs
are column slices of one buffer; the ops downstream read them strided.

Off by default until a GPU step measures it. Left alone: weights that are tensor subclasses
(DTensor under FSDP/tensor parallelism), symbolic weight shapes, mixed biases (some linears with
one, some without), a weight computed after the first linear that would use it, and linears on
either side of an autocast or grad-mode change (a router run in fp32 beside bf16 experts).
"""
from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .graph_utils import (NoMatch, arg, describe, erase_dead, is_noop_cast_of, meta, op, plain_tensor, regime_runs,
                          set_fake_value)

NAME = "concat_linear"
_ids = itertools.count(1)


def _linear_readers(x: fx.Node) -> list[fx.Node]:
    """Every linear whose input is ``x`` or a no-op cast of ``x``, in graph order."""
    found = []
    for user in x.users:
        if op(user) == "linear" and arg(user, 0, "input") is x:
            found.append(user)
        elif is_noop_cast_of(user, x):
            found.extend(u for u in user.users if op(u) == "linear" and arg(u, 0, "input") is user)
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return sorted(set(found), key=order.__getitem__)


def _group_key(linear: fx.Node) -> tuple | None:
    """What linears must share to run as one GEMM, or None where this one cannot."""
    weight, bias = arg(linear, 1, "weight"), arg(linear, 2, "bias")
    w = meta(weight)
    if not isinstance(weight, fx.Node) or not plain_tensor(w) or w.dim() != 2 or not w.is_floating_point():
        return None
    if not all(isinstance(s, int) for s in w.shape):
        return None  # a symbolic weight shape
    if bias is None:
        bias_key = None
    else:
        b = meta(bias)
        if not isinstance(bias, fx.Node) or not plain_tensor(b) or b.shape != w.shape[:1] or b.dtype != w.dtype:
            return None
        bias_key = b.requires_grad
    return w.dtype, w.device, w.shape[1], w.requires_grad, bias is not None, bias_key


def _defined_before(nodes: list[fx.Node], point: fx.Node) -> bool:
    order = {n: i for i, n in enumerate(point.graph.nodes)}
    return all(order[n] < order[point] for n in nodes)


def is_anchor(node: fx.Node) -> bool:
    return len(node.users) >= 2 or (len(node.users) == 1 and is_noop_cast_of(next(iter(node.users)), node))


def match(node: fx.Node, ctx=None) -> tuple[fx.Node, list[list[fx.Node]]]:
    readers = _linear_readers(node)
    if len(readers) < 2:
        raise NoMatch("fewer than two linears read this value", quiet=True)
    x = meta(node)
    if not plain_tensor(x) or not x.is_floating_point():
        raise NoMatch("the shared input is not a plain floating-point tensor", quiet=True)
    groups: dict[tuple, list[fx.Node]] = {}
    for linear in readers:
        key = _group_key(linear)
        if key is not None and key[0] == x.dtype:
            groups.setdefault(key, []).append(linear)
    found = []
    for members in (run for group in groups.values() for run in regime_runs(group)):
        operands = [m for lin in members for m in (arg(lin, 1, "weight"), arg(lin, 2, "bias")) if m is not None]
        if len(members) >= 2 and _defined_before(operands, members[0]):
            found.append(members)
    if not found:
        raise NoMatch(f"{len(readers)} linears read {node.name} but no two share weight dtype, "
                      "trainability, bias and autocast/grad mode, with weights defined before the first")
    return node, found


def _fuse(gm: fx.GraphModule, x: fx.Node, members: list[fx.Node], tag: bool) -> fx.Node:
    graph = gm.graph
    weights = [arg(lin, 1, "weight") for lin in members]
    biases = [arg(lin, 2, "bias") for lin in members]
    sizes = [int(meta(w).shape[0]) for w in weights]
    with graph.inserting_before(members[0]):
        w_cat = graph.call_function(torch.cat, (weights,), {"dim": 0})
        cats = [w_cat]
        b_cat = None
        if biases[0] is not None:
            b_cat = graph.call_function(torch.cat, (biases,), {"dim": 0})
            cats.append(b_cat)
        fused = graph.call_function(torch._C._nn.linear, (x, w_cat, b_cat))
        parts = graph.call_function(torch.split, (fused, sizes), {"dim": -1})
        pieces = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in members[0].meta:
            for n in (*cats, fused, parts, *pieces):
                n.meta[key] = members[0].meta[key]
    for n in (*cats, fused, parts, *pieces):
        set_fake_value(gm, n)
    if tag:  # rebuilt in backward from the parameters, not held from forward
        region = next(_ids)
        for n in cats:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = region
    casts = []
    for linear, piece in zip(members, pieces):
        source = arg(linear, 0, "input")
        if source is not x:
            casts.append(source)
        linear.replace_all_uses_with(piece)
    erase_dead(gm, [*members, *casts])
    return fused


def rewrite(gm: fx.GraphModule, found: tuple[fx.Node, list[list[fx.Node]]], ctx) -> fx.Node:
    x, groups = found
    # tags only in the root graph: a checkpointed body is recomputed whole already
    tag = ctx is None or gm.graph is ctx.root.graph
    fused = [_fuse(gm, x, members, tag) for members in groups]
    for extra in fused[1:]:
        ctx.swap(NAME, describe(extra))
    return fused[0]
