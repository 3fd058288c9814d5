"""Data parallel through the chronicals backend (issue #8): DDP and FSDP2 under torchrun against one GPU.

Why: the backend must keep working, and keep paying, when the model is wrapped for data parallel
training. DDP cuts the compiled graph at gradient buckets and FSDP2 at every sharded layer, so
our passes see pieces of the model; the losses must still equal a 1-GPU run and the throughput per
GPU must stay close to it.

Every engine trains the SAME global batches (one seeded CPU generator; rank r takes rows
r*B/K:(r+1)*B/K), so with equal token counts per rank the all-reduced mean of the rank losses is
the 1-GPU loss over the global batch, step by step, up to reduction order. Engines:

* ``single``: one process, the whole global batch, ``chronicals_compile.compile(model)``;
* ``ddp``: compile in place, then ``DistributedDataParallel`` (how HF Trainer does it);
* ``fsdp2``: ``fully_shard`` each decoder layer, then the root, then compile.

Each engine is one ``torchrun`` launch with its own time limit; a failure becomes a row. After every
engine the markdown and JSON under ``--out`` are rewritten (``complete`` is set at the end).

    python benchmarks/bench_distributed.py --preset qwen2.5-0.5b --global-batch 8 --seq 2048 --gpus 2
    python benchmarks/bench_distributed.py --device cpu --preset tiny --global-batch 4 --seq 32 --compiler aot_eager
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

from e2e import TINY_VOCAB  # noqa: E402  (vocabulary of the presets that take the tokenizer's)

#: ``single-shard``: one GPU with one rank's share of each global batch (the per-GPU work of the
#: distributed runs): the reference for weak scaling, where communication alone costs.
ENGINES = ("single", "single-shard", "ddp", "fsdp2")
#: Largest |loss - single's loss| / |single's loss| over all steps before the row is flagged.
LOSS_RTOL = {"bfloat16": 0.02, "float32": 1e-4}
WORKER_ARGS = ("device", "preset", "global_batch", "seq", "steps", "warmup", "compiler", "seed", "lr")
COLUMNS = ("engine", "GPUs", "rows per GPU", "status", "tokens/s", "tokens/s per GPU", "scaling efficiency",
           "vs 1 GPU, same rows", "step ms", "peak mem GiB", "first loss", "final loss", "max rel loss diff vs single", "grad norm",
           "first step s")


# =========================================================================== worker (one per rank)

def train(args: argparse.Namespace, rank: int, world: int, local_rank: int) -> dict:
    import torch
    import torch.distributed as dist

    import chronicals_compile
    from chronicals_compile.cli.presets import PRESETS, build_model

    on_gpu = args.device.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    shards = args.gpus if args.engine == "single-shard" else world
    if args.global_batch % shards:
        raise ValueError(f"--global-batch {args.global_batch} does not divide by {shards} shards")
    rows = args.global_batch // shards
    preset = PRESETS[args.preset]
    vocab = preset.vocab or TINY_VOCAB
    model = build_model(preset, vocab, dtype=dtype, device=device, seed=args.seed)
    model.config.use_cache = False
    model.train()
    options = {} if args.compiler == "inductor" else {"compiler": args.compiler}
    if args.engine == "fsdp2":  # shard first, then compile (tests/distributed/test_data_parallel.py)
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        step_model = chronicals_compile.compile(model, **options)
    else:
        chronicals_compile.compile(model, **options)
        step_model = model
        if args.engine == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            step_model = DistributedDataParallel(model, device_ids=[local_rank] if on_gpu else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=on_gpu or None)

    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randint(0, vocab, (args.global_batch, args.seq), generator=gen)[rank * rows:(rank + 1) * rows]
               for _ in range(args.warmup + args.steps)]

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    losses, norms, times = [], [], []
    for ids in batches:
        ids = ids.to(device)
        sync()
        t0 = time.perf_counter()
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.detach().float())
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    # after the timed loop: the global loss (mean of equal-sized rank means), the slowest rank's time
    loss_sum = torch.stack(losses).to(device)
    dist.all_reduce(loss_sum)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if on_gpu else 0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return {"status": "ok", "losses": (loss_sum / world).tolist(), "grad_norms": [float(n) for n in norms],
            "step_times_s": slowest.tolist(), "peak_memory_bytes": int(peak.item()) if on_gpu else None,
            "dtype": str(dtype).removeprefix("torch."), "device_name": torch.cuda.get_device_name(device)
            if on_gpu else "cpu"}


def worker_main(args: argparse.Namespace) -> int:
    """One rank: train, rank 0 writes the result; a failing rank writes its error beside it."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    try:
        result = train(args, rank, world, local_rank)
        path = args.result_file if rank == 0 else None
    except Exception as err:  # noqa: BLE001 - recorded in the table
        traceback.print_exc()
        oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
        last = traceback.format_exc().strip().splitlines()[-1]
        result = {"status": "OOM" if oom else f"error (rank {rank}): {last[:200]}"}
        path = f"{args.result_file}.rank{rank}"
    if path:
        with open(path, "w") as f:
            json.dump(result, f)
    if result["status"] == "ok":
        dist.destroy_process_group()
        return 0
    return 1  # without tearing down: torchrun stops the other ranks


