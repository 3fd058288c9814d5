"""Packing benchmark: BFD efficiency and speed on the CPU; packed-vs-padded training throughput on CUDA.

    python benchmarks/bench_packing.py                   # CPU: efficiency + 1M-sequence pack time
    python benchmarks/bench_packing.py --gpu-throughput  # CUDA: real tokens/s, packed vs padded

Throughput is counted in *real* tokens (document tokens, never padding): a
padded run that looks fast per step but spends half its compute on padding is
reported as such. Both sides train the same model shape on documents drawn
from the same length distribution, with the same expected real tokens per
step; the padded side is HF's usual setup (fixed batch size, pad to the
longest, 2-D attention mask, sdpa), the packed side is PackedDataset +
PackingCollator + chronicals_varlen (varlen_attn on CUDA).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # padded shapes vary every step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chronicals_compile.runtime import pack_bfd, packing_report  # noqa: E402

DISTRIBUTIONS = {
    # name: (mu, sigma) of a lognormal over token counts, clipped to [16, 4096]
    "lognormal(6.0, 1.0)  median ~400": (6.0, 1.0),
    "lognormal(7.0, 0.8)  median ~1100": (7.0, 0.8),
}


def sample_lengths(n: int, mu: float, sigma: float, seed: int = 0, lo: int = 16, hi: int = 4096) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mu, sigma, n).astype(np.int64), lo, hi)


def _git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # for runs from a copy of the tree that is not a git checkout
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _header(title: str, machine: str) -> list[str]:
    import torch

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [
        f"# {title}",
        "",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- commit: {_git_commit()}",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `{cmd}`",
        "",
    ]
    try:
        import transformers

        lines.insert(6, f"- transformers {transformers.__version__}")
    except ImportError:
        pass
    return lines


def _naive_padding_efficiency(lengths: np.ndarray, batch: int, bucket: int = 1, seed: int = 0) -> float:
    """Real / padded tokens when random batches of `batch` sequences are padded to their longest."""
    order = np.random.default_rng(seed).permutation(lengths.size)
    shuffled = lengths[order]
    usable = shuffled[: shuffled.size // batch * batch].reshape(-1, batch)
    longest = -(-usable.max(axis=1) // bucket) * bucket
    return float(usable.sum() / (longest.sum() * batch))


def cpu_report(args: argparse.Namespace) -> str:
    n = args.num_sequences
    lines = _header("Packing on the CPU: BFD efficiency and speed", f"{_cpu_model()} ({os.cpu_count()} cores), 1 core used")
    lines += [
        f"{n:,} sequence lengths per row, clipped to [16, 4096]. `bins/LB`: bins over the lower bound ceil(total/capacity).",
        "`packed eff.`: real tokens / (bins x capacity). `+bucket128`: rows padded to a multiple of 128",
        "(what PackingCollator emits, one pack per row). Padding baselines: random batches of 8 padded to",
        "their longest, and every sequence padded to 4096. Pack time: best of "
        f"{args.repeats} runs of `pack_bfd` (sort included).",
        "",
        "| distribution | capacity | bins | bins/LB | packed eff. | +bucket128 | pad-to-longest (b=8) | pad-to-4096 | pack time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, (mu, sigma) in DISTRIBUTIONS.items():
        lengths = sample_lengths(n, mu, sigma)
        for capacity in args.capacities:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                bins = pack_bfd(lengths, capacity)
                times.append(time.perf_counter() - t0)
            bin_sums = np.fromiter((lengths[b].sum() for b in bins), dtype=np.int64, count=len(bins))
            padded = int((-(-bin_sums // 128) * 128).sum())
            rep = packing_report(lengths, bins, capacity, padded_tokens=padded)
            lines.append(
                f"| {name} | {capacity} | {rep.num_bins:,} | {rep.num_bins / rep.lower_bound_bins:.5f} "
                f"| {rep.efficiency:.3%} | {rep.padded_efficiency:.3%} "
                f"| {_naive_padding_efficiency(lengths, 8):.2%} | {lengths.mean() / 4096:.2%} "
                f"| {min(times):.2f} s |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- GPU


def _qwen2_model(args, attn: str, dtype=None):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chronicals_compile.runtime import enable_packed_attention

    config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(32768, args.capacity),
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(dtype or torch.bfloat16)
    if attn == "chronicals_varlen":
        enable_packed_attention(model)
    else:
        model.set_attn_implementation(attn)
    return model.train()


def _padded_batches(docs, batch_size, pad_id=0, multiple=1):
    import torch

    for i in range(0, len(docs) - batch_size + 1, batch_size):
        chunk = docs[i : i + batch_size]
        width = -(-max(map(len, chunk)) // multiple) * multiple
        ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for r, d in enumerate(chunk):
            ids[r, : len(d)] = torch.tensor(d)
            mask[r, : len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}, int(mask.sum())


def _packed_batches(docs, capacity, rows):
    from chronicals_compile.runtime import PackedDataset, PackingCollator

    ds = PackedDataset(docs, capacity=capacity)
    collate = PackingCollator(bucket_multiple=128, max_length=capacity)
    order = np.random.default_rng(0).permutation(len(ds))
    for i in range(0, len(order) - rows + 1, rows):
        items = [ds[int(j)] for j in order[i : i + rows]]
        batch = collate(items)
        yield batch, sum(len(x) for it in items for x in it["input_ids"])


def _to_cuda(batch):
    import torch

    return {k: (v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _time_training(model, batches, warmup: int, steps: int, compile_model: bool):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    runner = torch.compile(model) if compile_model else model
    real = padded = 0
    grad_norm = 0.0
    torch._dynamo.utils.counters.clear()
    torch.cuda.reset_peak_memory_stats()
    start = end = None
    for i, (batch, n_real) in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
            real = padded = 0
        batch = _to_cuda(batch)
        loss = runner(**batch).loss
        loss.backward()
        if i == warmup + steps - 1:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += n_real
        padded += batch["input_ids"].numel()
        if i == warmup + steps - 1:
            torch.cuda.synchronize()
            end = time.perf_counter()
            break
    if end is None:
        raise SystemExit("not enough documents for warmup + steps; raise --num-docs")
    seconds = end - start
    return {
        "tok_s": real / seconds,
        "ms_step": 1000 * seconds / steps,
        "real_frac": real / padded,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "grad_norm": grad_norm,
        "loss": float(loss.detach()),
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
    }


def _check_varlen_correct(args) -> list[str]:
    """On CUDA the packed path is varlen_attn: per-document logits as accurate as sdpa on each document alone.

    bf16 through many random layers drifts by percents, so both bf16 sides are
    measured against an fp32 sdpa reference run per document, and the packed
    error must not exceed twice the stock sdpa error (plus a small slack).
    """
    import torch

    from chronicals_compile.runtime import PackingCollator
    from chronicals_compile.runtime import attention as attn_mod

    packed = _qwen2_model(args, "chronicals_varlen")
    ref = _qwen2_model(args, "sdpa")
    ref32 = _qwen2_model(args, "sdpa", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, args.vocab, (n,), generator=g).tolist() for n in (300, 77, 1024, 5, 611)]
    batch = _to_cuda(PackingCollator(bucket_multiple=128)(docs))
    calls = {"varlen": 0}
    original = attn_mod._varlen_forward

    def counting(*a, **k):
        calls["varlen"] += 1
        return original(*a, **k)

    attn_mod._varlen_forward = counting
    try:
        with torch.no_grad():
            logits = packed(**batch).logits.float()
            err_packed = err_sdpa = 0.0
            offset = 0
            for d in docs:
                x = torch.tensor([d], device="cuda")
                exact = ref32(input_ids=x).logits[0].float()
                scale = exact.abs().max()
                got = logits[0, offset : offset + len(d)]
                stock = ref(input_ids=x).logits[0].float()
                err_packed = max(err_packed, ((got - exact).abs().max() / scale).item())
                err_sdpa = max(err_sdpa, ((stock - exact).abs().max() / scale).item())
                offset += len(d)
        compiled = torch.compile(packed, fullgraph=True)
        loss_c = compiled(**batch).loss
        loss_c.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(packed.parameters(), 1e9).item()
    finally:
        attn_mod._varlen_forward = original
    lines = [
        f"- correctness: varlen_attn called {calls['varlen']} times (eager + compiled with fullgraph=True). "
        f"Worst per-document logit error vs an fp32 per-document reference, relative to max |logit|: "
        f"packed bf16 {err_packed:.2e}, stock sdpa bf16 on the document alone {err_sdpa:.2e}. "
        f"Compiled loss {loss_c.item():.4f}, grad norm {gnorm:.3g}."
    ]
    print(lines[0], flush=True)
    assert calls["varlen"] >= 2 * args.layers, "varlen path was not taken on CUDA"
    assert err_packed <= 2 * err_sdpa + 1e-3, "packed logits are less accurate than sdpa per document"
    assert gnorm > 0
    del packed, ref, ref32, compiled
    torch.cuda.empty_cache()
    return lines


def gpu_throughput(args: argparse.Namespace) -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-throughput needs CUDA")
    name = torch.cuda.get_device_name()
    lines = _header("Packed vs padded training throughput on CUDA", f"{name}; host {_cpu_model()}")
    lengths = sample_lengths(args.num_docs, args.mu, args.sigma, seed=2, hi=args.capacity)
    if args.pad_batch <= 0:  # same expected real tokens per step as the packed side (~99% full rows)
        args.pad_batch = max(1, round(args.capacity * args.rows * 0.99 / float(lengths.mean())))
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, args.vocab, int(n)).tolist() for n in lengths]
    lines += [
        f"Qwen2-shaped model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
        f"intermediate {args.intermediate}, vocab {args.vocab}, bf16 weights, full fine-tune, fused AdamW.",
        f"Documents: lognormal({args.mu}, {args.sigma}) lengths clipped to [16, {args.capacity}], random tokens.",
        f"Packed: BFD rows of {args.capacity} tokens, {args.rows} row(s) a step, chronicals_varlen. "
        f"Padded: batches of {args.pad_batch} documents padded to their longest (rounded up to a multiple of "
        f"{args.pad_multiple}), attention_mask, sdpa. "
        f"{args.warmup} warm-up steps, then {args.steps} timed steps (forward, backward, optimizer).",
        "",
        *_check_varlen_correct(args),
        "",
        "| run | compile | real tokens/s | ms/step | real/processed tokens | peak GiB | final loss | grad norm | graphs compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    results = {}
    for compile_model in args.compile_modes:
        for kind in ("padded", "packed"):
            attn = "sdpa" if kind == "padded" else "chronicals_varlen"
            model = _qwen2_model(args, attn)
            batches = (
                _padded_batches(docs, args.pad_batch, multiple=args.pad_multiple)
                if kind == "padded"
                else _packed_batches(docs, args.capacity, args.rows)
            )
            try:
                r = _time_training(model, batches, args.warmup, args.steps, compile_model)
            except torch.OutOfMemoryError as exc:  # a finding, not a crash: report it and go on
                lines.append(f"| {kind} | {'inductor' if compile_model else 'eager'} | out of memory: {str(exc)[:80]} |")
                print(lines[-1], flush=True)
                del model, batches
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                continue
            results[(kind, compile_model)] = r
            lines.append(
                f"| {kind} | {'inductor' if compile_model else 'eager'} | {r['tok_s']:,.0f} | {r['ms_step']:.1f} "
                f"| {r['real_frac']:.1%} | {r['peak_gib']:.1f} | {r['loss']:.3f} | {r['grad_norm']:.3g} | {r['graphs']} |"
            )
            print(lines[-1], flush=True)
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    lines.append("")
    for compile_model in args.compile_modes:
        if ("packed", compile_model) not in results or ("padded", compile_model) not in results:
            continue
        p, q = results[("packed", compile_model)], results[("padded", compile_model)]
        lines.append(
            f"- {'inductor' if compile_model else 'eager'}: packed / padded real-token throughput = "
            f"{p['tok_s'] / q['tok_s']:.2f}x"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-throughput", action="store_true", help="measure packed vs padded training on CUDA")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/packing_{cpu,gpu}.md)")
    # CPU
    p.add_argument("--num-sequences", type=int, default=1_000_000)
    p.add_argument("--capacities", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--repeats", type=int, default=3)
    # GPU
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--capacity", type=int, default=4096, help="packed row length (tokens)")
    p.add_argument("--rows", type=int, default=1, help="packed rows per step")
    p.add_argument("--pad-batch", type=int, default=0, help="documents per padded step (0: same expected real tokens)")
    p.add_argument("--mu", type=float, default=6.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--num-docs", type=int, default=6000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", choices=["none", "inductor", "both"], default="none",
                   help="measure eager (none), torch.compile with inductor, or both")
    p.add_argument("--pad-multiple", type=int, default=128,
                   help="padded side pads to a multiple of this (HF pad_to_multiple_of), limiting recompiles")
    args = p.parse_args(argv)
    args.compile_modes = {"none": [False], "inductor": [True], "both": [False, True]}[args.compile]

    if args.gpu_throughput:
        text = gpu_throughput(args)
        out = args.out or ROOT / "benchmarks" / "results" / "packing_gpu.md"
    else:
        text = cpu_report(args)
        out = args.out or ROOT / "benchmarks" / "results" / "packing_cpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
