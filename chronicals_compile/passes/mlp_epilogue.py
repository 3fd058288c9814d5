"""A gated MLP's three linears -> ``chronicals::gated_mlp``, whose activation runs in GEMM epilogues.

Pattern (Llama, Qwen2, Mistral, Gemma MLPs as Dynamo records them)::

    down = linear(act(linear(x, W_gate)) * linear(x, W_up), W_down)    # no biases
    act  = silu | a * sigmoid(a) | gelu(approximate="tanh")            # either order in the products

Why: the activation's forward and backward are elementwise passes over [tokens, intermediate]
tensors (~8 ms of Qwen2.5-0.5B's 8 x 2048 step on an H200) that a GEMM epilogue does for the cost
of its stores; QuACK's epilogue GEMMs win ~4 ms a step where ours in Triton lost
(``kernels/quack_gated_gemm.py`` has the figures).

Applied only where the fast path will run: CUDA (sm90/sm100) with QuACK importable, bf16 or
fp16, widths that are multiples of 8 (16-byte rows for the GEMMs' TMA). Anywhere else the op's
torch path would be slower than Inductor's own fusion, so the MLP is left alone, with one line in
``explain`` saying why. Refused, with the reason: biases, a value of the gate/up/product used
outside the MLP (peft LoRA's adapters read the product), mismatched dtypes or devices, the two
projections reading different inputs, autocast or grad mode changing inside the MLP.
Runs before ``swiglu`` and ``gate_recompute``, which would otherwise take the activation.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..kernels import quack_gated_gemm
from .graph_utils import (NoMatch, any_between, arg, is_noop_cast_of, is_regime_change, meta, op, other_operand,
                          plain_tensor, replace_with_first_output)
from .swiglu import _is_silu_product

NAME = "mlp_epilogue"


def _activation(node) -> tuple[fx.Node, str, list[fx.Node]] | None:
    """``(a, activation, interior)`` when ``node`` computes ``act(a)``, else None."""
    name = op(node)
    if name == "silu" and not arg(node, 1, "inplace", False):
        return arg(node, 0, "input"), "swiglu", [node]
    if name == "gelu" and arg(node, 1, "approximate", "none") == "tanh":
        return arg(node, 0, "input"), "geglu", [node]
    if name == "mul":
        for operand in node.args[:2]:
            if op(operand) == "sigmoid" and _is_silu_product(node, operand):
                return arg(operand, 0, "input"), "swiglu", [operand, node]
    return None


def _bare_linear(node, what: str) -> tuple[fx.Node, fx.Node]:
    """``(input, weight)`` of a bias-free linear."""
    if op(node) != "linear":
        raise NoMatch(f"the {what} is not a linear", quiet=True)
    if arg(node, 2, "bias") is not None:
        raise NoMatch(f"the {what} projection has a bias")
    return arg(node, 0, "input"), arg(node, 1, "weight")


def _source(x: fx.Node) -> fx.Node:
    """``x`` seen through casts to the dtype it already has (peft's adapter inputs)."""
    if isinstance(x, fx.Node) and x.args and isinstance(x.args[0], fx.Node) and is_noop_cast_of(x, x.args[0]):
        return x.args[0]
    return x


def fast_path_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why QuACK's kernels cannot run the op here (None: they can). CPU tests of the rewrite
    replace this to run the op's torch path, which computes the same layout."""
    return quack_gated_gemm.unavailable_reason(device, dtype)


def is_anchor(node: fx.Node) -> bool:
    return op(node) == "linear" and op(arg(node, 0, "input")) == "mul"


def match(node: fx.Node, ctx=None):
    product = arg(node, 0, "input")
    found = None
    for operand in product.args[:2]:
        act = _activation(operand)
        if act is not None:
            found = (operand, act)
            break
    if found is None:
        raise NoMatch("the down projection's input is not an activation times a tensor", quiet=True)
    act_out, (gate, activation, interior) = found
    up = other_operand(product, act_out)
    x_gate, w_gate = _bare_linear(gate, "gate")
    x_up, w_up = _bare_linear(up, "up")
    h, w_down = _bare_linear(node, "down")
    if _source(x_gate) is not _source(x_up):
        raise NoMatch("the gate and up projections read different inputs", quiet=True)
    inside = {*interior, product}
    for value, what in ((gate, "gate output"), (act_out, "activation"), (up, "up output"), (product, "gated product"),
                        *((inner, "activation's intermediate value") for inner in interior[:-1])):
        allowed = {node} if value is product else inside
        if not set(value.users) <= allowed:
            raise NoMatch(f"the {what} is used outside the MLP ({len(value.users)} users)")
    x = x_gate
    xm = meta(x)
    tensors = [meta(t) for t in (x, w_gate, w_up, w_down, gate, up, product, node)]
    if not all(plain_tensor(t) for t in tensors):
        raise NoMatch("no plain tensor metadata (a tensor subclass, or values not recorded)")
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise NoMatch("the MLP's inputs, weights and outputs differ in dtype or device (autocast, mixed weights)")
    wg, wu, wd = tensors[1:4]
    if wg.dim() != 2 or wu.shape != wg.shape or wd.dim() != 2 or wd.shape[1] != wg.shape[0] or xm.dim() < 1:
        raise NoMatch("weight shapes do not chain as gate/up [F, d], down [d_out, F]")
    sizes = (*wg.shape, wd.shape[0])
    if not all(isinstance(s, int) for s in sizes):
        raise NoMatch("symbolic weight shapes")
    if any(s % 8 for s in sizes):
        raise NoMatch(f"widths {sizes} are not multiples of 8 (the epilogue GEMMs need 16-byte rows)")
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    first = min((gate, up, *interior), key=order.__getitem__)
    if any_between(first, node, is_regime_change):
        raise NoMatch("autocast or grad mode changes inside the MLP")
    reason = fast_path_unavailable(xm.device, xm.dtype)
    if reason is not None:
        # said once per compile, and only on CUDA (on a CPU there is nothing to miss)
        told = xm.device.type != "cuda" or getattr(ctx, "_mlp_epilogue_told", False)
        if ctx is not None:
            ctx._mlp_epilogue_told = True
        raise NoMatch(f"left to Inductor: {reason}", quiet=told)
    dead = [gate, up, product, *interior] + ([x_up] if x_up is not x else [])
    return node, x, w_gate, w_up, w_down, activation, dead


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    down, x, w_gate, w_up, w_down, activation, interior = found
    keep = bool(getattr(getattr(ctx, "options", None), "mlp_keep_weight", False))
    return replace_with_first_output(gm, down, torch.ops.chronicals.gated_mlp.default,
                                     (x, w_gate, w_up, w_down, activation, keep), interior)