# =========================================================================== driver

def run_engine(args: argparse.Namespace, engine: str, scratch: str) -> dict:
    """One torchrun launch; its result, or a status saying how it failed."""
    nproc = 1 if engine.startswith("single") else args.gpus
    shards = args.gpus if engine == "single-shard" else nproc
    result_file = os.path.join(scratch, f"{engine}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", f"--engine={engine}", f"--result-file={result_file}"]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in WORKER_ARGS]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    base = {"engine": engine, "gpus": nproc, "rows_per_gpu": args.global_batch / shards}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def stop_ranks(signum, frame):  # the driver killed from outside: take the ranks' GPU work along
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop_ranks)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**base, "status": f"timeout ({args.timeout:.0f} s)", "wall_s": time.perf_counter() - t0}
    finally:
        signal.signal(signal.SIGTERM, previous)
    base["wall_s"] = time.perf_counter() - t0
    found = []  # rank 0's result, else the ranks' errors: an OOM first (the others may be its echo)
    for path in filter(os.path.exists, [result_file] + [f"{result_file}.rank{r}" for r in range(nproc)]):
        with open(path) as f:
            found.append({**base, **json.load(f)})
    if found:
        result = min(found, key=lambda r: (r["status"] != "ok", r["status"] != "OOM"))
        if result["status"] != "ok":
            result["log_tail"] = log.strip().splitlines()[-20:]
        return result
    tail = (log.strip().splitlines() or ["(no output)"])[-1]
    status = "OOM" if "out of memory" in log.lower() else f"crashed (exit {proc.returncode}): {tail[:200]}"
    return {**base, "status": status, "log_tail": log.strip().splitlines()[-20:]}


