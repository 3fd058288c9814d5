"""QK rotary embedding -> ``chronicals::rope(q, k, cos, sin)``, both tensors in one launch.

Pattern, transformers' ``apply_rotary_pos_emb`` as Dynamo records it (``cos``/``sin`` already
``unsqueeze(1)``-ed, q and k the transposed views of their projections)::

    x1 = x[..., :D/2]; x2 = x[..., D/2:]          # or x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)             # rotate_half; -x2 / x2.neg() / torch.neg
    out = x * cos + rot * sin                      # every product and the sum in either order

for ``x = q`` and ``x = k`` with the very same ``cos`` and ``sin`` nodes. Anchored on the
``cat`` of a negated slice (rare), walked outward to ``out``; then the partner is found among
the other users of ``sin``. One swap per (q, k) pair: the op rotates both in one launch.

GLM's interleaved ``rotate_half`` (``stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)``, pairs
(2j, 2j + 1)) is matched the same way and becomes ``chronicals::rope_interleaved``.

Partial rotary (``q_rot = q[..., :rotary_dim]`` rotated, ``q_pass`` concatenated back) is handled
exactly: ``x`` is then the slice, a strided view the kernel reads in place; the outer ``cat``
stays in the graph.

Refused, with the reason: no partner sharing cos/sin (a lone rotation is left to Inductor);
cos/sin requiring grad (the op does not differentiate them; they normally come from the
``inv_freq`` buffer); a split point other than D/2 or an odd/symbolic head dim; tensors that
are not 4-D or cos/sin that do not broadcast as ``[B, 1, S, D]`` (e.g. the ``[B, S, H, D]``
layout with ``unsqueeze_dim=2``); an output dtype other than torch's promotion of
``(x, cos, sin)``; interior values used elsewhere.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .graph_utils import (
    NoMatch, arg, erase_dead, is_missing, meta, only_users_in, op, other_operand,
    set_fake_value,
)
from .sizes import same_size

NAME = "rope"
_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass
class Side:
    """One rotated tensor: ``out = x * cos + rotate_half(x) * sin``."""

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    out: fx.Node
    mul_s: fx.Node
    interior: list[fx.Node]
    interleaved: bool = False


def _tensors(cat: fx.Node):
    tensors = arg(cat, 0, "tensors")
    return tensors if isinstance(tensors, (list, tuple)) else None


def is_anchor(node: fx.Node) -> bool:
    """``cat((-x2, x1))`` (rotate_half) or ``stack((-x2, x1), -1).flatten(-2)`` (GLM's)."""
    if op(node) == "flatten":
        node = arg(node, 0, "input")
        if op(node) != "stack":
            return False
    elif op(node) != "cat":
        return False
    tensors = _tensors(node)
    return bool(tensors) and len(tensors) == 2 and op(tensors[0]) == "neg"


def _single_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise NoMatch(f"{what} has {len(node.users)} users")
    return next(iter(node.users))


def _is_full(s) -> bool:
    return isinstance(s, slice) and s.start is None and s.stop is None and s.step is None


def _last_dim_slice(node: fx.Node, ndim: int) -> tuple[fx.Node, object, object]:
    """For ``base[..., start:stop]`` (or with explicit full slices), ``(base, start, stop)``."""
    if op(node) != "getitem":
        raise NoMatch("rotate_half halves are not slices")
    base, index = node.args[0], node.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) == 2 and index[0] is Ellipsis:
        last = index[1]
    elif len(index) == ndim and all(_is_full(s) for s in index[:-1]):
        last = index[-1]
    else:
        raise NoMatch("rotate_half slices are not on the last dim")
    if not isinstance(last, slice) or last.step not in (None, 1):
        raise NoMatch("rotate_half slices are not contiguous slices of the last dim")
    return base, last.start, last.stop


