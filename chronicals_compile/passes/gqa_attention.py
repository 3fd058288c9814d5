"""``sdpa(q, repeat_kv(k), repeat_kv(v))`` with no mask -> ``sdpa(q, k, v, enable_gqa=True)``.

transformers expands grouped-query keys and values to every query head (``repeat_kv``: an
unsqueeze, an ``expand`` and a ``reshape``, a real copy) whenever SDPA gets a mask; in eager mode
with no mask it passes ``enable_gqa=True`` instead. Under compile the mask is traced, so the copy
stays in the graph even after the causal-mask pass has replaced the mask by ``is_causal=True``;
its backward then reduces the expanded dK and dV over the groups. This pass gives SDPA the
unexpanded k and v, as transformers itself does without a mask: the same function (query head h
reads key/value head h // groups, which is what the expand-then-reshape layout means), proven
from the shapes.

On by default since the H200 measured it (torch 2.11, cuDNN takes enable_gqa; a backend that
declined it would hand the step to a slower kernel, so this was measured before it was switched
on): attention fwd+bwd at Qwen2.5-0.5B's 8 x 2048, 14/2 heads, 0.78 -> 0.67 ms a layer; the whole
step 134.7k -> 135.9k tok/s and 20.35 -> 19.23 GiB peak
(benchmarks/results/2026-12-01-h200-session5/attention.md, e2e_levers.md).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import SDPA, NoMatch, arg, erase_dead, meta, only_users_in, op, set_arg
from .sizes import same_size

NAME = "gqa_attention"
_FULL = slice(None, None, None)


def is_anchor(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA


def _unsqueezed_at_2(node: fx.Node) -> fx.Node:
    """``x[:, :, None]`` (or ``x.unsqueeze(2)``) of a 4-d x: returns x."""
    if op(node) == "getitem":
        index = node.args[1]
        if isinstance(index, tuple) and len(index) == 5 and index[2] is None and all(
                i == _FULL for j, i in enumerate(index) if j != 2):
            return node.args[0]
    if op(node) == "unsqueeze" and arg(node, 1, "dim") == 2:
        return arg(node, 0, "input")
    raise NoMatch(f"{node.name} is not x[:, :, None]")


def _repeat_kv_source(node: fx.Node) -> tuple[fx.Node, list[fx.Node], int]:
    """The unexpanded [B, kv_heads, S, D] tensor behind ``repeat_kv``'s output, the interior
    nodes, and the group size. Shapes are checked on the recorded fake tensors."""
    if op(node) not in ("reshape", "view") or not isinstance(node.args[0], fx.Node):
        raise NoMatch("key/value is not a reshape")
    expand = node.args[0]
    if op(expand) != "expand" or not isinstance(expand.args[0], fx.Node):
        raise NoMatch("key/value reshape does not read an expand")
    unsqueezed = expand.args[0]
    source = _unsqueezed_at_2(unsqueezed)
    x, e, out = meta(source), meta(expand), meta(node)
    if not all(isinstance(t, torch.Tensor) for t in (x, e, out)) or x.dim() != 4 or e.dim() != 5 or out.dim() != 4:
        raise NoMatch("repeat_kv shapes unknown")
    b, kv, s, d = x.shape
    groups = e.shape[2]
    if not isinstance(groups, int):
        raise NoMatch("symbolic group count")
    if not (same_size(e.shape[0], b) and same_size(e.shape[1], kv) and same_size(e.shape[3], s)
            and same_size(e.shape[4], d)):
        raise NoMatch("expand changes more than the group dimension")
    if not (same_size(out.shape[0], b) and same_size(out.shape[1], kv * groups) and same_size(out.shape[2], s)
            and same_size(out.shape[3], d)):
        raise NoMatch("reshape is not [B, kv_heads * groups, S, D]")
    return source, [node, expand, unsqueezed], groups


def match(sdpa: fx.Node, ctx=None):
    if arg(sdpa, 3, "attn_mask") is not None:
        raise NoMatch("attention has a mask (enable_gqa with a mask may leave the fast kernels)", quiet=True)
    if arg(sdpa, 7, "enable_gqa", False):
        raise NoMatch("enable_gqa already set", quiet=True)
    q = meta(arg(sdpa, 0, "query"))
    key, value = arg(sdpa, 1, "key"), arg(sdpa, 2, "value")
    if not all(isinstance(n, fx.Node) for n in (key, value)) or not isinstance(q, torch.Tensor):
        raise NoMatch("query/key/value unknown")
    try:
        k_src, k_nodes, k_groups = _repeat_kv_source(key)
        v_src, v_nodes, v_groups = _repeat_kv_source(value)
    except NoMatch as reason:
        raise NoMatch(str(reason), quiet=True) from None  # plain multi-head attention: nothing to say
    if k_groups != v_groups or k_groups < 2:
        raise NoMatch(f"key and value groups differ or are trivial ({k_groups}, {v_groups})")
    if q.dim() != 4 or not same_size(q.shape[1], meta(key).shape[1]):
        raise NoMatch("query heads are not the expanded key heads")
    interior = k_nodes + v_nodes
    if not only_users_in(interior, {*interior, sdpa}):
        raise NoMatch("the expanded key/value is used outside this attention")
    return sdpa, k_src, v_src, interior


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    sdpa, k_src, v_src, interior = found
    set_arg(sdpa, 1, "key", k_src)
    set_arg(sdpa, 2, "value", v_src)
    set_arg(sdpa, 7, "enable_gqa", True)
    erase_dead(gm, interior)
    return sdpa