def summarize(results: list[dict], args: argparse.Namespace) -> None:
    """Throughput, scaling and the loss check against ``single``, added to each finished row."""
    ok = [r for r in results if r["status"] == "ok" or "step_ms" in r]
    for r in ok:
        timed = sorted(r["step_times_s"][args.warmup:]) or [math.nan]
        r["step_ms"] = timed[len(timed) // 2] * 1e3
        r["tokens_per_s"] = r["rows_per_gpu"] * r["gpus"] * args.seq / (r["step_ms"] / 1e3)
        r["tokens_per_s_per_gpu"] = r["tokens_per_s"] / r["gpus"]
        if any(not math.isfinite(g) or g == 0.0 for g in r["grad_norms"]):
            r["status"] = "bad grad norm"
    single = next((r for r in ok if r["engine"] == "single"), None)
    shard = next((r for r in ok if r["engine"] == "single-shard"), None)
    for r in ok:
        if shard is not None:
            r["weak_scaling_efficiency"] = r["tokens_per_s_per_gpu"] / shard["tokens_per_s"]
        if single is None or r["engine"] == "single-shard":  # other data: no loss to compare
            continue
        r["scaling_efficiency"] = r["tokens_per_s_per_gpu"] / single["tokens_per_s"]
        r["max_rel_loss_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], single["losses"]))
        if r["max_rel_loss_diff"] > LOSS_RTOL[r["dtype"]] and r["status"] == "ok":
            r["status"] = f"loss differs (> {LOSS_RTOL[r['dtype']]:g} relative)"


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        row = {"engine": r["engine"], "GPUs": r["gpus"], "rows per GPU": f"{r['rows_per_gpu']:g}", "status": r["status"]}
        if "step_ms" in r:
            mem = r["peak_memory_bytes"]
            row.update({"tokens/s": r["tokens_per_s"], "tokens/s per GPU": r["tokens_per_s_per_gpu"],
                        "scaling efficiency": f"{r['scaling_efficiency']:.1%}" if "scaling_efficiency" in r else "n/a",
                        "vs 1 GPU, same rows": f"{r['weak_scaling_efficiency']:.1%}"
                        if "weak_scaling_efficiency" in r else "n/a",
                        "step ms": r["step_ms"], "peak mem GiB": f"{mem / 2**30:.2f}" if mem is not None else "n/a",
                        "first loss": f"{r['losses'][0]:.4f}", "final loss": f"{r['losses'][-1]:.4f}",
                        "max rel loss diff vs single": f"{r['max_rel_loss_diff']:.2e}" if "max_rel_loss_diff" in r
                        else "n/a", "grad norm": f"{r['grad_norms'][-1]:.4g}", "first step s": r["step_times_s"][0]})
        rows.append(row)
    return rows


def driver_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    import common

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if [e for e in engines if e not in ENGINES]:
        print(f"bench_distributed: error: unknown engine(s) in {engines}; known: {list(ENGINES)}", file=sys.stderr)
        return 2
    if args.global_batch % args.gpus:
        print(f"bench_distributed: error: --global-batch {args.global_batch} does not divide by --gpus {args.gpus}",
              file=sys.stderr)
        return 2
    if args.commit:
        os.environ["CHRONICALS_COMMIT"] = args.commit
    env = common.environment(args.device)
    command = "python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    formula = (f"tokens/s = rows per GPU x GPUs x seq (global batch {args.global_batch} x {args.seq}, single-shard: "
               "one rank's share) / median step time of the "
               f"{args.steps} timed steps (after {args.warmup} warm-up steps; step time = the slowest rank's); "
               "tokens/s per GPU = tokens/s / GPUs; scaling efficiency = tokens/s per GPU / single's tokens/s. "
               "This is strong scaling: single trains the whole global batch on one GPU, the others split it "
               "(rows per GPU), so each GPU does 1/GPUs of single's work per step. vs 1 GPU, same rows = tokens/s "
               "per GPU / single-shard's tokens/s (weak scaling: the same rows per GPU, so what is lost is "
               "communication and synchronisation). Loss = the mean over ranks of "
               "each rank's mean token loss (equal token counts, so the global-batch loss); max rel loss diff = "
               "max over all steps of |loss - single's| / |single's|, flagged above "
               f"{LOSS_RTOL['bfloat16']:g} (bf16) / {LOSS_RTOL['float32']:g} (fp32). Peak mem: "
               "max over ranks of torch.cuda.max_memory_allocated. first step s: compilation included.")
    notes = (f"Preset {args.preset} (random weights, seed {args.seed}), random tokens, AdamW lr {args.lr:g}, "
             f"grad clipping 1.0, compiler {args.compiler}; each engine is one torchrun launch "
             f"(limit {args.timeout:.0f} s).")
    stem = os.path.join(args.out, args.name or common.stamp("dist", args.device))
    results: list[dict] = []
    print("bench_distributed: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)

    def write(complete: bool) -> str:
        summarize(results, args)
        table = common.markdown_table(table_rows(results), COLUMNS)
        common.write_markdown(stem + ".md", "Data parallel: DDP and FSDP2 vs one GPU", env,
                              [("", f"Command: `{command.strip()}`"), ("", table), ("", formula), ("", notes)])
        common.write_json(stem + ".json", {"environment": env, "command": command, "formula": formula,
                                           "results": results, "complete": complete})
        return table

    with tempfile.TemporaryDirectory(prefix="bench_distributed-") as scratch:
        for engine in engines:
            results.append(run_engine(args, engine, scratch))
            write(complete=False)  # a time limit later on keeps the rows measured so far
            r = results[-1]
            print(f"bench_distributed: {engine}: {r['status']}" + (
                f", {r['tokens_per_s']:,.0f} tok/s, loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
                if "tokens_per_s" in r else "") + f" ({r.get('wall_s', 0):.0f} s wall)", flush=True)
            for line in r.get("log_tail", [])[-6:]:
                print(f"      {line}", flush=True)
    table = write(complete=True)
    print(f"\n{table}\n\n{formula}\nbench_distributed: wrote {stem}.md, {stem}.json")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from chronicals_compile.cli.presets import PRESETS

    p.add_argument("--preset", default="qwen2.5-0.5b", choices=list(PRESETS))
    p.add_argument("--global-batch", type=int, default=8, help="rows per step over all GPUs")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included")
    p.add_argument("--gpus", type=int, default=2, help="processes for ddp and fsdp2")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--timeout", type=float, default=240, help="seconds per engine before it is killed")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (gloo)")
    p.add_argument("--compiler", default="inductor", help="the backend's compiler (aot_eager: CPU tests)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default: dist-<date>-<gpu>)")
    p.add_argument("--commit", default=None, help="commit to record (a device copy has no .git)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return worker_main(args) if args.worker else driver_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
