"""lm_head + cross-entropy -> ``chronicals::linear_cross_entropy*`` (cut cross-entropy).

Pattern, as transformers 5.x (``ForCausalLMLoss``) and ``F.linear_cross_entropy`` (without
``options``; torch 2.13 inlines it to these nodes) leave it in the Dynamo graph::

    logits = linear(h, W)                 # no bias; W may be the tied embedding; h may be [B, S, d]
    z = logits.float()                    # optional casts (up, never down)
    z = z / s  |  z * s                   # optional logit scaling by a constant (Granite, Cohere)
    z = cap * tanh(z / cap)               # optional soft-cap (Gemma 2/3), in any mul/div spelling
    z = z.view(-1, V)                     # or reshape; absent when logits are already [N, V]
    loss = F.cross_entropy(z, target, ignore_index=..., reduction="mean"|"sum", label_smoothing=...)
    loss = loss / num_items_in_batch      # when the caller passes it: left in the graph, untouched

Anchored on ``cross_entropy`` and walked up to the ``linear``. Every elementwise step between
them is folded into ``z = c2 * tanh(c1 * raw)`` (or ``z = c * raw``): op arguments
``softcap = c2`` and ``scale = c1 * c2``. Refused with a reason: class weights, a bias, anything
else between lm_head and the loss (a LoRA-wrapped lm_head adds ``lora_B(lora_A(h))`` there),
probability targets, ``reduction="none"``, float64, a logits value used by anything but the loss
and the graph's outputs.

Logits are usually a graph output too (``CausalLMOutput.logits``), and a grad-requiring output
makes AOTAutograd materialise a zero [B, S, V] tangent. ``chronicals.logits`` decides:
``drop`` (the output slot becomes None; warns once), ``detach`` (logits recomputed from detached
h and W: right values, no backward memory), ``keep`` (the original lm_head stays, computed twice),
``auto`` = drop when training (grad enabled and h or W requires grad), keep otherwise. Without
gradients and with logits returned anyway, the loss from the materialised logits is cheaper than
recomputing them, so the pattern is left alone (reported) unless the policy is ``drop``.

Training graphs get ``linear_cross_entropy_fused`` (gradients computed during the forward, the
logits computed once) unless ``chronicals.cce_mode="recompute"`` selects the forward op whose
backward recomputes the logit tiles (``"lean"``: the same op walking vocabulary slices, the least
memory); graphs without gradients get the forward op alone. (The fused
op's CUDA implementation reads ``CHRONICALS_CCE_LOGITS=matmul|tiles``: a kernel-level choice with no
place in the op's schema yet.)
"""
from __future__ import annotations

import operator
import os
import warnings

import torch
import torch.fx as fx

from ..config import CCE_MODES
from .graph_utils import NoMatch, arg, cast_target, dtype_of, erase_dead, meta, op, set_fake_value
from .sizes import same_size

NAME = "linear_cross_entropy"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_warned_drop = False


def is_anchor(node: fx.Node) -> bool:
    return op(node) == "cross_entropy"


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _literal(node: fx.Node, index: int, name: str, default):
    value = arg(node, index, name, default)
    if isinstance(value, fx.Node):
        raise NoMatch(f"cross_entropy {name} is a graph value, not a constant")
    return value


def _ce_arguments(ce: fx.Node) -> tuple[int, str, float]:
    if arg(ce, 2, "weight") is not None:
        raise NoMatch("class weights (weight=...) are not supported")
    if arg(ce, 3, "size_average") is not None or arg(ce, 5, "reduce") is not None:
        raise NoMatch("legacy size_average/reduce arguments")
    ignore_index = _literal(ce, 4, "ignore_index", -100)
    reduction = _literal(ce, 6, "reduction", "mean")
    smoothing = _literal(ce, 7, "label_smoothing", 0.0)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise NoMatch(f"ignore_index {ignore_index!r} is not an int")
    if reduction not in ("mean", "sum"):
        raise NoMatch(f"reduction={reduction!r} (only mean and sum are fused)")
    smoothing = _number(smoothing)
    if smoothing is None or not 0.0 <= smoothing <= 1.0:
        raise NoMatch("label_smoothing is not a constant in [0, 1]")
    return ignore_index, reduction, smoothing


