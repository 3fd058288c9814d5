"""lm_head + cross-entropy, forward + backward: time and extra peak memory.

Variants, each computing ``mean CE(h @ W.T, target)`` and the gradients of h and W:

* ``eager``: ``F.cross_entropy(F.linear(h, W).float(), t)``, the transformers path, materialised.
* ``torch.compile``: the same function through Inductor.
* ``chronicals (recompute)``: ``chronicals::linear_cross_entropy``; backward recomputes logit tiles.
* ``chronicals (lean)``: the same op with ``layout="lean"`` (``cce_mode="lean"``): vocabulary slices
  no wider than the hidden size, the least memory exact gradients allow.
* ``chronicals (fused)``: ``chronicals::linear_cross_entropy_fused``; gradients during the forward
  (what the pass uses for training graphs), logits from our tl.dot tile kernel.
* ``chronicals (fused, matmul logits)``: the same op with ``CHRONICALS_CCE_LOGITS=matmul``: each
  row chunk's logits from one cuBLAS GEMM, then a Triton row kernel (statistics, G in place).
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (if it imports).
* ``cce`` / ``cce exact``: Apple's ``cut_cross_entropy.linear_cross_entropy``, default
  (gradient filtering, approximate) and ``filter_eps=None`` (exact), if it imports.
* ``bare matmuls``: ``h @ W.T``, ``G @ W`` and ``G.T @ h`` alone with a preallocated G: the floor
  any exact method pays (6 N V d FLOPs); ``x bare`` = time / this.

``extra MiB`` is the peak allocation during one step above what was allocated before it, minus the
unavoidable dh and dW outputs; ``with outputs GiB`` adds them back (issue 4 counts its 0.35 GiB
target that way: Liger's 0.32 GiB there is its 37 MiB here plus 0.28 GiB of outputs). bf16, 10% of
labels ignored, ``triton.testing.do_bench`` medians.
A variant that runs out of memory prints ``OOM`` and the others go on.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

#: (tokens, hidden, vocab): Qwen2.5-0.5B at 8 x 2048, Gemma-2-2B at 4 x 2048, Llama-3-8B at 8 x 4096.
SHAPES = [(16384, 896, 151936), (8192, 2304, 256000), (32768, 4096, 128256)]
IGNORED = 0.1


def _eager(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)


def _variants() -> dict:
    import chronicals_compile.ops  # noqa: F401
    from chronicals_compile.kernels import linear_cross_entropy as k

    ops = torch.ops.chronicals

    def fused(h, w, t):
        return ops.linear_cross_entropy_fused(h, w, t, -100, "mean", 0.0, 0.0, 1.0, h.requires_grad, w.requires_grad)[0]

    def fused_matmul(h, w, t):
        old, k.FUSED_LOGITS = k.FUSED_LOGITS, "matmul"
        try:
            return fused(h, w, t)
        finally:
            k.FUSED_LOGITS = old

    def recompute(h, w, t):
        return ops.linear_cross_entropy(h, w, t, -100, "mean", 0.0, 0.0, 1.0)[0]

    def lean(h, w, t):
        return ops.linear_cross_entropy(h, w, t, -100, "mean", 0.0, 0.0, 1.0, 0, "lean")[0]

    def recompute_vocab(h, w, t):  # the backward runs at loss.backward(): the switch stays set
        k.BACKWARD_LAYOUT = "vocab"
        return recompute(h, w, t)

    def recompute_rows(h, w, t):
        k.BACKWARD_LAYOUT = "rows"
        return recompute(h, w, t)

    variants = {
        "eager": _eager,
        "torch.compile": torch.compile(_eager, dynamic=False),
        "chronicals (recompute)": recompute_rows,
        "chronicals (recompute, vocab slices)": recompute_vocab,
        "chronicals (lean)": lean,
        "chronicals (fused)": fused,
        "chronicals (fused, matmul logits)": fused_matmul,
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        variants["liger"] = lambda h, w, t: liger(w, h, t)
    except Exception:  # noqa: BLE001 - a missing peer is a missing row
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as L

            variants["liger"] = lambda h, w, t: L.apply(h, w, t)
        except Exception:  # noqa: BLE001
            pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        variants["cce"] = lambda h, w, t: cce(h, w, t)
        variants["cce exact"] = lambda h, w, t: cce(h, w, t, filter_eps=None)
    except Exception:  # noqa: BLE001
        pass
    return variants


def _inputs(n, d, v, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, device=device, generator=g) * d ** -0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    t[torch.rand(n, device=device, generator=g) < IGNORED] = -100
    return h, w, t


def _bench(fn, rep_ms):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _measure(name, fn, n, d, v, device, dtype, rep_ms):
    h, w, t = _inputs(n, d, v, device, dtype)
    grads_bytes = (h.numel() + w.numel()) * h.element_size()

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss

    try:
        loss = step()  # compile / autotune outside the timing and the memory measurement
        torch.cuda.synchronize()
        h.grad = w.grad = None
        _free()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - grads_bytes
        gnorm = float(w.grad.float().norm())
        ms = _bench(step, rep_ms)
        return {"ms": round(ms, 2), "extra MiB": round(extra / 2**20),
                "with outputs GiB": round((extra + grads_bytes) / 2**30, 3), "loss": round(float(loss.detach()), 5),
                "|dW|": round(gnorm, 4)}
    except torch.cuda.OutOfMemoryError:
        return {"ms": "OOM"}
    except Exception as err:  # noqa: BLE001 - one broken variant must not hide the others
        return {"ms": "error", "error": repr(err)[:120]}
    finally:
        del h, w, t
        _free()


def _bare(n, d, v, device, dtype, rep_ms):
    try:
        h = torch.randn(n, d, device=device, dtype=dtype)
        w = torch.randn(v, d, device=device, dtype=dtype)
        g = torch.randn(n, v, device=device, dtype=dtype)
        z = torch.empty(n, v, device=device, dtype=dtype)

        def step():
            torch.mm(h, w.t(), out=z)
            torch.mm(g, w)
            torch.mm(g.t(), h)

        ms = _bench(step, rep_ms)
        return {"ms": round(ms, 2), "extra MiB": "-"}
    except torch.cuda.OutOfMemoryError:
        return {"ms": "OOM"}
    finally:
        _free()


#: Most informative first, so a time budget cuts the least.
ORDER = ("chronicals (fused)", "torch.compile", "chronicals (lean)", "eager", "chronicals (fused, matmul logits)",
         "chronicals (recompute)", "chronicals (recompute, vocab slices)", "liger", "cce", "cce exact")


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, shapes=None, variants=None,
        rep_ms: int = 400, budget_s: float | None = 40.0) -> list[dict]:
    """Rows for every shape and variant; once ``budget_s`` has passed the rest are marked
    skipped (the micro-suite runner gives each op a short slot: ``budget_s=None`` for all)."""
    import time

    start = time.monotonic()
    rows = []
    names = variants
    for n, d, v in shapes or SHAPES:
        label = {"shape (N, d, V)": f"{n}, {d}, {v}"}
        flops = 6 * n * d * v
        bare = _bare(n, d, v, device, dtype, rep_ms)
        bare_ms = bare["ms"] if isinstance(bare["ms"], float) else None
        rows.append({**label, "variant": "bare matmuls", **bare,
                     "TFLOP/s": round(flops / bare_ms / 1e9) if bare_ms else "-"})
        found = _variants()
        for name in sorted(found, key=lambda x: ORDER.index(x) if x in ORDER else len(ORDER)):
            fn = found[name]
            if names and name not in names:
                continue
            if budget_s is not None and time.monotonic() - start > budget_s:
                rows.append({**label, "variant": name, "ms": "skipped (time budget)"})
                continue
            result = _measure(name, fn, n, d, v, device, dtype, rep_ms)
            ms = result.get("ms")
            if isinstance(ms, float):
                result["TFLOP/s"] = round(flops / ms / 1e9)
                if bare_ms:
                    result["x bare"] = round(ms / bare_ms, 2)
            rows.append({**label, "variant": name, **result})
            print(rows[-1], flush=True)
        torch._dynamo.reset()
    return rows


def sweep(device: str = "cuda", shape=(16384, 896, 151936), dtype=torch.bfloat16, configs=None) -> list[dict]:
    """Tile configurations of the launchers (no autograd): forward, recompute backward, fused."""
    import dataclasses

    from chronicals_compile.kernels import linear_cross_entropy as k

    n, d, v = shape
    h, w, t = _inputs(n, d, v, device, dtype)
    h, w = h.detach(), w.detach()
    one = torch.ones((), device=device)
    base = k.default_tiles(dtype, torch.device(device))
    configs = configs or [
        {},
        {"block_v": 256},
        {"block_n": 64, "block_v": 256, "num_stages": 4},
        {"block_n": 128, "block_v": 128, "num_stages": 4},
        {"block_n": 64, "block_v": 128, "num_warps": 4, "num_stages": 4},
        {"group_n": 16},
        {"chunk_rows": 8192},
        {"row_block": 8192, "row_warps": 16},
        {"row_block": 2048, "row_warps": 4},
    ]
    rows = []
    for cfg in configs:
        tiles = dataclasses.replace(base, **cfg)
        row = {"shape": f"{n}, {d}, {v}", "tiles": str(cfg or "default")}
        try:
            _, lse = k.forward(h, w, t, tiles=tiles)
            row["fwd ms"] = round(_bench(lambda: k.forward(h, w, t, tiles=tiles), 300), 2)
            row["bwd ms"] = round(_bench(lambda: k.backward(one, h, w, t, lse, tiles=tiles), 300), 2)
            row["fused ms"] = round(_bench(lambda: k.fused(h, w, t, tiles=tiles), 300), 2)
            row["fused matmul ms"] = round(_bench(lambda: k.fused(h, w, t, tiles=tiles, logits="matmul"), 300), 2)
            row["recompute total"] = round(row["fwd ms"] + row["bwd ms"], 2)
        except Exception as err:  # noqa: BLE001
            row["error"] = repr(err)[:120]
        rows.append(row)
        print(row, flush=True)
        _free()
    return rows


#: Row-kernel launch shapes (vocab block, warps) to time, the current default first.
ROW_CONFIGS = ((4096, 8), (8192, 8), (8192, 16), (16384, 16), (16384, 32), (32768, 32))


def sweep_rows(device: str = "cuda", shapes=None, dtype=torch.bfloat16, row_configs=ROW_CONFIGS,
               chunk_rows=(None, 2048, 4096, 8192)) -> list[dict]:
    """The fused mode's row kernel alone (statistics, then G in place over a [C, V] logits chunk:
    two reads and one write, ``GB/s`` counts those bytes), then the whole fused op by chunk rows
    for each launch shape. Picks the defaults of ``Tiles.row_block``/``row_warps``/``chunk_rows``."""
    import dataclasses

    from chronicals_compile.kernels import linear_cross_entropy as k

    rows = []
    for n, d, v in shapes or SHAPES[:2]:
        c = 4096
        z = torch.randn(c, v, device=device, dtype=dtype)
        tgt = torch.randint(0, v, (c,), device=device)
        row_w = torch.full((c,), 1.0 / c, device=device)
        for block, warps in row_configs:
            launch_tiles = dataclasses.replace(k.default_tiles(dtype, torch.device(device)), row_block=block,
                                               row_warps=warps)

            def launch():
                k.launch_rows(z, tgt, row_w, launch_tiles)
            try:
                ms = _bench(launch, 200)
                rows.append({"shape": f"{n}, {d}, {v}", "what": f"row kernel [{c}, V]", "row_block": block,
                             "row_warps": warps, "ms": round(ms, 3),
                             "GB/s": round(3 * z.numel() * z.element_size() / ms / 1e6)})
            except Exception as err:  # noqa: BLE001
                rows.append({"shape": f"{n}, {d}, {v}", "row_block": block, "row_warps": warps, "error": repr(err)[:100]})
            print(rows[-1], flush=True)
        del z
        _free()
        h, w, t = _inputs(n, d, v, device, dtype)
        h, w = h.detach(), w.detach()
        base = k.default_tiles(dtype, torch.device(device))
        for block, warps in row_configs[:4]:
            for chunk in chunk_rows:
                tiles = dataclasses.replace(base, row_block=block, row_warps=warps, chunk_rows=chunk)
                row = {"shape": f"{n}, {d}, {v}", "what": "fused (matmul logits)", "row_block": block,
                       "row_warps": warps, "chunk_rows": chunk or k._chunk_rows(n, v, d, 2, base)}
                try:
                    _free()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    k.fused(h, w, t, tiles=tiles, logits="matmul")
                    torch.cuda.synchronize()
                    row["extra MiB"] = round((torch.cuda.max_memory_allocated() - before
                                              - (h.numel() + w.numel()) * h.element_size()) / 2**20)
                    row["ms"] = round(_bench(lambda: k.fused(h, w, t, tiles=tiles, logits="matmul"), 300), 2)
                except Exception as err:  # noqa: BLE001
                    row["error"] = repr(err)[:100]
                rows.append(row)
                print(row, flush=True)
        del h, w, t
        _free()
    return rows


def frozen_weight(device: str = "cuda", shapes=None, dtype=torch.bfloat16) -> list[dict]:
    """The gradient of h alone (a frozen lm_head: LoRA's case) by method: time and peak beyond dh.
    Picks how ``layout="lean"`` walks when dW is not needed (row chunks with no accumulator, against
    the vocab walk with dh's fp32 accumulator it took before)."""
    import dataclasses

    from chronicals_compile.kernels import linear_cross_entropy as k

    rows = []
    for n, d, v in shapes or SHAPES[:2]:
        h, w, t = _inputs(n, d, v, device, dtype)
        h, w = h.detach(), w.detach()
        one = torch.ones((), device=device)
        base = k.default_tiles(dtype, torch.device(device))
        _, lse = k.forward(h, w, t)
        methods = {
            "fused (default training path)": lambda: k.fused(h, w, t, need_dw=False, logits="matmul"),
            "recompute, rows": lambda: k.backward(one, h, w, t, lse, need_dw=False, layout="rows"),
            "recompute, vocab": lambda: k.backward(one, h, w, t, lse, need_dw=False, layout="vocab"),
            "recompute, vocab slices of d (lean before)": lambda: k.backward(
                one, h, w, t, lse, need_dw=False, layout="vocab",
                tiles=dataclasses.replace(base, vocab_cols=d // base.block_v * base.block_v)),
            "recompute, lean": lambda: k.backward(one, h, w, t, lse, need_dw=False, layout="lean"),
        }
        for name, fn in methods.items():
            row = {"shape": f"{n}, {d}, {v}", "method": name}
            try:
                _free()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row["beyond dh MiB"] = round((torch.cuda.max_memory_allocated() - before - h.numel() * h.element_size())
                                             / 2**20, 1)
                row["ms"] = round(_bench(fn, 300), 2)
            except Exception as err:  # noqa: BLE001
                row["error"] = repr(err)[:120]
            rows.append(row)
            print(row, flush=True)
        del h, w, t, lse
        _free()
    return rows


def main() -> None:
    import argparse
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]
    from table import markdown

    p = argparse.ArgumentParser()
    p.add_argument("--sweep", action="store_true", help="tile configurations of our launchers instead")
    p.add_argument("--row-sweep", action="store_true",
                   help="the fused mode's row kernel by launch shape, then the fused op by chunk rows")
    p.add_argument("--frozen-weight", action="store_true", help="the gradient of h alone (frozen lm_head), by method")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--shapes", nargs="*", default=None, help="N,d,V ...")
    p.add_argument("--budget", type=float, default=None, help="seconds after which variants are skipped")
    p.add_argument("--chunk-rows", nargs="*", type=int, default=None,
                   help="with --sweep: only these gradient chunk sizes (memory against speed)")
    args = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else None
    if args.frozen_weight:
        print(markdown(frozen_weight(shapes=shapes)))
    elif args.row_sweep:
        print(markdown(sweep_rows(shapes=shapes)))
    elif args.sweep:
        configs = [{"chunk_rows": c} for c in args.chunk_rows] if args.chunk_rows else None
        print(markdown(sweep(shape=shapes[0] if shapes else (16384, 896, 151936), configs=configs)))
    else:
        print(markdown(run(shapes=shapes, variants=args.variants, rep_ms=800, budget_s=args.budget)))


if __name__ == "__main__":
    main()
