"""Paired, interleaved training-step timing: several variants of one step in one process, one step
of each in turn, so a lever of a few tenths of a percent can be told from noise.

Why: ``e2e.py`` times each variant in its own process, one after another. Its rows drift by about
0.6% between runs of the same configuration on the H200 (session 24: 142,507 and 143,302 tok/s),
while the levers left for issue 7 are predicted at +0.1 to +0.5% each. Here every round runs one
step of every variant back to back (the order rotating each round), so clock, power-cap and
temperature drift hit all variants alike; each round gives a ratio per variant (the baseline's
step time over the variant's), and the table reports the median ratio over the rounds with a
distribution-free 95% confidence interval (order statistics of the binomial, no normality
assumed). An interval that excludes 1.000 is a measured difference; one that straddles it is not.

Variants are built by ``e2e.build_variant`` and stepped by ``e2e.training_step``: the same model,
batches, optimizer and step as ``e2e.py``. Every variant gets the same batches in the same order,
so step i's losses must agree across variants (checked against the first variant with e2e's
tolerances) and every gradient norm must be finite and non-zero.

Limits, each refused with a message rather than measured wrongly: variants that set environment
variables read once per process (``e2e.VARIANT_ENV``) and Liger-Kernel (it patches transformers'
classes for the whole process) need ``e2e.py``. All models stay resident together: on an H200
Inductor's step (33 GiB) and four of ours (~16 GiB each) fit; a variant that runs out of memory
beside the others is reported as such and dropped. Peak memory is estimated per variant as its
resident memory (weights, optimizer state) plus its steps' peak above what was allocated before
them; ``e2e.py`` gives the exact figure of a variant alone.

    python benchmarks/e2e_paired.py --variants inductor,chronicals,chronicals-pdl --rounds 30
    python benchmarks/e2e_paired.py --device cpu --tiny --variants eager,chronicals --rounds 3
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (HERE, REPO):
    if path not in sys.path:
        sys.path.insert(0, path)

import e2e  # noqa: E402
from common import median  # noqa: E402

CONFIDENCE = 0.95


def refused(variant: str) -> str | None:
    """Why ``variant`` cannot share a process with others, or None."""
    if variant not in e2e.VARIANTS:
        return f"unknown variant {variant!r}; known: {', '.join(e2e.VARIANTS)}"
    if variant in e2e.VARIANT_ENV:
        names = ", ".join(sorted(e2e.VARIANT_ENV[variant]))
        return (f"{variant} sets environment variables read once per process ({names}); "
                "time it with benchmarks/e2e.py")
    if variant.startswith("liger"):
        return f"{variant} patches transformers' classes for the whole process; time it with benchmarks/e2e.py"
    return None


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Distribution-free interval for the median: ``[x_(j), x_(n+1-j)]`` (1-based order statistics)
    with the largest ``j`` such that ``P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2``. None when
    too few values exist for any interval at that confidence (n < 6 at 95%)."""
    ordered = sorted(values)
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    j, below = 0, 0.0
    while j < n // 2:
        below_next = below + math.comb(n, j) / 2.0 ** n  # P(B <= j) = P(B < j + 1)
        if below_next > tail:
            break
        below, j = below_next, j + 1
    if j == 0:
        return None
    return ordered[j - 1], ordered[n - j]


def rotation(variants: Sequence[str], round_index: int) -> list[str]:
    """The order of one round: the list rotated by the round's index, so each variant runs at each
    position equally often (a step that follows a heavier one is not always the same variant)."""
    k = round_index % len(variants)
    return list(variants[k:]) + list(variants[:k])


