"""The ``chronicals`` torch.compile backend: options -> our FX passes -> Inductor.

Registered only through the ``torch_dynamo_backends`` entry point (a second ``register_backend``
call would raise "duplicate name"). This module imports nothing but torch at import time so that
``torch._dynamo.list_backends()`` stays cheap; passes, ops and Triton load on first compile.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def chronicals_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *,
                       mode: str | None = None, options: dict[str, Any] | None = None) -> Callable:
    from .config import split_options
    from .passes import run_passes
    from .report import record_graph

    ours, inductor_options = split_options(options)
    record_graph()
    run_passes(gm, example_inputs, ours)
    mode = mode or ours.mode
    if ours.compiler == "eager":
        return gm.forward
    if ours.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **inductor_options}
    if ours.pdl and hasattr(torch._inductor.config.triton, "enable_pdl"):
        patches.setdefault("triton.enable_pdl", True)
    # the compile caches hash graphs, not our ops' bodies or our node metadata: key them by our source
    from .compile_cache import joint_pass_patch

    patches.update(joint_pass_patch(patches, ours))
    if ours.memory_budget is None:
        return compile_fx(gm, example_inputs, config_patches=patches or None)
    # The partition (what forward saves for backward) is decided while compile_fx runs.
    with torch._functorch.config.patch(activation_memory_budget=float(ours.memory_budget)):
        return compile_fx(gm, example_inputs, config_patches=patches or None)
