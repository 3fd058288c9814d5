"""FX graph rewrites, one module per pattern, and the driver that runs them safely.

Each pattern module exposes ``NAME``, ``is_anchor(node)``, ``match(node)`` (raises ``NoMatch``
with a reason) and ``rewrite(gm, found, ctx)``. The driver owns everything else: recursion into
gradient-checkpointing bodies, reporting, and the rule that a failing pass never fails a compile.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Any, Sequence

import torch
import torch.fx as fx

from .. import report
from ..config import CUDA_OFF_BY_DEFAULT, CUDA_UNAVAILABLE, Options
from .graph_utils import NoMatch, describe

log = logging.getLogger("chronicals_compile")

#: Order matters: later passes see the earlier ones' ops (e.g. CE after norms); lora_linear before
#: the MLP passes (they read its output like a linear's); flash_attention after the two that
#: leave SDPA causal and grouped; mlp_epilogue before swiglu and
#: gate_recompute (they would take its activation); concat_linear and concat_narrow_linear last,
#: since the others match a projection by its own ``linear``.
PASS_MODULES = ("causal_mask", "gqa_attention", "flash_attention", "rms_norm", "add_rms_norm", "lora_linear",
                "mlp_epilogue", "swiglu", "gate_recompute", "rope", "linear_cross_entropy", "concat_linear",
                "concat_narrow_linear")


@dataclasses.dataclass
class PassContext:
    """What a rewrite may need beyond the graph: options, grad mode, the example inputs."""

    options: Options
    example_inputs: Sequence[Any]
    root: fx.GraphModule
    grad_enabled: bool = dataclasses.field(default_factory=torch.is_grad_enabled)
    #: Swaps are held until every rewrite succeeded: a graph restored after a failure swapped nothing.
    pending_swaps: list = dataclasses.field(default_factory=list)

    def swap(self, pattern: str, where: str) -> None:
        self.pending_swaps.append((pattern, where))

    def commit(self) -> None:
        for pattern, where in self.pending_swaps:
            report.record_swap(pattern, where)
        self.pending_swaps.clear()

    def fallback(self, pattern: str, where: str, reason: str) -> None:
        report.record_fallback(pattern, where, reason)

    def note(self, text: str) -> None:
        report.record_note(text)

    def example_for(self, node: fx.Node) -> Any:
        """The example input behind a placeholder of the root graph (e.g. a lifted epsilon)."""
        if node.op != "placeholder" or node.graph is not self.root.graph:
            return None
        placeholders = [n for n in self.root.graph.nodes if n.op == "placeholder"]
        index = placeholders.index(node)
        return self.example_inputs[index] if index < len(self.example_inputs) else None


def _load(name: str):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            return None  # pattern not written yet
        raise


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The root and every nested body (checkpointed layers live in ``wrap_body_*``)."""
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


def run_pattern(module, gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or not module.is_anchor(node):
            continue
        try:
            found = module.match(node, ctx)
        except NoMatch as reason:
            if not reason.quiet:
                ctx.fallback(module.NAME, describe(node), str(reason))
            continue
        except Exception as err:  # noqa: BLE001 - a matcher bug must not fail the compile
            log.debug("chronicals: %s matcher raised", module.NAME, exc_info=True)
            ctx.fallback(module.NAME, describe(node), f"matcher error: {err!r}")
            continue
        fused = module.rewrite(gm, found, ctx)
        ctx.swap(module.NAME, describe(fused))


def _device_type(example_inputs: Sequence[Any]) -> str | None:
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return None


def _snapshot(gm: fx.GraphModule) -> fx.Graph:
    copy = fx.Graph(owning_module=gm, tracer_cls=gm.graph._tracer_cls)
    out = copy.graph_copy(gm.graph, {})
    copy.output(out)
    return copy


def run_passes(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Options) -> None:
    """Rewrite ``gm`` in place; on any rewrite failure restore every graph as it was."""
    from .. import ops  # noqa: F401 - registers torch.ops.chronicals.*

    ctx = PassContext(options, example_inputs, gm)
    modules = _graph_modules(gm)
    device_type = _device_type(example_inputs)
    saved = {m: _snapshot(m) for m in modules}
    try:
        for name in PASS_MODULES:
            module = _load(name)
            if module is None:
                continue
            if not options.enabled(name, device_type):
                if name in options.enable and device_type == "cuda" and name in CUDA_UNAVAILABLE:
                    ctx.note(f"{name} is not applied on CUDA although enabled: {CUDA_UNAVAILABLE[name]}")
                elif name not in options.disable and name in CUDA_OFF_BY_DEFAULT:
                    ctx.note(f"{name} off by default on CUDA: {CUDA_OFF_BY_DEFAULT[name]}; "
                             f"turn it on with enable=[{name!r}]")
                continue
            for m in modules:
                run_pattern(module, m, ctx)
        for m in modules:
            m.graph.lint()
            m.recompile()
        ctx.commit()
    except Exception as err:  # noqa: BLE001
        log.warning("chronicals: a rewrite failed (%r); compiling the graph unchanged", err, exc_info=True)
        for m, graph in saved.items():
            m.graph = graph
            m.recompile()
        ctx.pending_swaps.clear()
        ctx.note(f"rewrites abandoned after an internal error: {err!r}")
