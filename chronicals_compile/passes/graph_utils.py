"""Spelling-independent views of Dynamo's torch-level FX graph.

Dynamo records what the Python code wrote: ``x.pow(2)``, ``torch.pow(x, 2)`` and ``x ** 2`` are
three different nodes, arguments come as args or kwargs, ``.float()`` and ``.to(torch.float32)``
both cast. Matchers ask ``op(node)`` for a canonical name and ``arg(node, i, name)`` for an
argument instead of comparing targets, so one matcher covers every spelling.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree  # noqa: F401 - fake_mode_of walks multi-output values

class NoMatch(Exception):
    """A candidate that is not provably the pattern; the message is the reason explain shows.

    ``quiet``: the same refusal was already reported for a shared input (one mask feeding every
    layer's attention, say), so the driver does not repeat it.
    """

    def __init__(self, reason: str, *, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


_FUNCTIONS: dict[Any, str] = {
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow",
    operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem",
    torch.rsqrt: "rsqrt", torch.sqrt: "sqrt",
    torch.mean: "mean", torch.sum: "sum",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.stack: "stack", torch.flatten: "flatten",
    torch.tanh: "tanh", torch.sigmoid: "sigmoid",
    torch.nn.functional.silu: "silu", torch.nn.functional.gelu: "gelu",
    torch.nn.functional.relu: "relu", torch.relu: "relu", torch.nn.functional.dropout: "dropout",
    torch.nn.functional.linear: "linear", torch._C._nn.linear: "linear",
    torch.nn.functional.cross_entropy: "cross_entropy",
    torch.unsqueeze: "unsqueeze", torch.reshape: "reshape",
    torch.chunk: "chunk", torch.split: "split",
}
_METHODS = {
    "add": "add", "__add__": "add", "sub": "sub", "mul": "mul", "__mul__": "mul",
    "div": "div", "truediv": "div", "pow": "pow", "__pow__": "pow", "neg": "neg",
    "rsqrt": "rsqrt", "sqrt": "sqrt", "mean": "mean", "sum": "sum", "tanh": "tanh",
    "sigmoid": "sigmoid", "to": "to", "float": "float", "type": "type", "type_as": "type_as",
    "view": "view", "reshape": "reshape", "unsqueeze": "unsqueeze", "contiguous": "contiguous",
    "chunk": "chunk", "split": "split", "transpose": "transpose", "expand": "expand",
    "flatten": "flatten", "relu": "relu",
}


def op(node: Any) -> str | None:
    """Canonical name of what ``node`` computes, or None for anything unrecognised."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        name = _FUNCTIONS.get(node.target)
        if name is not None:
            return name
        if node.target is torch.nn.functional.silu:
            return "silu"
        return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    """Argument ``index`` (positional, counting ``self`` for methods) or keyword ``name``."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Replace argument ``index`` / keyword ``name``, wherever the call put it."""
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


#: ``F.scaled_dot_product_attention`` as Dynamo records it.
SDPA = frozenset({torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention})


def meta(node: Any) -> Any:
    """The fake tensor Dynamo recorded for ``node`` (None for literals and unknowns)."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    value = meta(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def cast_target(node: fx.Node) -> torch.dtype | None:
    """The dtype a cast node converts to, or None if ``node`` is not a pure dtype cast.

    Uses the recorded output dtype rather than parsing ``to``'s many overloads; a ``to`` that
    also moves devices is not a pure cast and is refused.
    """
    name = op(node)
    if name == "float":
        return torch.float32
    if name in ("to", "type", "type_as"):
        src, out = meta(node.args[0]), meta(node)
        if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.device == out.device:
            return out.dtype
    return None


def is_noop_cast_of(node: Any, x: fx.Node) -> bool:
    """``node`` casts ``x`` to the dtype ``x`` already has (peft casts each adapter's input this
    way). ``x`` must be the value cast: in ``y.type_as(x)`` (an RMSNorm's last line) ``x`` only
    names the dtype, and ``y`` is a different value."""
    if not isinstance(node, fx.Node) or not node.args or node.args[0] is not x or cast_target(node) is None:
        return False
    return cast_target(node) == dtype_of(x) and len(node.args) + len(node.kwargs) <= 2


def plain_tensor(value: Any) -> bool:
    """A tensor that is not a wrapper subclass (DTensor under FSDP / tensor parallelism)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return isinstance(value, torch.Tensor) and not is_traceable_wrapper_subclass(value)


def binary_operands(node: fx.Node) -> tuple[Any, Any]:
    return arg(node, 0, "input"), arg(node, 1, "other")


def other_operand(node: fx.Node, known: Any) -> Any:
    """For a commutative binary node with ``known`` as one operand, the other one."""
    a, b = binary_operands(node)
    if a is known:
        return b
    if b is known:
        return a
    return _MISSING


_MISSING = object()


def is_missing(value: Any) -> bool:
    return value is _MISSING


def only_users_in(nodes: Iterable[fx.Node], allowed: set[fx.Node]) -> bool:
    """True when no value computed inside a match escapes it (so it can be replaced whole)."""
    return all(all(u in allowed for u in n.users) for n in nodes)


def is_number(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == target


def fake_mode_of(nodes: "Iterable[Any] | fx.GraphModule"):
    """The fake mode that owns the nodes' recorded values (not the ambient tracing context's,
    which can differ inside a backend)."""
    if isinstance(nodes, fx.GraphModule):
        nodes = nodes.graph.nodes
    for value in map(meta, nodes):
        for leaf in torch.utils._pytree.tree_leaves(value):  # a multi-output node records a tuple
            mode = getattr(leaf, "fake_mode", None)
            if mode is not None:
                return mode
    return None


def set_fake_value(gm: fx.GraphModule, node: fx.Node) -> None:
    """Record ``example_value`` for a node we inserted, so later passes can read its dtype.

    Runs the op's fake kernel under the graph's own fake mode; on any failure the node simply
    has no metadata (later passes then refuse to match through it, which is safe).
    """
    mode = fake_mode_of(node.all_input_nodes)
    if mode is None:
        return

    def fake(a):
        if isinstance(a, fx.Node):
            return meta(a)
        return a

    try:
        args = torch.fx.node.map_aggregate(node.args, fake)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
        with mode:
            node.meta["example_value"] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - metadata is an optimisation for later passes
        pass


#: Calls that change how the ops after them run (autocast dtype, grad mode).
_REGIME_CHANGES = frozenset({"_enter_autocast", "_exit_autocast", "_set_grad_enabled", "_enter_inference_mode",
                             "_exit_inference_mode"})


def is_regime_change(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") in _REGIME_CHANGES


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                                operator.setitem, operator.ior, operator.iand})


def is_mutation(node: fx.Node) -> bool:
    """``node`` may write into an existing tensor (``x.add_()``, ``x += y``, ``x[i] = v``, ``out=``)."""
    if node.op not in ("call_function", "call_method"):
        return False
    if "out" in node.kwargs or node.target in _INPLACE_OPERATORS:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def any_between(first: fx.Node, last: fx.Node, predicate) -> bool:
    """``predicate`` holds for some node strictly between ``first`` and ``last`` (graph order)."""
    node = first.next
    while node is not last and node.op != "root":
        if predicate(node):
            return True
        node = node.next
    return False


def mutates_between(first: fx.Node, last: fx.Node) -> bool:
    """Some node between ``first`` and ``last`` writes in place: moving a read of a tensor across
    it could read another value (kept conservative: any mutation)."""
    return any_between(first, last, is_mutation)


def regime_runs(members: list[fx.Node]) -> list[list[fx.Node]]:
    """``members`` (in graph order, one graph) cut wherever autocast or grad mode changes between
    two: ops on either side of such a call do not run alike, so no rewrite may merge them."""
    runs, run = [], [members[0]]
    rest = set(members[1:])
    node = members[0].next
    while rest:
        if is_regime_change(node):
            runs.append(run)
            run = []
        if node in rest:
            run.append(node)
            rest.discard(node)
        node = node.next
    runs.append(run)
    return [r for r in runs if r]


def erase_dead(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase matched interior nodes that lost all users, latest first."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if n.graph is gm.graph and not n.users:
            gm.graph.erase_node(n)


def describe(node: fx.Node) -> str:
    stack = node.meta.get("stack_trace") or ""
    last = stack.strip().splitlines()[-2:-1] if stack else []
    where = last[0].strip() if last else ""
    return f"{node.name}" + (f" ({where})" if where else "")


def replace_with_call(gm: fx.GraphModule, out: fx.Node, target, args: tuple,
                      interior: Iterable[fx.Node] = ()) -> fx.Node:
    """Insert ``target(*args)`` before ``out``, reroute ``out``'s users to it, drop the dead match."""
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_function(target, args)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in out.meta:
            fused.meta[key] = out.meta[key]
    set_fake_value(gm, fused)
    out.replace_all_uses_with(fused)
    erase_dead(gm, [out, *interior])
    return fused


def replace_with_first_output(gm: fx.GraphModule, out: fx.Node, target, args: tuple,
                              interior: Iterable[fx.Node] = ()) -> fx.Node:
    """Insert ``target(*args)``, an op returning a tuple, before ``out``; reroute ``out``'s users
    to its first output; drop the dead match. Returns the op's node."""
    with gm.graph.inserting_before(out):
        fused = gm.graph.call_function(target, args)
        first = gm.graph.call_function(operator.getitem, (fused, 0))
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in out.meta:
            fused.meta[key] = first.meta[key] = out.meta[key]
    set_fake_value(gm, fused)
    set_fake_value(gm, first)
    out.replace_all_uses_with(first)
    erase_dead(gm, [out, *interior])
    return fused
