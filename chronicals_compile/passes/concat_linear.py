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
``narrow``s of ``linear(x, cat([W1, W2, ...]), cat([b1, b2, ...]))``. Weights are grouped by
whether they train, so a frozen base weight never shares a GEMM with a trainable adapter (its
weight gradient would be computed for nothing). The concatenated weight is tagged
``CheckpointPolicy.MUST_RECOMPUTE`` so backward rebuilds it from the parameters instead of
holding a second copy of every projection's weights from forward to backward. The split outputs
are column slices of one buffer (``narrow``); the ops downstream read them strided, so an output
that is viewed in a way a slice does not allow, or an in-place op between the linears (the fused
GEMM reads the input where the first linear did), leaves the group alone. A slice that reaches
attention through views only (v) is copied out: attention saves it for backward, and as a view it
would hold the whole buffer.

Off by default: measured neutral in the Qwen0.5B step on the H200 (session 7: full fine-tuning
0.6% faster at 0.75 GiB more peak memory with q/k/v fused, that memory being the saved v's view
of the whole buffer, copied since session 8 and not yet re-measured; LoRA 0.7% slower with the
frozen q/k/v and their ``lora_A`` fused), while a pair as wide as an MLP's gate/up lost 16% alone.
Left alone:
weights that are tensor subclasses (DTensor under FSDP/tensor parallelism), symbolic weight
shapes, mixed biases (some linears with one, some without), a weight computed after the first
linear that would use it, and linears on either side of an autocast or grad-mode change (a router
run in fp32 beside bf16 experts).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import CheckpointPolicy

from .graph_utils import (SDPA, NoMatch, arg, describe, erase_dead, is_noop_cast_of, meta, mutates_between, op,
                          plain_tensor, regime_runs, set_fake_value)

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
    found = set(found)
    if len(found) < 2:
        return list(found)
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    return sorted(found, key=order.__getitem__)


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


#: Ops that return a view of their input (a strided piece stays strided through them).
_VIEW_OPS = frozenset({"view", "transpose", "unsqueeze", "expand", "getitem", "permute", "squeeze"})


def _last_dim_split(view: fx.Node, source: fx.Node) -> bool:
    """``view`` only splits ``source``'s last dimension (HF's ``q.view(*input_shape, -1, head_dim)``),
    which a column slice of a wider output allows; anything else may need a contiguous input."""
    src, out = meta(source), meta(view)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() < src.dim():
        return False
    lead = src.dim() - 1
    return all(statically_known_true(a == b) for a, b in zip(src.shape[:lead], out.shape[:lead]))


def _strided_ok(output: fx.Node) -> bool:
    """Every ``view`` reached from ``output`` through view ops accepts a column slice: a direct
    one that splits the last dimension; none deeper (those could merge a strided dimension)."""
    stack = [(user, output, 0) for user in output.users]
    while stack:
        node, source, depth = stack.pop()
        name = op(node) or (node.target if node.op == "call_method" else None)
        if name in ("view", "view_as"):
            if depth > 0 or name == "view_as" or not _last_dim_split(node, source):
                return False
        if name in _VIEW_OPS or name == "view_as":
            stack.extend((user, node, depth + 1) for user in node.users)
    return True


def _fused_width(members: list[fx.Node]) -> int:
    return sum(meta(arg(m, 1, "weight")).shape[0] for m in members)


def _pays(members: list[fx.Node]) -> bool:
    """Traffic per token, in elements: fusing saves, for each linear after the first, a read of
    the input in forward and for the weight gradient, plus the input-gradient add (three reads
    and a write: ~5 x in), and costs gathering the pieces' gradients into one buffer (a read and a
    write of every output column: 2 x out). Measured on the H200 (session 7, bench_concat_linear):
    Qwen0.5B q/k/v (1152 of 896) 1.30x faster as one GEMM, its gate/up (9728 of 896) 0.84x, where
    this rule says yes and no."""
    width_in = meta(arg(members[0], 1, "weight")).shape[1]
    return 2 * _fused_width(members) <= 5 * (len(members) - 1) * width_in


def _defined_before(nodes: list[fx.Node], point: fx.Node) -> bool:
    order = {n: i for i, n in enumerate(point.graph.nodes)}
    return all(order[n] < order[point] for n in nodes)