def _flatten_source(logits2d: fx.Node) -> fx.Node:
    """Under a ``view(-1, V)``/``reshape`` that flattens leading dims, the unflattened logits."""
    out = meta(logits2d)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise NoMatch("cross_entropy input is not 2-D logits")
    if op(logits2d) in ("view", "reshape"):
        src = arg(logits2d, 0, "input")
        value = meta(src)
        # A reshape to (-1, V) of a (..., V) tensor is necessarily the row-major flatten.
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and same_size(value.shape[-1], out.shape[-1]):
            return src
        raise NoMatch("the reshape before cross_entropy is not a flatten of the leading dims")
    return logits2d


def _step(node: fx.Node) -> tuple[str, float | None, fx.Node]:
    """Classify one elementwise step between lm_head and the loss: (kind, factor, input)."""
    target = cast_target(node)
    if target is not None:
        src = arg(node, 0, "input")
        src_dtype = dtype_of(src)
        if target not in _FLOATS or src_dtype not in _RANK or _RANK[target] < _RANK[src_dtype]:
            raise NoMatch(f"logits cast from {src_dtype} to {target} (only upcasts are fused)")
        return "cast", None, src
    name = op(node)
    if name == "tanh":
        return "tanh", None, arg(node, 0, "input")
    if name in ("mul", "div"):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        if isinstance(a, fx.Node) and _number(b) is not None:
            value, src = _number(b), a
        elif name == "mul" and isinstance(b, fx.Node) and _number(a) is not None:
            value, src = _number(a), b
        else:
            raise NoMatch(f"logits {name} by a tensor between lm_head and the loss")
        if name == "div":
            if value == 0.0:
                raise NoMatch("logits divided by zero")
            value = 1.0 / value
        return "scale", value, src
    raise NoMatch(f"logits go through {name or node.target} between lm_head and the loss "
                  "(a LoRA-wrapped or otherwise modified lm_head is not fused)")


def _fold(steps: list[tuple[str, float | None]]) -> tuple[float, float]:
    """Steps top-down -> (softcap, scale) of the op: z = c2 * tanh(c1 * raw) or z = c1 * raw."""
    before, after, seen_tanh = 1.0, 1.0, False
    for kind, value in steps:
        if kind == "tanh":
            if seen_tanh:
                raise NoMatch("more than one tanh between lm_head and the loss")
            seen_tanh = True
        elif kind == "scale":
            if seen_tanh:
                after *= value
            else:
                before *= value
    if not seen_tanh:
        return 0.0, before
    if after == 0.0:
        raise NoMatch("soft-cap multiplied by zero")
    return after, before * after


def _requires_grad(node) -> bool:
    value = meta(node)
    return isinstance(value, torch.Tensor) and value.requires_grad