def paired_ratios(times: dict[str, list[float]], baseline: str, variant: str) -> list[float]:
    """Per round: the baseline's step time over the variant's (> 1: the variant is faster)."""
    return [b / v for b, v in zip(times[baseline], times[variant]) if v > 0 and b > 0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True, help="comma list of e2e.py variants, the first is the baseline")
    p.add_argument("--baselines", default=None,
                   help="comma list of variants every other is compared with (default: the first, and "
                        "chronicals when it is listed)")
    p.add_argument("--shape", default=None, help=f"one of {', '.join(e2e.SHAPES)} (default qwen0.5b-8x2048; tiny-2x64 with --tiny)")
    p.add_argument("--mode", default="full", choices=e2e.MODES)
    p.add_argument("--rounds", type=int, default=30, help="timed rounds, one step of every variant each (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first, compile included (default 3)")
    p.add_argument("--precompile", type=int, default=0, metavar="N",
                   help="first compile every variant in e2e.py's untimed workers, N processes at a time, so the "
                        "builds here load their graphs from the compile caches (0: off)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: rounds stop when the next would not fit (results so far are kept)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"))
    p.add_argument("--tiny", action="store_true", help="the tiny shape (2 x 64 tokens, 2 layers): a smoke run")
    p.add_argument("--lora-adapter-dtype", default="fp32", choices=("fp32", "model"))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"))
    p.add_argument("--name", default=None, help="file name stem (default: e2e_paired-<date>-<gpu>)")
    p.add_argument("--commit", default=None, help="commit to record when the tree has no .git")
    p.add_argument("--chronicals-compiler", default="inductor", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    problems = [why for why in map(refused, variants) if why]
    if len(set(variants)) != len(variants):
        problems.append(f"a variant is listed twice: {variants}")
    if len(variants) < 2:
        problems.append("give at least two variants: the first is the baseline")
    baselines = ([b.strip() for b in args.baselines.split(",") if b.strip()] if args.baselines else
                 [variants[0]] + (["chronicals"] if "chronicals" in variants[1:] else []))
    problems += [f"baseline {b!r} is not among the variants" for b in baselines if b not in variants]
    shape = args.shape or ("tiny-2x64" if args.tiny else "qwen0.5b-8x2048")
    if shape not in e2e.SHAPES:
        problems.append(f"unknown shape {shape!r}; known: {', '.join(e2e.SHAPES)}")
    if args.rounds < 1 or args.warmup < 1:
        problems.append("--rounds and --warmup must be at least 1 (the first warm-up step compiles)")
    if problems:
        for why in problems:
            print(f"e2e_paired: error: {why}", file=sys.stderr)
        return 2
    if args.commit:
        os.environ["CHRONICALS_COMMIT"] = args.commit

    import torch

    import common
    from chronicals_compile.cli import metrics
    from gpu_clocks import ClockSampler

    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    on_gpu = device.startswith("cuda")
    # Every variant is one more compiled entry on the same code objects (one model class).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(variants))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    env = common.environment(device)
    print("e2e_paired: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    preset, batch, seq = e2e.SHAPES[shape]

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def allocated() -> int | None:
        return torch.cuda.memory_allocated() if on_gpu else None

    specs = {variant: {"shape": shape, "mode": args.mode, "variant": variant, "preset": preset, "batch": batch,
                       "seq": seq, "device": device, "dtype": dtype, "seed": args.seed, "lr": args.lr,
                       "chronicals_compiler": args.chronicals_compiler, "lean_budget": 0.5,
                       "lora_adapter_dtype": args.lora_adapter_dtype, "warmup": args.warmup, "steps": args.rounds}
             for variant in variants}
    if args.precompile > 0:
        spent = e2e.precompile(list(specs.values()), args.precompile, timeout=args.budget / 2 if args.budget else 600)
        print(f"e2e_paired: precompiled in {spent:.0f} s, {args.precompile} at a time", flush=True)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = None  # drawn once the first build gives the vocabulary
    runs: dict[str, dict] = {}
    built: dict[str, tuple] = {}
    for variant in variants:
        spec = specs[variant]
        run = runs[variant] = {"variant": variant, "status": "ok", "losses": [], "grad_norms": [], "step_s": [],
                               "step_peak_bytes": 0}
        before = allocated()
        t0 = time.perf_counter()
        try:
            model, trainable, optimizer, loss_step, vocab = e2e.build_variant(spec)
            if batches is None:
                batches = [torch.randint(0, vocab, (batch, seq), generator=gen)
                           for _ in range(args.warmup + args.rounds)]
            for i in range(args.warmup):
                loss, norm = e2e.training_step(model, trainable, optimizer, loss_step,
                                               batches[i].to(device), variant)
                run["losses"].append(float(loss))
                run["grad_norms"].append(float(norm))
            sync()
        except e2e.Unavailable as why:
            run["status"] = str(why)
        except Exception as err:  # noqa: BLE001 - a row, not a crash; the others still run
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
            run["status"] = (f"OOM beside {len(built)} resident variant(s)" if oom else
                             f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")
        if run["status"] != "ok":
            print(f"e2e_paired: {variant}: {run['status']}", flush=True)
            model = trainable = optimizer = loss_step = None
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
            continue
        run["warmup_s"] = time.perf_counter() - t0
        run["resident_bytes"] = None if before is None else allocated() - before
        run["flops_per_token"] = metrics.model_flops_per_token(model, context=seq)
        run["parameters"] = sum(p.numel() for p in model.parameters())
        built[variant] = (model, trainable, optimizer, loss_step)
        print(f"e2e_paired: {variant}: built and warmed up in {run['warmup_s']:.0f} s"
              + ("" if run["resident_bytes"] is None else f", resident {run['resident_bytes'] / 2**30:.2f} GiB"),
              flush=True)

    def report(final: bool) -> None:
        """Write the table and JSON; also mid-run, so a run cut by a time limit keeps its rounds.
        Only rounds every surviving variant completed are paired."""
        timed = {v: runs[v]["step_s"] for v in variants if runs[v]["status"] == "ok"}
        n_paired = min((len(t) for t in timed.values()), default=0)
        timed = {v: t[:n_paired] for v, t in timed.items()}
        results = summarize(runs, variants, baselines, timed, batch, seq, dtype, device, args.warmup)
        write(args, argv, env, device, shape, dtype, results, baselines, n_paired, clocks.summary() if final else {},
              time.perf_counter() - started, final)

    clocks = ClockSampler(torch.cuda.current_device() if on_gpu else 0)
    report(final=False)  # the builds' rows, before any round
    if on_gpu:
        clocks.start()
    rounds_done = 0
    slowest_round = 0.0
    for r in range(args.rounds):
        live = [v for v in rotation(variants, r) if v in built]
        if not live:
            break
        if args.budget is not None and rounds_done and time.perf_counter() - started + 1.5 * slowest_round > args.budget:
            print(f"e2e_paired: stopping after {rounds_done} round(s): --budget {args.budget:.0f} s", flush=True)
            break
        round_start = time.perf_counter()
        ids = batches[args.warmup + r].to(device)
        for variant in live:
            run = runs[variant]
            model, trainable, optimizer, loss_step = built[variant]
            sync()
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            base = allocated()
            t0 = time.perf_counter()
            try:
                loss, norm = e2e.training_step(model, trainable, optimizer, loss_step, ids, variant)
                sync()
            except Exception as err:  # noqa: BLE001
                run["status"] = f"error in round {r + 1}: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"e2e_paired: {variant}: {run['status']}", flush=True)
                del built[variant]
                continue
            run["step_s"].append(time.perf_counter() - t0)
            if on_gpu:
                run["step_peak_bytes"] = max(run["step_peak_bytes"], torch.cuda.max_memory_allocated() - base)
            run["losses"].append(float(loss))
            run["grad_norms"].append(float(norm))
        slowest_round = max(slowest_round, time.perf_counter() - round_start)
        rounds_done += 1
        if rounds_done % 5 == 0:
            report(final=False)
    clocks.stop()

    report(final=True)
    return 0


def summarize(runs: dict, variants: list[str], baselines: list[str], timed: dict[str, list[float]],
              batch: int, seq: int, dtype: str, device: str, warmup: int) -> list[dict]:
    from chronicals_compile.cli import metrics

    reference = runs[variants[0]]
    tokens = batch * seq
    peak = None
    if device.startswith("cuda"):
        import torch

        peak = metrics.peak_bf16_flops(torch.cuda.get_device_name())
    results = []
    for variant in variants:
        run = dict(runs[variant])
        if run["status"] == "ok" and variant in timed and timed[variant]:
            step = median(timed[variant])
            run["step_ms"] = step * 1e3
            run["tokens_per_s"] = tokens / step
            run["mfu"] = metrics.mfu(run["flops_per_token"], batch * (seq - 1) / step, peak)
            run["versus"] = {}
            for b in baselines:
                if b == variant or b not in timed or not timed[b]:
                    continue
                ratios = paired_ratios(timed, b, variant)
                run["versus"][b] = {"median": median(ratios), "interval": median_interval(ratios), "rounds": len(ratios)}
            if run.get("resident_bytes") is not None:
                run["peak_estimate_bytes"] = run["resident_bytes"] + run["step_peak_bytes"]
        norms = run.get("grad_norms", [])
        run["bad_grad_norm_steps"] = [i + 1 for i, g in enumerate(norms) if not math.isfinite(g) or g == 0.0]
        run["loss_check"] = loss_check(run, reference, dtype) if run["status"] == "ok" else ""
        results.append(run)
    return results


def loss_check(run: dict, reference: dict, dtype: str) -> str:
    """Against the first variant, step by step on the same batches: the first step's loss within
    e2e's first-step tolerance, the last common step's within its final-step tolerance."""
    if run["variant"] == reference["variant"]:
        return "reference"
    if reference["status"] != "ok" or not reference["losses"]:
        return "no reference run"
    n = min(len(run["losses"]), len(reference["losses"]))
    first = abs(run["losses"][0] - reference["losses"][0]) / max(1e-12, abs(reference["losses"][0]))
    last = abs(run["losses"][n - 1] - reference["losses"][n - 1]) / max(1e-12, abs(reference["losses"][n - 1]))
    run["first_loss_rel_diff"], run["final_loss_rel_diff"] = first, last
    ok = first <= e2e.FIRST_LOSS_RTOL[dtype] and last <= e2e.FINAL_LOSS_RTOL[dtype]
    return ("ok" if ok else "DIFFERS") + f" ({first:.2%} / {last:.2%} at step {n})"


def _ratio_cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    iv = entry["interval"]
    span = f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else " (too few rounds for an interval)"
    return f"{entry['median']:.4f}x{span}"


def table_rows(results: list[dict], baselines: list[str]) -> list[dict]:
    rows = []
    for r in results:
        ok = r["status"] == "ok" and "step_ms" in r
        row = {"variant": r["variant"], "status": r["status"]}
        if ok:
            peak = r.get("peak_estimate_bytes")
            bad = r["bad_grad_norm_steps"]
            row.update({
                "tokens/s": f"{r['tokens_per_s']:,.0f}", "step ms (median)": f"{r['step_ms']:.2f}",
                "MFU": f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a",
                **{f"vs {b} (95% CI)": _ratio_cell(r["versus"].get(b)) for b in baselines},
                "peak GiB (est.)": f"{peak / 2**30:.2f}" if peak is not None else "n/a",
                "first loss": f"{r['losses'][0]:.4f}", "final loss": f"{r['losses'][-1]:.4f}",
                "vs first variant": r["loss_check"],
                "grad norm": f"{r['grad_norms'][-1]:.3g}" + (f" BAD at steps {bad}" if bad else ""),
                "warm-up s": f"{r['warmup_s']:.0f}",
            })
        rows.append(row)
    return rows


def write(args, argv, env: dict, device: str, shape: str, dtype: str, results: list[dict], baselines: list[str],
          n_paired: int, clock: dict, wall_s: float, final: bool = True) -> None:
    import common

    stem = args.name or common.stamp("e2e_paired", device)
    columns = ["variant", "status", "tokens/s", "step ms (median)", "MFU",
               *[f"vs {b} (95% CI)" for b in baselines], "peak GiB (est.)", "first loss", "final loss",
               "vs first variant", "grad norm", "warm-up s"]
    table = common.markdown_table(table_rows(results, baselines), columns)
    command = "python benchmarks/e2e_paired.py " + " ".join(sys.argv[1:] if argv is None else argv)
    clock_line = ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in clock.items()) or "not sampled"
    notes = (f"{shape}, {args.mode}, {dtype}; {n_paired} paired round(s) after {args.warmup} warm-up step(s) per "
             f"variant, one step of every variant per round, the order rotated each round; {wall_s:.0f} s in all. "
             "vs X = median over rounds of X's step time / this variant's (> 1: faster than X), with a "
             "distribution-free 95% interval for that median. Peak GiB (est.) = the variant's resident memory "
             "(weights, optimizer state, allocated after its warm-up) + its largest step peak above the memory "
             "allocated before the step; benchmarks/e2e.py measures a variant alone. Losses: same batches for "
             f"every variant, compared with the first variant's (e2e.py's tolerances). GPU while timed: {clock_line}.")
    md = common.write_markdown(os.path.join(args.out, stem + ".md"), "Paired end-to-end training step", env,
                               [("", f"Command: `{command.strip()}`"), ("", table), ("", notes)])
    js = common.write_json(os.path.join(args.out, stem + ".json"),
                           {"environment": env, "command": command, "shape": shape, "mode": args.mode,
                            "dtype": dtype, "rounds": n_paired, "warmup": args.warmup, "baselines": baselines,
                            "clock": clock, "results": results, "complete": final})
    if not final:
        return
    print()
    print(table)
    print()
    print(notes)
    print(f"e2e_paired: wrote {md}, {js}")


if __name__ == "__main__":
    sys.exit(main())
