"""Gated MLP activations -> ``chronicals::swiglu`` / ``chronicals::geglu``.

Pattern, whatever produces ``a`` and ``b`` (two linears, peft LoRA's ``add(linear, lora)``, the
two halves of one fused ``gate_up`` projection split by ``chunk`` or slicing)::

    out = silu(a) * b               # F.silu, nn.SiLU / ACT2FN["silu"] (inlined), either order
    out = (a * sigmoid(a)) * b      # the spelled-out SiLU, either order in both products
    out = gelu(a, approximate="tanh") * b   # Gemma's GeGLU (ACT2FN["gelu_pytorch_tanh"])

Anchored on the activation, only when one of its users is a ``mul`` (so plain, ungated SiLU or
GELU MLPs are not candidates and add no noise to ``explain``). Refused, with the reason: ``a`` and
``b`` of different dtypes or shapes (broadcasting), the activation's value used elsewhere
(it would have to be recomputed or kept), erf GELU, in-place SiLU, an output dtype that is not
the inputs'. torch rounds ``act(a)`` to ``a.dtype`` before the product; the op computes in fp32
and rounds once, which the tolerance rule allows.

Both spellings are reported under the one pattern name ``swiglu`` (and ``chronicals.disable=
["swiglu"]`` turns both off).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import NoMatch, arg, dtype_of, meta, only_users_in, op, other_operand, replace_with_call
from .sizes import same_size

NAME = "swiglu"
_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_silu_product(mul: fx.Node, sig: fx.Node) -> bool:
    """``mul`` is ``x * sigmoid(x)`` with ``sig`` the sigmoid."""
    return op(mul) == "mul" and other_operand(mul, sig) is arg(sig, 0, "input")


def is_anchor(node: fx.Node) -> bool:
    name = op(node)
    if name in ("silu", "gelu"):
        return any(op(u) == "mul" for u in node.users)
    if name == "sigmoid":
        return any(_is_silu_product(u, node) and any(op(v) == "mul" for v in u.users) for u in node.users)
    return False


def _single_user(node: fx.Node, what: str) -> fx.Node:
    if len(node.users) != 1:
        raise NoMatch(f"{what} has {len(node.users)} users (its value is needed outside the gate)")
    return next(iter(node.users))


def _activation(node: fx.Node) -> tuple[fx.Node, fx.Node, str, list[fx.Node]]:
    """``(a, act_out, kind, interior)`` for the activation anchored at ``node``."""
    name = op(node)
    a = arg(node, 0, "input")
    if name == "silu":
        if arg(node, 1, "inplace", False):
            raise NoMatch("in-place silu")
        return a, node, "swiglu", [node]
    if name == "gelu":
        approximate = arg(node, 1, "approximate", "none")
        if approximate != "tanh":
            raise NoMatch(f"gelu(approximate={approximate!r}) gate: only the tanh approximation is fused")
        return a, node, "geglu", [node]
    # a * sigmoid(a)
    act = _single_user(node, "sigmoid(a)")
    if not _is_silu_product(act, node):
        raise NoMatch("sigmoid(a) is not multiplied by a")
    return a, act, "swiglu", [node, act]


def match(node: fx.Node, ctx=None):
    a, act, kind, interior = _activation(node)
    out = _single_user(act, f"{'silu' if kind == 'swiglu' else 'gelu'}(a)")
    if op(out) != "mul":
        raise NoMatch("activation is not multiplied by a gate operand")
    b = other_operand(out, act)
    if not isinstance(b, fx.Node) or b is act:
        raise NoMatch("gate operand is not a tensor")
    am, bm, om = meta(a), meta(b), meta(out)
    if not all(isinstance(t, torch.Tensor) for t in (am, bm, om)):
        raise NoMatch("no tensor metadata")
    if am.dtype != bm.dtype:
        raise NoMatch(f"a is {am.dtype} but b is {bm.dtype}")
    if am.dtype not in _FLOAT_TYPES:
        raise NoMatch(f"dtype {am.dtype} unsupported")
    if am.dim() == 0 or am.dim() != bm.dim() or not all(same_size(x, y) for x, y in zip(am.shape, bm.shape)):
        raise NoMatch(f"shapes differ (broadcast): a {tuple(am.shape)}, b {tuple(bm.shape)}")
    if om.dtype != am.dtype or dtype_of(act) != am.dtype:
        raise NoMatch(f"output dtype {om.dtype} is not the inputs' {am.dtype}")
    if am.device != bm.device:
        raise NoMatch("a and b on different devices")
    if not only_users_in(interior, set(interior) | {out}):
        raise NoMatch("an intermediate value is used outside the gate")
    return a, b, kind, out, interior


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    a, b, kind, out, interior = found
    target = torch.ops.chronicals.swiglu.default if kind == "swiglu" else torch.ops.chronicals.geglu.default
    return replace_with_call(gm, out, target, (a, b), interior)
