"""A dense attention mask that is provably plain causal -> ``is_causal=True``.

Under torch.compile transformers hands SDPA a dense boolean mask even when there is no padding
and no packing (its packed-sequence detection runs on traced position ids, so the eager-mode
``is_causal`` shortcut is never taken). A dense mask costs SDPA about twice the attention time
of the causal kernel (measured on an H200, ARCHITECTURE.md section 3).

Proof, not guess: the mask's whole ancestry must depend on no input tensor (only sizes and
literals: ``arange``, comparisons, ``cumsum``...), so it is a pure function of the shapes. We
then evaluate that ancestry and compare with ``tril``. In a static graph the shapes are the
guarded ones, so one evaluation is a proof; in a dynamic graph we evaluate at the example sizes
and at sizes past every literal in the ancestry (a sliding window, say), and refuse when that
would be too large to evaluate.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graph_utils import SDPA, NoMatch, arg, meta, set_arg
from .sizes import same_size

NAME = "causal_mask"
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.bernoulli, torch.rand_like, torch.randn_like,
           torch.nn.functional.dropout}
_MAX_PROBE = 8192


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA


def _ancestry(mask: fx.Node) -> list[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if isinstance(meta(node), torch.Tensor):
                raise NoMatch(f"mask depends on the input tensor {node.name} (padding or position ids)")
            continue
        if node.op not in ("call_function", "call_method"):
            raise NoMatch(f"mask depends on {node.op} {node.target}")
        if node.target in _RANDOM:
            raise NoMatch("mask depends on a random op")
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _hint(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        node = value.node
        hint = getattr(node, "hint", None)
        return int(hint) if hint is not None else int(node.shape_env.size_hint(node.expr))
    return None


def _evaluate(nodes: list[fx.Node], sizes: dict[fx.Node, int]) -> Any:
    env: dict[fx.Node, Any] = dict(sizes)

    def load(a):
        return env[a] if isinstance(a, fx.Node) else a

    for node in nodes:
        if node in env:
            continue
        args = fx.node.map_aggregate(node.args, load)
        kwargs = fx.node.map_aggregate(node.kwargs, load)
        if node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            self_obj, *rest = args
            env[node] = getattr(self_obj, node.target)(*rest, **kwargs)
    return env[nodes[-1]]


def _is_causal(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() < 2:
        return False
    q, k = value.shape[-2:]
    if q != k:
        return False
    causal = torch.ones(q, k, dtype=torch.bool, device=value.device).tril()
    return bool(torch.equal(value, causal.expand_as(value)))


def _literals(nodes: list[fx.Node]) -> list[int]:
    found: list[int] = []
    for node in nodes:
        fx.node.map_aggregate((node.args, node.kwargs),
                              lambda a: found.append(abs(int(a))) if isinstance(a, (int, float)) and not isinstance(a, bool) and float(a).is_integer() else None)
    return found


def prove_causal(mask: fx.Node) -> None:
    cache = mask.meta.setdefault("chronicals_causal_proof", {})
    if "result" in cache:
        if cache["result"] is not None:
            raise NoMatch(cache["result"], quiet=True)  # reported at the first attention using it
        return
    try:
        nodes = _ancestry(mask)
        symbols = {n: meta(n) for n in nodes if n.op == "placeholder"}
        hints = {n: _hint(v) for n, v in symbols.items()}
        if any(h is None for h in hints.values()):
            raise NoMatch("mask depends on a non-integer input")
        probes = [hints]
        if symbols:
            beyond = max([0, *_literals(nodes)]) + 2
            if beyond > _MAX_PROBE:
                raise NoMatch(f"mask has a literal ({beyond - 2}) too large to rule out by evaluation")
            # One size at a time: raising batch and length together would build a cube.
            probes += [{**hints, n: max(beyond, h + 3)} for n, h in hints.items()]
        with torch.no_grad():
            for probe in probes:
                if not _is_causal(_evaluate(nodes, probe)):
                    raise NoMatch("mask is not plain causal (sliding window, prefix or padding)")
    except NoMatch as reason:
        cache["result"] = str(reason)
        raise
    except Exception as err:  # noqa: BLE001 - an unevaluable mask is simply not proven
        cache["result"] = f"mask could not be evaluated: {err!r}"
        raise NoMatch(cache["result"]) from err
    cache["result"] = None


def match(sdpa: fx.Node, ctx=None):
    mask = arg(sdpa, 3, "attn_mask")
    if not isinstance(mask, fx.Node):
        raise NoMatch("no dense mask")
    if arg(sdpa, 5, "is_causal", False) is not False:
        raise NoMatch("is_causal already set")
    q, k = meta(arg(sdpa, 0, "query")), meta(arg(sdpa, 1, "key"))
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or not same_size(q.shape[-2], k.shape[-2]):
        raise NoMatch("query and key lengths differ (cached decoding)")
    prove_causal(mask)
    return sdpa, mask


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    sdpa, mask = found
    set_arg(sdpa, 3, "attn_mask", None)
    set_arg(sdpa, 5, "is_causal", True)
    if not mask.users:
        from .graph_utils import erase_dead

        erase_dead(gm, _ancestry_safe(mask))
    return sdpa


def _ancestry_safe(mask: fx.Node) -> list[fx.Node]:
    try:
        return [n for n in _ancestry(mask) if n.op != "placeholder"]
    except NoMatch:
        return [mask]
