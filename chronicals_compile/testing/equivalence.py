"""Compiled-versus-eager training equivalence, the end-to-end proof every pass owes."""
from __future__ import annotations

import copy
from typing import Any

import torch


def loss_and_grads(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def compiled_vs_eager(model: torch.nn.Module, batch: dict[str, Any], *, options: dict | None = None,
                      dynamic: bool | None = None):
    """Run one training step eagerly and through ``explain``; return (report, eager, compiled).

    Each of ``eager`` and ``compiled`` is ``(loss, {param name: grad})``. The compiled copy is a
    deep copy, so both start from identical weights.
    """
    import chronicals_compile

    twin = copy.deepcopy(model)
    eager = loss_and_grads(model, batch)
    twin.zero_grad(set_to_none=True)
    report = chronicals_compile.explain(twin, options=options, dynamic=dynamic, **batch)
    report.output.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in twin.named_parameters() if p.grad is not None}
    return report, eager, (report.output.loss.detach(), grads)


def assert_same_training_step(eager, compiled, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
    assert grads_e.keys() == grads_c.keys(), set(grads_e) ^ set(grads_c)
    for name in grads_e:
        assert torch.isfinite(grads_c[name]).all(), name
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().sum() > 0 for g in grads_c.values()), "all gradients are zero"


def compile_and_capture(module: torch.nn.Module, *inputs: Any, dynamic: bool | None = None, **options: Any):
    """Run ``module`` through the backend (aot_eager); return (report, rewritten graphs, output).

    For pass tests that need to look at the graph the backend produced, not only at the counts.
    """
    from chronicals_compile.backend import chronicals_backend
    from chronicals_compile.report import collecting

    graphs = []

    def backend(gm, example_inputs, **kw):
        fn = chronicals_backend(gm, example_inputs,
                                options={"chronicals.compiler": "aot_eager",
                                         **{f"chronicals.{k}": v for k, v in options.items()}})
        graphs.append(gm)
        return fn

    with collecting() as report:
        out = torch.compile(module, backend=backend, dynamic=dynamic)(*inputs)
    return report, graphs, out


def train_losses(model: torch.nn.Module, batches, *, lr: float, cuda_graphs: bool = False) -> torch.Tensor:
    """AdamW steps over ``batches``; the fp32 loss of each step, stacked. With ``cuda_graphs`` each
    step is marked for CUDA-graph trees (``mode="reduce-overhead"``); losses are always cloned,
    since a graph's output is overwritten by its next replay."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().clone())
    return torch.stack(losses)