def is_anchor(node: fx.Node) -> bool:
    return len(node.users) >= 2 or (len(node.users) == 1 and is_noop_cast_of(next(iter(node.users)), node))


def match(node: fx.Node, ctx=None, keep: Callable[[fx.Node, torch.Tensor], bool] | None = None
          ) -> tuple[fx.Node, list[list[fx.Node]]]:
    """``keep(linear, x)``: which linears reading ``x`` may join a group (all when None)."""
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
    found, refused = [], []
    for members in (run for group in groups.values() for run in regime_runs(group)):
        if keep is not None:
            members = [m for m in members if keep(m, x)]
        if len(members) < 2:
            continue
        operands = [m for lin in members for m in (arg(lin, 1, "weight"), arg(lin, 2, "bias")) if m is not None]
        if not _defined_before(operands, members[0]):
            refused.append("a weight is computed after the first linear")
        elif mutates_between(members[0], members[-1]):
            refused.append("an in-place op lies between the linears (the fused GEMM would read before it)")
        elif not all(_strided_ok(m) for m in members):
            refused.append("an output is viewed in a way a column slice does not allow")
        elif not _pays(members):
            refused.append(f"the fused output ({_fused_width(members)} columns) is too wide for its {x.shape[-1]}-column input: "
                           "gathering its gradient costs more than the reads it saves")
        else:
            found.append(members)
    if not found:
        # linears that share no GEMM at all (a LoRA'd projection: frozen base, trainable lora_A)
        # are the common case, not worth a line in explain each
        raise NoMatch(f"{len(readers)} linears read {node.name}: " + (
            "; ".join(refused) if refused else "no two share weight dtype, trainability, bias and "
                                               "autocast/grad mode"), quiet=not refused)
    return node, found


def _saved_by_attention(output: fx.Node) -> bool:
    """``output`` reaches an SDPA call through view ops only, so attention saves a view of it for
    backward (HF's v: ``v.view(...).transpose(1, 2)``); q and k go through RoPE first, a new
    tensor."""
    stack = list(output.users)
    while stack:
        node = stack.pop()
        if node.op == "call_function" and node.target in SDPA:
            return True
        name = op(node) or (node.target if node.op == "call_method" else None)
        if name in _VIEW_OPS:
            stack.extend(node.users)
    return False


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
        # narrow, not split: each piece a view of its own, which in-place ops on it may modify
        # (autograd forbids modifying one of several views a split returns)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        pieces = [graph.call_function(torch.narrow, (fused, -1, o, n)) for o, n in zip(offsets, sizes)]
        # A view saved for backward holds the whole fused buffer: the q/k/v group's v, saved by
        # attention, kept q and k's columns alive too (0.75 GiB at Qwen0.5B 8x2048, session 8).
        # So what attention will save gets its own copy (GQA's v: an eighth of the width there).
        copies = [graph.call_function(torch.clone, (p,), {"memory_format": torch.contiguous_format})
                  if _saved_by_attention(lin) else None for p, lin in zip(pieces, members)]
    outputs = [c if c is not None else p for p, c in zip(pieces, copies)]
    new_nodes = [*cats, fused, *pieces, *(c for c in copies if c is not None)]
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in members[0].meta:
            for n in new_nodes:
                n.meta[key] = members[0].meta[key]
    for n in new_nodes:
        set_fake_value(gm, n)
    if tag:  # rebuilt in backward from the parameters, not held from forward
        region = next(_ids)
        for n in cats:
            n.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            n.meta["ac_graph_id"] = region
    casts = []
    for linear, piece in zip(members, outputs):
        source = arg(linear, 0, "input")
        if source is not x:
            casts.append(source)
        linear.replace_all_uses_with(piece)
    erase_dead(gm, [*members, *casts])
    return fused


def rewrite(gm: fx.GraphModule, found: tuple[fx.Node, list[list[fx.Node]]], ctx, name: str = NAME) -> fx.Node:
    x, groups = found
    # tags only in the root graph: a checkpointed body is recomputed whole already
    tag = ctx is None or gm.graph is ctx.root.graph
    fused = [_fuse(gm, x, members, tag) for members in groups]
    for extra in fused[1:]:
        if ctx is not None:
            ctx.swap(name, describe(extra))
    return fused[0]
