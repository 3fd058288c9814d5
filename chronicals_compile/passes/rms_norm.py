"""RMSNorm (Llama, Qwen2, Mistral and kin) -> ``chronicals::rms_norm``.

Pattern, in transformers' words::

    xf = x.to(torch.float32)                       # or x.float(), or absent when x is fp32
    var = xf.pow(2).mean(-1, keepdim=True)          # or xf * xf; or .sum(-1, keepdim=True) / N
    normed = xf * torch.rsqrt(var + eps)            # eps: literal, or SymFloat under dynamic=True
    out = weight * normed.to(x.dtype)               # cast back to the *input* dtype, then scale

Anchored on ``rsqrt`` (rare), walked outward. The cast order matters: Gemma scales in fp32 and
casts after, which is a different function for bf16 inputs, so a missing cast-back is only
accepted when ``x`` is already fp32 (where the two orders coincide).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import (
    NoMatch, arg, binary_operands, cast_target, dtype_of, is_missing, is_number,
    meta, only_users_in, op, other_operand, replace_with_call,
)
from .sizes import same_size

NAME = "rms_norm"
_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def _single_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise NoMatch(f"{node.name} has {len(node.users)} users")
    return next(iter(node.users))


def _eps(value) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and isinstance(meta(value), (torch.SymFloat, float)):
        return value
    raise NoMatch("epsilon is not a float or a symbolic float")


def _squared_input(sq: fx.Node) -> fx.Node:
    name = op(sq)
    if name == "pow" and is_number(arg(sq, 1, "exponent"), 2):
        return arg(sq, 0, "input")
    if name == "mul":
        a, b = binary_operands(sq)
        if a is b and isinstance(a, fx.Node):
            return a
    raise NoMatch("variance is not the mean of a square")


def _is_last_dim(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _reduction(node: fx.Node, name: str) -> fx.Node:
    """For ``mean``/``sum`` over the last dim with keepdim, the reduced node's input."""
    if op(node) != name:
        raise NoMatch(f"expected {name}, found {op(node) or node.target}")
    src = arg(node, 0, "input")
    value = meta(src)
    if not isinstance(value, torch.Tensor):
        raise NoMatch("no shape information")
    if not _is_last_dim(arg(node, 1, "dim"), value.dim()) or arg(node, 2, "keepdim", False) is not True:
        raise NoMatch(f"{name} is not over the last dim with keepdim=True")
    if len(node.args) > 3 or node.kwargs.get("dtype") is not None:
        raise NoMatch(f"{name} has a dtype argument")
    return src


def _variance_source(var: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The squared node under ``var`` and the interior nodes walked through."""
    name = op(var)
    if name == "mean":
        return _reduction(var, "mean"), [var]
    if name in ("div", "mul"):
        total, divisor = binary_operands(var)
        if op(total) != "sum":
            raise NoMatch("variance is neither mean(...) nor sum(...)/N")
        sq = _reduction(total, "sum")
        squared = meta(_squared_input(sq))
        last = squared.shape[-1] if isinstance(squared, torch.Tensor) else None
        value = meta(divisor) if isinstance(divisor, fx.Node) else divisor
        if name == "mul" and isinstance(value, float) and last is not None and not isinstance(last, torch.SymInt):
            ok = value == 1.0 / last
        else:
            ok = name == "div" and last is not None and same_size(value, last)
        if not ok:
            raise NoMatch("sum(...)/N with N not the last dimension")
        return sq, [var, total]
    raise NoMatch(f"variance computed by {name or var.target}")


def match(rsqrt: fx.Node, ctx=None):
    add = arg(rsqrt, 0, "input")
    if op(add) != "add":
        raise NoMatch("rsqrt argument is not var + eps")
    a, b = binary_operands(add)
    var, eps = (a, b) if isinstance(meta(a), torch.Tensor) else (b, a)
    eps = _eps(eps)
    sq, reduction_nodes = _variance_source(var)
    xf = _squared_input(sq)
    normed = _single_user(rsqrt)
    if op(normed) != "mul" or other_operand(normed, rsqrt) is not xf:
        raise NoMatch("rsqrt is not multiplied by the squared tensor")
    xf_dtype = dtype_of(xf)
    if xf_dtype != torch.float32:
        raise NoMatch(f"statistics computed in {xf_dtype}, not float32")
    is_upcast = op(xf) in ("float", "to", "type") and cast_target(xf) == torch.float32
    x = arg(xf, 0, "input") if is_upcast else xf
    x_dtype = dtype_of(x)
    if x_dtype not in _FLOAT_TYPES:
        raise NoMatch(f"input dtype {x_dtype} unsupported")
    after = _single_user(normed)
    interior = [sq, *reduction_nodes, add, rsqrt, normed]
    if cast_target(after) is not None:
        if cast_target(after) != x_dtype:
            raise NoMatch(f"normalised value cast to {cast_target(after)}, not the input dtype {x_dtype}")
        interior.append(after)
        scaled_in, scale = after, _single_user(after)
    elif x_dtype == torch.float32:
        scaled_in, scale = normed, after
    else:
        raise NoMatch("no cast back to the input dtype before the weight (Gemma-style order)")
    if op(scale) != "mul":
        raise NoMatch("normalised value is not scaled by a weight")
    weight = other_operand(scale, scaled_in)
    w = meta(weight)
    xm = meta(x)
    if is_missing(weight) or not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise NoMatch("scale is not a 1-D weight tensor")
    if not same_size(w.shape[0], xm.shape[-1]) or w.dtype not in _FLOAT_TYPES:
        raise NoMatch("weight shape or dtype does not fit the input")
    out = meta(scale)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.promote_types(x_dtype, w.dtype):
        raise NoMatch("output dtype differs from the op's")
    if w.device != xm.device:
        raise NoMatch("weight and input on different devices")
    allowed = set(interior) | {scale}
    if not only_users_in(interior, allowed):
        raise NoMatch("an intermediate value is used outside the norm")
    # The upcast may feed other consumers too; then it stays and only the rest is replaced.
    upcast = [xf] if xf is not x and only_users_in([xf], allowed) else []
    return x, weight, eps, scale, interior + upcast


def is_anchor(node: fx.Node) -> bool:
    return op(node) == "rsqrt"


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    x, weight, eps, out, interior = found
    return replace_with_call(gm, out, torch.ops.chronicals.rms_norm.default, (x, weight, eps), interior)
