"""What an autograd graph holds for backward: the tensors its nodes saved, compiled graphs
included (AOTAutograd saves through ``ctx.save_for_backward``, which ``grad_fn.saved_tensors``
reads back). Used by the recompute tests and ``benchmarks/saved_activations.py``."""
from __future__ import annotations

import torch


def saved_tensors(loss: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor saved by a node of the graph behind ``loss``, node by node (a tensor two nodes
    saved appears twice; callers that count storage dedupe)."""
    seen, out, stack = set(), [], [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        try:
            tensors = fn.saved_tensors
        except (AttributeError, RuntimeError):
            tensors = ()
        out.extend(t for t in tensors if t is not None)
        stack.extend(f for f, _ in fn.next_functions)
    return out


def saved_bytes(loss: torch.Tensor) -> int:
    """Bytes of ``saved_tensors(loss)``, each saved tensor counted at its own size."""
    return sum(t.numel() * t.element_size() for t in saved_tensors(loss))


def held_tensors(loss: torch.Tensor) -> list[torch.Tensor]:
    """One saved tensor per distinct storage behind ``loss``: what holding the graph keeps alive
    (a saved view holds its whole storage)."""
    seen, out = set(), []
    for t in saved_tensors(loss):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def held_bytes(loss: torch.Tensor, parameters) -> int:
    """Bytes of the distinct storages saved behind ``loss`` that are not ``parameters``' own: what
    holding the graph for backward costs on top of the model (a saved weight is free, a saved
    copy of one is not)."""
    own = {(p.untyped_storage().data_ptr(), p.device) for p in parameters}
    return sum(t.untyped_storage().nbytes() for t in held_tensors(loss)
               if (t.untyped_storage().data_ptr(), t.device) not in own)


def cpu_peak_bytes(fn) -> int:
    """Peak bytes the CPU allocator held while ``fn()`` ran, above what it held when it started
    (the profiler's memory events): a forward's transient buffers, which ``held_bytes`` cannot
    see because they are gone by the time the forward returns. Blocks allocated before ``fn``
    and freed inside it are not reported as freed by the profiler, so such a free does not lower
    the count: an overestimate, the same for every variant a test compares on one workload."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"]
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(start, *(e["Total Allocated"] for e in events)) - start