def _pairs(x1: fx.Node, x2: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Interleaved halves ``x[..., 0::2]`` and ``x[..., 1::2]`` of one tensor."""
    found = []
    for node in (x1, x2):
        if op(node) != "getitem":
            raise NoMatch("interleaved rotate_half halves are not slices")
        base, index = node.args[0], node.args[1]
        xm = meta(base)
        if not isinstance(xm, torch.Tensor):
            raise NoMatch("no tensor metadata")
        index = index if isinstance(index, tuple) else (index,)
        if len(index) == 2 and index[0] is Ellipsis:
            last = index[1]
        elif len(index) == xm.dim() and all(_is_full(s) for s in index[:-1]):
            last = index[-1]
        else:
            raise NoMatch("interleaved halves are not slices of the last dim")
        if not isinstance(last, slice) or last.step != 2 or last.stop is not None:
            raise NoMatch("interleaved halves are not x[..., 0::2] and x[..., 1::2]")
        found.append((base, last.start or 0))
    (base1, start1), (base2, start2) = found
    if base1 is not base2 or start1 != 0 or start2 != 1:
        raise NoMatch("interleaved halves are not x[..., 0::2] and x[..., 1::2] of one tensor")
    return base1, [x1, x2]


def _rotation(anchor: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node], bool]:
    """``(x, neg, nodes, interleaved)`` of a rotate_half anchor (see ``is_anchor``)."""
    if op(anchor) == "flatten":
        stack = arg(anchor, 0, "input")
        start, end = arg(anchor, 1, "start_dim", 0), arg(anchor, 2, "end_dim", -1)
        tensors = _tensors(stack)
        if not tensors or len(tensors) != 2 or op(tensors[0]) != "neg":
            raise NoMatch("stack is not rotate_half's")
        neg, x1 = tensors
        x, split = _pairs(x1, arg(neg, 0, "input"))
        ndim = meta(x).dim()
        if arg(stack, 1, "dim", 0) not in (-1, ndim) or start not in (-2, ndim - 1) or end not in (-1, ndim):
            raise NoMatch("interleaved rotate_half does not stack and flatten the last dim")
        if len(stack.users) != 1:
            raise NoMatch("the stacked pairs are used elsewhere")
        return x, neg, [*split, stack, anchor], True
    tensors = _tensors(anchor)
    if not tensors or len(tensors) != 2 or op(tensors[0]) != "neg":
        raise NoMatch("cat is not rotate_half's")
    neg, x1 = tensors
    x, split = _halves(x1, arg(neg, 0, "input"))
    xm = meta(x)
    if not isinstance(xm, torch.Tensor):
        raise NoMatch("no tensor metadata")
    if arg(anchor, 1, "dim", 0) not in (-1, xm.dim() - 1):
        raise NoMatch("rotate_half cat is not on the last dim")
    return x, neg, [*split, anchor], False


def _halves(x1: fx.Node, x2: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The tensor both halves come from, and the nodes that split it."""
    if op(x1) == "getitem" and op(x2) == "getitem" and x1.args[0] is x2.args[0] \
            and op(x1.args[0]) == "chunk":
        chunk = x1.args[0]
        x = arg(chunk, 0, "input")
        xm = meta(x)
        if not isinstance(xm, torch.Tensor):
            raise NoMatch("no tensor metadata")
        dim = arg(chunk, 2, "dim", 0)
        if arg(chunk, 1, "chunks") != 2 or dim not in (-1, xm.dim() - 1):
            raise NoMatch("rotate_half chunk is not chunk(2, dim=-1)")
        if x1.args[1] != 0 or x2.args[1] != 1:
            raise NoMatch("rotate_half halves taken out of order")
        return x, [x1, x2, chunk]
    xm = meta(x2)
    if not isinstance(xm, torch.Tensor):
        raise NoMatch("no tensor metadata")
    base1, start1, stop1 = _last_dim_slice(x1, xm.dim())
    base2, start2, stop2 = _last_dim_slice(x2, xm.dim())
    if base1 is not base2:
        raise NoMatch("rotate_half halves come from different tensors")
    head_dim = meta(base1).shape[-1]
    if not isinstance(head_dim, int):
        raise NoMatch("symbolic head dim")
    if head_dim % 2 or start1 not in (None, 0) or stop1 != head_dim // 2 or start2 != head_dim // 2 \
            or not (stop2 is None or (isinstance(stop2, int) and stop2 >= head_dim)):
        raise NoMatch(f"rotate_half does not split head dim {head_dim} at the middle")
    return base1, [x1, x2]


def match_side(cat: fx.Node) -> Side:
    """Walk out from the anchor of ``rotate_half`` (its ``cat``, or GLM's ``flatten``) to
    ``x * cos + rot * sin``."""
    x, neg, split, interleaved = _rotation(cat)
    xm = meta(x)
    if not isinstance(xm, torch.Tensor):
        raise NoMatch("no tensor metadata")
    if xm.dim() != 4:
        raise NoMatch(f"rotated tensor is {xm.dim()}-D, not [B, H, S, D]")
    if xm.shape[-1] % 2:
        raise NoMatch("odd head dim")
    mul_s = _single_user(cat, "rotate_half(x)")
    if op(mul_s) != "mul":
        raise NoMatch("rotate_half(x) is not multiplied by sin")
    sin = other_operand(mul_s, cat)
    out = _single_user(mul_s, "rotate_half(x) * sin")
    if op(out) != "add" or len(out.args) + len(out.kwargs) != 2:
        raise NoMatch("rotate_half(x) * sin is not added to x * cos")
    mul_c = other_operand(out, mul_s)
    if op(mul_c) != "mul":
        raise NoMatch("rotate_half(x) * sin is not added to x * cos")
    cos = other_operand(mul_c, x)
    if is_missing(cos):
        raise NoMatch("x * cos does not multiply the rotated tensor")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, fx.Node) or not isinstance(meta(t), torch.Tensor):
            raise NoMatch(f"{name} is not a tensor")
    interior = [*split, neg, mul_s, mul_c]
    if not only_users_in(interior, set(interior) | {out}):
        raise NoMatch("an intermediate value is used outside the rotation")
    return Side(x, cos, sin, out, mul_s, interior, interleaved)