class Found:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def match(ce: fx.Node, ctx=None) -> Found:
    ignore_index, reduction, smoothing = _ce_arguments(ce)
    logits2d = arg(ce, 0, "input")
    target = arg(ce, 1, "target")
    t = meta(target)
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        raise NoMatch("target is not a 1-D int64 class-index tensor (probability targets are not fused)")
    if not isinstance(logits2d, fx.Node):
        raise NoMatch("cross_entropy input is not a graph value")
    ce_value = meta(ce)
    if not isinstance(ce_value, torch.Tensor) or ce_value.dtype not in _FLOATS:
        raise NoMatch("loss dtype unknown or unsupported")

    # Walk up: optional flatten, then elementwise steps, to the linear.
    chain = []  # bottom-up: the nodes between the linear (exclusive) and cross_entropy
    node = _flatten_source(logits2d)
    if node is not logits2d:
        chain.append(logits2d)
    steps = []
    while op(node) != "linear":
        if not isinstance(node, fx.Node) or len(chain) > 16:
            raise NoMatch("no lm_head linear feeding the loss")
        kind, value, src = _step(node)
        chain.append(node)
        steps.append((kind, value))
        node = src
    linear = node
    steps.reverse()
    chain.reverse()  # top-down now
    softcap, scale = _fold(steps)

    h, w = arg(linear, 0, "input"), arg(linear, 1, "weight")
    if arg(linear, 2, "bias") is not None:
        raise NoMatch("lm_head has a bias")
    hv, wv, lv = meta(h), meta(w), meta(linear)
    if not all(isinstance(x, torch.Tensor) for x in (hv, wv, lv)):
        raise NoMatch("no shape information for lm_head")
    if wv.dim() != 2 or hv.dim() < 1 or not same_size(hv.shape[-1], wv.shape[1]):
        raise NoMatch("lm_head weight is not [V, d]")
    if hv.dtype not in _FLOATS or wv.dtype not in _FLOATS or lv.dtype not in _FLOATS:
        raise NoMatch(f"lm_head dtypes {hv.dtype}/{wv.dtype}/{lv.dtype} unsupported")
    if hv.device != wv.device or hv.device != t.device:
        raise NoMatch("lm_head input, weight and target on different devices")
    if not same_size(meta(logits2d).shape[-1], wv.shape[0]):
        raise NoMatch("loss is not over lm_head's vocabulary dimension")
    if not same_size(meta(logits2d).shape[0], t.shape[0]):
        raise NoMatch("target length differs from the number of logit rows")

    # Who else reads the logits? Only the graph's outputs may.
    interior = [linear, *chain]
    inside = set(interior) | {ce}
    escapes, dead = [], []
    for n in interior:
        for user in n.users:
            if user in inside:
                continue
            if not user.users and user.op in ("call_function", "call_method") and not user.is_impure():
                dead.append(user)  # an unused value Dynamo left in the graph
                continue
            if user.op == "output":
                if ctx is not None and n.graph is not ctx.root.graph:
                    raise NoMatch("logits are an output of a nested graph")
                escapes.append(n)
            else:
                raise NoMatch(f"logits value {n.name} is also used by {user.name}")

    training = bool(getattr(ctx, "grad_enabled", True)) and (_requires_grad(h) or _requires_grad(w))
    policy = getattr(getattr(ctx, "options", None), "logits", "auto")
    if policy == "auto":
        policy = "drop" if training else "keep"
    if escapes and not training and policy != "drop":
        raise NoMatch(f"no gradients and the logits are returned (chronicals.logits={policy}): "
                      "the loss from the materialised logits is cheaper than recomputing them")
    return Found(ce=ce, linear=linear, h=h, w=w, target=target, chain=chain, escapes=escapes, dead=dead,
                 ignore_index=ignore_index, reduction=reduction, smoothing=smoothing,
                 softcap=softcap, scale=scale, policy=policy, training=training,
                 need_dh=training and _requires_grad(h), need_dw=training and _requires_grad(w))


def _mode(ctx) -> str:
    """``chronicals.cce_mode``; the CHRONICALS_CCE_MODE environment variable still overrides it
    (benchmarks flip it without recompiling their option plumbing)."""
    mode = os.environ.get("CHRONICALS_CCE_MODE") or getattr(getattr(ctx, "options", None), "cce_mode", "fused")
    return mode if mode in CCE_MODES else "fused"


def _insert(gm: fx.GraphModule, kind: str, target, args: tuple, like: fx.Node | None = None) -> fx.Node:
    node = gm.graph.create_node(kind, target, args)
    if like is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    if kind == "call_function":
        set_fake_value(gm, node)
    else:
        _fake_method(gm, node)
    return node


def _fake_method(gm: fx.GraphModule, node: fx.Node) -> None:
    from .graph_utils import fake_mode_of

    mode = fake_mode_of(gm)
    if mode is None:
        return
    try:
        args = fx.node.map_aggregate(node.args, lambda a: meta(a) if isinstance(a, fx.Node) else a)
        with mode:
            node.meta["example_value"] = getattr(args[0], node.target)(*args[1:])
    except Exception:  # noqa: BLE001 - metadata only
        pass


def _replace_outputs(gm: fx.GraphModule, mapping: dict) -> None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out.args = fx.node.map_arg(out.args, lambda n: mapping.get(n, n) if n in mapping else n)


