"""peft LoRA's ``base(x) + lora_B(lora_A(x)) * s`` becomes one ``chronicals::lora_linear``.

Why: the base GEMM and the adapter's B GEMM each write a [tokens, out] output that the add reads
back (Inductor folds the add into the next pointwise kernel, which then reads both), and backward
reads the incoming gradient three times. The op stacks the adapter along the reduction dimension
(``ops/lora_linear.py``): the output is written once and the gradient read twice. At Qwen2.5-0.5B
8 x 2048 the LoRA step's SiLU kernels alone take 6.5 ms more than full fine-tuning's for these
extra reads (session 6 profile); prediction for the gate and up projections: ~20 GB less traffic,
~6 ms of a 118 ms step.

Matched: ``add(linear(x, W, b), mul(linear(linear(x', A), B), s))`` in either operand order, ``x'``
being ``x`` or a cast of ``x`` to its own dtype (peft's ``_cast_input_dtype``), ``s`` a number,
every tensor of one dtype (peft's fp32 adapters on a bf16 base are left alone: ``--lora-dtype
model``/``autocast_adapter_dtype=False`` keeps them in the model's), plain tensors, no autocast or
grad-mode change inside. Only wide projections (out >= ``MIN_WIDENING`` x in): the op copies x into
``[x, t]``, which a narrow projection's saving does not repay. A dropout on the adapter's input
(``lora_dropout > 0``) gives it a different input than the base: left alone.

On by default: the Qwen2.5-0.5B LoRA r=32 step on the H200 went from 117.1 to 111.2 ms with it
(benchmarks/results/2026-12-02-h200-session7/call2/e2e_lora_levers.md).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graph_utils import (NoMatch, any_between, arg, binary_operands, cast_target, dtype_of, is_noop_cast_of,
                          is_regime_change, meta, mutates_between, op, plain_tensor, replace_with_first_output)

NAME = "lora_linear"
#: Projections at least this many times wider out than in (an MLP's gate and up: 4864 / 896).
MIN_WIDENING = 2


def _linear(node: Any) -> tuple[Any, Any, Any] | None:
    """(input, weight, bias) of a single-use linear, else None."""
    if op(node) != "linear" or len(node.users) != 1:
        return None
    return arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")


def _is_scalar(value: Any) -> bool:
    """A Python number, or a symbolic float (``dynamic=True`` turns peft's ``scaling`` into one)."""
    if isinstance(value, fx.Node):
        return isinstance(meta(value), torch.SymFloat)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaled_adapter(node: Any) -> dict | None:
    """The parts of ``linear(linear(x', A), B) * s`` (no biases), else None."""
    if op(node) != "mul" or len(node.users) != 1:
        return None
    a, b = binary_operands(node)
    for outer, scale in ((a, b), (b, a)):
        if not _is_scalar(scale):
            continue
        found_outer = _linear(outer)
        if found_outer is None or found_outer[2] is not None:
            return None
        inner = found_outer[0]
        found_inner = _linear(inner)
        if found_inner is None or found_inner[2] is not None:
            return None
        return {"input": found_inner[0], "lora_a": found_inner[1], "lora_b": found_outer[1],
                "scale": scale if isinstance(scale, fx.Node) else float(scale),
                "nodes": [node, outer, inner]}
    return None


def is_anchor(node: fx.Node) -> bool:
    return op(node) == "add"


def match(node: fx.Node, ctx=None) -> dict:
    if len(node.args) > 2 or set(node.kwargs) - {"input", "other"}:
        raise NoMatch("an add with alpha or out", quiet=True)
    a, b = binary_operands(node)
    for base, adapter in ((a, b), (b, a)):
        found_base, found = _linear(base), _scaled_adapter(adapter)
        if found_base is not None and found is not None:
            break
    else:
        raise NoMatch("not base(x) + lora_B(lora_A(x)) * s", quiet=True)
    x, weight, bias = found_base
    adapter_in = found["input"]
    w = meta(weight)
    if not plain_tensor(w) or w.dim() != 2 or not all(isinstance(s, int) for s in w.shape):
        raise NoMatch("the base weight is not a plain 2-D tensor of static shape")
    out, width = w.shape
    if out < MIN_WIDENING * width:
        raise NoMatch(f"narrow projection ({width} -> {out}): one GEMM saves less than the copy of x costs",
                      quiet=True)
    if adapter_in is not x and not is_noop_cast_of(adapter_in, x):
        if cast_target(adapter_in) is not None and adapter_in.args[0] is x:
            raise NoMatch(f"the adapters compute in {dtype_of(adapter_in)} on a {dtype_of(x)} base (peft's "
                          "default): keep them in the model's dtype (--lora-dtype model) to fuse them")
        raise NoMatch("the adapter reads another input than the base (a dropout on its input?)")
    tensors = {"x": x, "weight": weight, "lora_A": found["lora_a"], "lora_B": found["lora_b"],
               **({"bias": bias} if bias is not None else {})}
    values = {name: meta(t) for name, t in tensors.items()}
    if not all(isinstance(t, fx.Node) and plain_tensor(values[name]) for name, t in tensors.items()):
        raise NoMatch("an operand is not a plain tensor (a tensor subclass or a constant)")
    dtypes = {name: str(v.dtype).replace("torch.", "") for name, v in values.items()}
    if len(set(dtypes.values())) != 1 or not values["x"].is_floating_point():
        raise NoMatch(f"mixed dtypes {dtypes}: keep the adapters in the model's dtype to fuse them")
    if any(dtype_of(n) != values["x"].dtype for n in (node, base)):
        # autocast computes the linears in another dtype than their inputs'; the op would not
        raise NoMatch("under autocast (the linears compute in another dtype than their inputs)")
    la, lb = values["lora_A"], values["lora_B"]
    if not all(isinstance(s, int) for s in (*la.shape, *lb.shape)):
        raise NoMatch("symbolic adapter shapes")
    if la.dim() != 2 or la.shape[1] != width or tuple(lb.shape) != (out, la.shape[0]):
        raise NoMatch(f"adapter shapes {tuple(la.shape)}, {tuple(lb.shape)} do not fit the weight {tuple(w.shape)}")
    interior = [base, *found["nodes"]] + ([adapter_in] if adapter_in is not x else [])
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    first = min(interior, key=order.__getitem__)
    if any_between(first, node, is_regime_change):
        raise NoMatch("an autocast or grad-mode change lies between the base and the adapter")
    if mutates_between(first, node):
        raise NoMatch("an in-place op lies between the base and the add (the fused GEMM runs at the add)")
    return {"out": node, "args": (x, weight, bias, found["lora_a"], found["lora_b"], found["scale"]),
            "interior": interior}


def rewrite(gm: fx.GraphModule, found: dict, ctx) -> fx.Node:
    return replace_with_first_output(gm, found["out"], torch.ops.chronicals.lora_linear.default, found["args"],
                                     found["interior"])
