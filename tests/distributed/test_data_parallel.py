"""Data parallel training through the backend: two CPU processes (gloo), DDP and FSDP2.

Compiling the DDP-wrapped module lets Dynamo's DDPOptimizer split the graph at gradient-bucket
boundaries, so our passes meet pieces of the model rather than the whole: a pattern cut in two
must be left alone, never mis-rewritten, and the all-reduced gradients must equal eager DDP's.
The same processes also compile the inner module in place and then wrap it (the HF Trainer /
accelerate way); DDP marks itself active during its forward, so Dynamo splits that graph too.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker) -> dict:
    """Run ``worker(rank, port, results)`` on WORLD processes; every rank's results."""
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(worker, args=(_free_port(), results), nprocs=WORLD, start_method="spawn", join=True)
    assert sorted(results.keys()) == list(range(WORLD))
    return dict(results)


@contextlib.contextmanager
def _process_group(rank: int, port: int):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _step(model, batch, out=None, kind=None):
    from torch._dynamo.utils import counters

    counters["chronicals"].clear()
    result = model(**batch)
    result.loss.backward()
    if out is not None:
        out[f"{kind}_swaps"] = dict(counters["chronicals"])
        out[f"{kind}_logits"] = None if result.logits is None else tuple(result.logits.shape)
    return result.loss.detach()


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _model():
    """About 2.4 MB of fp32 parameters: with 1 MB buckets DDPOptimizer cuts the graph in three."""
    from chronicals_compile.testing import tiny_model

    return tiny_model("qwen2", layers=2, hidden=128, intermediate=384, vocab=1024, tie=True)


def _worker(rank: int, port: int, results) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import chronicals_compile
    from chronicals_compile.testing import random_batch

    with _process_group(rank, port):
        batch = random_batch(batch=2, seq=12, vocab=1024, seed=100 + rank)  # each rank its own data
        options = {"chronicals.compiler": "aot_eager"}
        out = {}

        eager = DDP(_model(), bucket_cap_mb=1)
        out["eager_loss"] = _step(eager, batch)
        out["eager"] = _grads(eager.module)

        # torch.compile of the DDP module: DDPOptimizer splits the graph at bucket boundaries.
        wrapped = DDP(_model(), bucket_cap_mb=1)
        compiled = torch.compile(wrapped, backend="chronicals", options=options)
        out["outer_loss"] = _step(compiled, batch, out, "outer")
        out["outer"] = _grads(wrapped.module)

        # compile in place first, then wrap (what HF Trainer does with chronicals_compile.compile).
        torch._dynamo.reset()  # a fresh capture: the outer run's cached frames must not serve this one
        inner = chronicals_compile.compile(_model(), **options)
        out["inner_loss"] = _step(DDP(inner, bucket_cap_mb=1), batch, out, "inner")
        out["inner"] = _grads(inner)
        results[rank] = out


@pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups need a POSIX host")
def test_ddp_compiled_equals_eager_ddp():
    results = _spawn(_worker)
    for rank in range(WORLD):
        out = results[rank]
        for kind in ("outer", "inner"):
            torch.testing.assert_close(out[f"{kind}_loss"], out["eager_loss"], rtol=1e-5, atol=1e-6)
            assert out[kind].keys() == out["eager"].keys()
            for name, ref in out["eager"].items():
                torch.testing.assert_close(out[kind][name], ref, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name, k=kind: f"{k} {n}: {m}")
            # 2L+1 norms, however the buckets cut the graph; the loss fused where lm_head and the
            # loss land in one piece (they do here: the last bucket holds norm, lm_head and loss).
            swaps = out[f"{kind}_swaps"]
            assert swaps.get("rms_norm") == 5 and swaps.get("linear_cross_entropy") == 1, (kind, swaps)
        # dropped logits: an empty tensor from a DDP-split piece (AOTAutograd cannot return None
        # from one; outside DDP they are None), never a wrong N x V tensor.
        assert out["inner_logits"] == out["outer_logits"] == (0,), out
    # DDP all-reduces: every rank holds the same (averaged) gradients.
    for name, g in results[0]["eager"].items():
        torch.testing.assert_close(results[1]["inner"][name], g, rtol=1e-4, atol=1e-5)


def _fsdp_worker(rank: int, port: int, results) -> None:
    """FSDP2 (``fully_shard`` per decoder layer and at the root): its hooks break the graph at every
    layer, so our passes see one graph per layer (compiled once, reused) and the root's pieces."""
    from torch._dynamo.utils import counters
    from torch.distributed.fsdp import fully_shard

    import chronicals_compile
    from chronicals_compile.testing import random_batch

    with _process_group(rank, port):
        def sharded():
            model = _model()
            for layer in model.model.layers:
                fully_shard(layer)
            return fully_shard(model)

        batch = random_batch(batch=2, seq=12, vocab=1024, seed=100 + rank)
        eager = sharded()
        out = {"eager_loss": _step(eager, batch)}
        out["eager"] = {n: p.grad.full_tensor() for n, p in eager.named_parameters()}
        compiled = chronicals_compile.compile(sharded(), compiler="aot_eager")
        counters["chronicals"].clear()
        result = compiled(**batch)
        result.loss.backward()
        out["loss"], out["logits"] = result.loss.detach(), result.logits
        out["swaps"] = dict(counters["chronicals"])
        out["grads"] = {n: p.grad.full_tensor() for n, p in compiled.named_parameters()}
        results[rank] = out


@pytest.mark.skipif(sys.platform == "win32", reason="gloo process groups need a POSIX host")
def test_fsdp2_compiled_equals_eager_fsdp2():
    results = _spawn(_fsdp_worker)
    for rank in range(WORLD):
        out = results[rank]
        torch.testing.assert_close(out["loss"], out["eager_loss"], rtol=1e-5, atol=1e-6)
        assert out["grads"].keys() == out["eager"].keys()
        for name, ref in out["eager"].items():
            torch.testing.assert_close(out["grads"][name], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
        # one layer graph (2 norms, reused by both layers) + the final norm; the loss fused; the
        # causal mask is built at the root but used inside the layers' graphs, so it stays dense.
        swaps = out["swaps"]
        assert swaps.get("rms_norm") == 3 and swaps.get("linear_cross_entropy") == 1, swaps
        assert out["logits"] is None
