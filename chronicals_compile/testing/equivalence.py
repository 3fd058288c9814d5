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


def assert_compiled_half_step_matches_float64(base: torch.nn.Module, batch: dict[str, Any], *,
                                              swaps: dict[str, int], options: dict | None = None,
                                              dtype: torch.dtype = torch.bfloat16,
                                              slack_scale: float = 2.0) -> None:
    """One training step of ``base`` compiled in ``dtype`` against a float64 copy: the loss and every
    gradient within ``dtype`` eager's own error of float64 plus the dtype's slack, after asserting
    that the compile swapped each pattern of ``swaps`` that many times (so a silent fallback cannot
    pass for the kernel under test) and that some gradient is non-zero. Why float64 and not eager
    ``dtype``: a half-precision kernel is right when it is as close to the exact step as torch's own
    half step is, not when it rounds the same way."""
    import chronicals_compile
    from ..verify.tolerance import assert_all_ok, measure

    def step(model: torch.nn.Module, compiled: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if compiled:
            report = chronicals_compile.explain(model, options=options, **batch)
            for name, count in swaps.items():
                assert report.swaps.get(name) == count, str(report)
            loss = report.output.loss
        else:
            loss = model(**batch).loss
        loss.backward()
        return [loss.detach()] + [p.grad for _, p in sorted(model.named_parameters())]

    ref = step(copy.deepcopy(base).double(), False)
    same = step(copy.deepcopy(base).to(dtype), False)
    torch._dynamo.reset()
    ours = step(copy.deepcopy(base).to(dtype), True)
    names = ["loss"] + [n for n, _ in sorted(base.named_parameters())]
    assert any(g is not None and g.abs().sum() > 0 for g in ours[1:])
    assert_all_ok([measure(n, o, s, r, dtype=dtype, slack_scale=slack_scale)
                   for n, o, s, r in zip(names, ours, same, ref)])