def _check_side(side: Side) -> None:
    xm, cm, sm, om = meta(side.x), meta(side.cos), meta(side.sin), meta(side.out)
    if not isinstance(om, torch.Tensor):
        raise NoMatch("no tensor metadata")
    if cm.requires_grad or sm.requires_grad:
        raise NoMatch("cos/sin require grad")
    for name, t in (("x", xm), ("cos", cm), ("sin", sm)):
        if t.dtype not in _FLOAT_TYPES:
            raise NoMatch(f"{name} dtype {t.dtype} unsupported")
        if t.device != xm.device:
            raise NoMatch(f"{name} on another device")
    expected = torch.promote_types(torch.promote_types(xm.dtype, cm.dtype), sm.dtype)
    if om.dtype != expected:
        raise NoMatch(f"output dtype {om.dtype} is not the promotion {expected} of x, cos, sin")
    if om.dim() != 4 or not all(same_size(a, b) for a, b in zip(om.shape, xm.shape)):
        raise NoMatch("cos/sin broadcast the rotated tensor to a larger shape")
    for name, t in (("cos", cm), ("sin", sm)):
        if t.dim() > 4:
            raise NoMatch(f"{name} has more than 4 dims")
        shape = (1,) * (4 - t.dim()) + tuple(t.shape)
        if shape[1] != 1:
            raise NoMatch(f"{name} does not broadcast over heads as [B, 1, S, D] (shape {tuple(t.shape)})")
        for axis in (0, 2, 3):
            if shape[axis] != 1 and not same_size(shape[axis], xm.shape[axis]):
                raise NoMatch(f"{name} shape {tuple(t.shape)} does not fit x {tuple(xm.shape)}")


def _compatible(a: Side, b: Side) -> bool:
    am, bm = meta(a.x), meta(b.x)
    return all(same_size(am.shape[i], bm.shape[i]) for i in (0, 2, 3))


def _order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def match(cat: fx.Node, ctx=None):
    side = match_side(cat)
    _check_side(side)
    partners = []
    for user in side.sin.users:
        if user is side.mul_s or op(user) != "mul":
            continue
        other = other_operand(user, side.sin)
        if not is_anchor(other) or other is cat:
            continue
        try:
            candidate = match_side(other)
            _check_side(candidate)
        except NoMatch:
            continue
        if candidate.cos is side.cos and candidate.sin is side.sin and _compatible(side, candidate) \
                and candidate.interleaved == side.interleaved:
            partners.append(candidate)
    if not partners:
        raise NoMatch("no partner tensor rotated with the same cos/sin (lone rotation left to Inductor)")
    order = _order(cat.graph.owning_module)
    partner = min(partners, key=lambda s: order[s.out])
    q, k = sorted((side, partner), key=lambda s: order[s.out])
    inputs = (q.x, k.x, q.cos, q.sin)
    last_input = max(inputs, key=lambda n: order[n])
    users = [u for s in (q, k) for u in s.out.users]
    if any(order[u] <= order[last_input] for u in users):
        raise NoMatch("a rotated tensor is used before its partner's input exists")
    return q, k, last_input


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    q, k, last_input = found
    graph = gm.graph
    point = last_input.next
    while point.op == "placeholder":  # graph inputs stay first
        point = point.next
    with graph.inserting_before(point):
        target = torch.ops.chronicals.rope_interleaved if q.interleaved else torch.ops.chronicals.rope
        fused = graph.call_function(target.default, (q.x, k.x, q.cos, q.sin))
        q_new = graph.call_function(operator.getitem, (fused, 0))
        k_new = graph.call_function(operator.getitem, (fused, 1))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in q.out.meta:
            fused.meta[key] = q.out.meta[key]
    set_fake_value(gm, fused)
    value = fused.meta.get("example_value")
    for i, (new, side) in enumerate(((q_new, q), (k_new, k))):
        for key in ("stack_trace", "nn_module_stack"):
            if key in side.out.meta:
                new.meta[key] = side.out.meta[key]
        if isinstance(value, (tuple, list)):
            new.meta["example_value"] = value[i]
        side.out.replace_all_uses_with(new)
    erase_dead(gm, [q.out, k.out, *q.interior, *k.interior])
    return fused