def _outputs_must_be_tensors() -> bool:
    """True while Dynamo's DDPOptimizer compiles one bucket's piece of a graph: AOTAutograd then
    reads the metadata of every forward output (``fakify_first_call``), and a None output, which
    Dynamo itself never produces, crashes it."""
    tc = torch._guards.TracingContext.try_get()
    return tc is not None and (getattr(tc, "fakify_first_call", False)
                               or getattr(tc, "ddp_optimizer_ctx", None) is not None)


def _warn_drop() -> None:
    global _warned_drop
    if not _warned_drop:
        _warned_drop = True
        warnings.warn(
            "chronicals: lm_head + cross-entropy is fused, so the model returns logits=None "
            "(an empty tensor under DDP) (chronicals.logits='drop', the training default). Pass options "
            "{'chronicals.logits': 'detach'} (values, no gradient) or 'keep' to get them back.",
            UserWarning, stacklevel=2)


def rewrite(gm: fx.GraphModule, found: Found, ctx) -> fx.Node:
    ops = torch.ops.chronicals
    graph = gm.graph
    ce = found.ce
    with graph.inserting_before(ce):
        h = _insert(gm, "call_function", torch.flatten, (found.h, 0, -2), ce)
        w = found.w
        out_dtype = dtype_of(found.linear)
        if dtype_of(found.h) != out_dtype:  # ambient autocast: apply its casts explicitly
            h = _insert(gm, "call_method", "to", (h, out_dtype), ce)
        if dtype_of(found.w) != out_dtype:
            w = _insert(gm, "call_method", "to", (w, out_dtype), ce)
        common = (h, w, found.target, found.ignore_index, found.reduction, found.smoothing,
                  found.softcap, found.scale)
        rows = getattr(getattr(ctx, "options", None), "cce_chunk_rows", None) or 0
        mode = _mode(ctx)
        if found.training and (found.need_dh or found.need_dw) and mode == "fused":
            fused = _insert(gm, "call_function", ops.linear_cross_entropy_fused.default,
                            common + (found.need_dh, found.need_dw, rows), ce)
        else:
            layout = "lean" if mode == "lean" else ""
            fused = _insert(gm, "call_function", ops.linear_cross_entropy.default, common + (rows, layout), ce)
        loss = _insert(gm, "call_function", operator.getitem, (fused, 0), ce)
        if dtype_of(ce) != torch.float32:
            loss = _insert(gm, "call_method", "to", (loss, dtype_of(ce)), ce)
    ce.replace_all_uses_with(loss)

    if found.escapes:
        if found.policy == "drop":
            if _outputs_must_be_tensors():
                with graph.inserting_before(ce):
                    empty = _insert(gm, "call_method", "new_empty", (loss, (0,)), ce)
                _replace_outputs(gm, {n: empty for n in found.escapes})
                ctx.note("linear_cross_entropy: logits dropped; a piece of a DDP-split graph must "
                         "return tensors, so the model returns an empty logits tensor")
            else:
                _replace_outputs(gm, {n: None for n in found.escapes})
                ctx.note("linear_cross_entropy: logits dropped from the outputs (chronicals.logits=drop)")
            _warn_drop()
        elif found.policy == "detach":
            last = max(found.escapes, key=lambda n: [found.linear, *found.chain].index(n))
            with graph.inserting_before(ce):
                env = {}
                hd = _insert(gm, "call_method", "detach", (found.h,), found.linear)
                wd = _insert(gm, "call_method", "detach", (found.w,), found.linear)
                env[found.linear] = _insert(gm, "call_function", found.linear.target, (hd, wd, None), found.linear)
                for n in found.chain[: found.chain.index(last) + 1] if last is not found.linear else []:
                    copy = graph.node_copy(n, lambda a: env.get(a, a))
                    env[n] = copy
            _replace_outputs(gm, {n: env[n] for n in found.escapes})
        # keep: the original lm_head (and transform) stay in the graph for the outputs
    erase_dead(gm, [*found.dead, ce, *found.chain, found.linear])
    return fused
