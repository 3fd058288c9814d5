"""End-to-end training-step benchmark: eager, Inductor, Liger-Kernel (eager / compiled), Apple's cut
cross-entropy (default gradient filter, and exact), chronicals.

Every (shape, mode, variant) runs in its own subprocess, so compile caches, patched classes
(Liger patches transformers' modules globally) and allocator state never leak between
variants. Each worker builds the same model (random weights, fixed seed, bf16, sdpa attention,
tied embeddings) and the same random token batches, then times full training steps:

    loss = model(input_ids, labels=input_ids).loss; loss.backward();
    clip_grad_norm_(trainable, 1.0); AdamW(fused=True).step(); zero_grad(set_to_none=True)

Reported per run: median tokens/s over the timed steps (after warm-up; the first warm-up step,
which compiles, is reported separately), real tokens/s (labels that score; equal to all tokens
for these unpadded batches), MFU, peak memory (``torch.cuda.max_memory_allocated``), the first
and final loss, the gradient norm (0 or NaN is flagged), and each variant's losses against
eager's: the first step's loss (same weights, same batch) must agree within the bf16 tolerance
below, the final one within a looser bound (bf16 training trajectories drift apart).

MFU = tokens/s x FLOP/token / peak bf16 FLOP/s (H200: 989e12 dense), FLOP/token = 6 x trained
+ 4 x frozen linear weights (lm_head included once, embeddings excluded) + 12 x layers x
d_attn x seq_len (PaLM's attention term, causality not halved): see
``chronicals_compile/cli/metrics.py``.

    python benchmarks/e2e.py                                  # everything (far more than 10 minutes)
    python benchmarks/e2e.py --shapes qwen0.5b-8x2048 --modes full --variants eager,inductor,chronicals
    python benchmarks/e2e.py --device cpu --tiny              # seconds-scale CPU smoke run

Outputs ``e2e-<date>-<gpu>.md/.json`` and ``-throughput.png`` / ``-memory.png`` under
``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

#: ``chronicals``: the backend's defaults; ``chronicals-all``: also the patterns that are off by
#: default until measured faster than Inductor (config.CUDA_OFF_BY_DEFAULT, config.OFF_BY_DEFAULT);
#: ``chronicals-lean``: a memory budget (--lean-budget); ``chronicals-tuned``: Inductor's coordinate
#: descent tuning of its own Triton kernels, passed through our options; ``chronicals-cudagraphs``:
#: Inductor's ``reduce-overhead`` mode (CUDA graphs: no launch gaps); ``chronicals-autotune``:
#: ``max-autotune-no-cudagraphs`` (Triton GEMM templates with pointwise epilogues fused into them);
#: ``chronicals-autotune-gemm``: only the GEMM half of that (``max_autotune_gemm``: templates and
#: epilogue fusion, no pointwise-kernel autotuning, no coordinate descent), whose compile is the
#: cheaper part: the whole mode did not finish compiling in ~300 s in sessions 5 and 8.
VARIANTS = ("eager", "inductor", "liger", "liger-compiled", "cce", "cce-exact", "chronicals", "chronicals-all",
            "chronicals-lean", "chronicals-tuned", "chronicals-bigchunk", "chronicals-lowmem",
            "chronicals-chunk4096", "chronicals-chunk8192", "chronicals-rope", "chronicals-gqa",
            "chronicals-cudagraphs", "chronicals-rope-cudagraphs", "chronicals-autotune", "chronicals-concat",
            "chronicals-lora-linear", "chronicals-lora-fused", "chronicals-noconcat", "chronicals-autotune-gemm",
            "chronicals-cce-lean", "chronicals-no-epilogue", "chronicals-epilogue-cudagraphs",
            "chronicals-concat-cudagraphs", "inductor-cudagraphs", "chronicals-fa4", "chronicals-fa4-cudagraphs",
            "chronicals-chunk5504", "chronicals-chunk5504-cudagraphs", "chronicals-quack-ce", "chronicals-triton-ce", "chronicals-quack-public",
            "chronicals-concat-kv", "chronicals-dgated-c2", "chronicals-dgated-c1x2", "chronicals-dgated-c2x1",
            "chronicals-pdl", "inductor-pdl", "chronicals-combo", "chronicals-pdl-combo", "chronicals-nomix",
            "chronicals-pdl-nomix", "inductor-nomix", "chronicals-keep-w1", "chronicals-levers27")
#: Inductor mode of a chronicals variant; ``reduce-overhead`` replays CUDA graphs, so each of its
#: steps is marked (outputs are cloned for every variant).
VARIANT_MODE = {"chronicals-cudagraphs": "reduce-overhead", "chronicals-epilogue-cudagraphs": "reduce-overhead",
                "chronicals-rope-cudagraphs": "reduce-overhead", "chronicals-concat-cudagraphs": "reduce-overhead",
                "chronicals-fa4-cudagraphs": "reduce-overhead", "chronicals-chunk5504-cudagraphs": "reduce-overhead",
                "inductor-cudagraphs": "reduce-overhead",  # plain torch.compile's CUDA graphs: the fair reference
                "chronicals-autotune": "max-autotune-no-cudagraphs"}
#: Inductor config keys a chronicals variant passes through our options (``inductor-pdl``: plain
#: torch.compile with the same keys).
#: ``*-pdl``: Programmatic Dependent Launch for Inductor's Triton kernels (Hopper+: each kernel
#: may start while the one before it drains, and waits on the GPU only before touching that one's
#: outputs); ``*-combo``: Inductor's horizontal fusion of independent kernels (fewer launches);
#: ``chronicals-nomix``: without Inductor's mixed-order reductions (the RMSNorm backward's row and
#: column sums in one kernel, whose partial column sums end in a wrapper-level
#: ``ws.view(nsplit, d).sum(dim=0).to(bf16)``, torch/_inductor/codegen/simd.py: the 49 aten float
#: sums (9.7 us each) and 49 casts a step in session 14's H200 profile, Inductor's step and ours).
VARIANT_INDUCTOR = {"chronicals-tuned": {"coordinate_descent_tuning": True},
                    "chronicals-autotune-gemm": {"max_autotune_gemm": True},
                    "chronicals-pdl": {"triton.enable_pdl": True}, "inductor-pdl": {"triton.enable_pdl": True},
                    "chronicals-combo": {"combo_kernels": True},
                    "chronicals-pdl-combo": {"triton.enable_pdl": True, "combo_kernels": True},
                    "chronicals-nomix": {"triton.mix_order_reduction": False},
                    "inductor-nomix": {"triton.mix_order_reduction": False},
                    "chronicals-pdl-nomix": {"triton.enable_pdl": True, "triton.mix_order_reduction": False}}
#: Our own options a chronicals variant sets (``chronicals-keep-w1``: the MLP's backward reuses the
#: forward's interleaved gate/up weight, ``chronicals.mlp_keep_weight``).
VARIANT_OPTIONS = {"chronicals-keep-w1": {"mlp_keep_weight": True}}
#: ``chronicals-levers27``: the three levers session 27 left unmeasured (PDL, no mixed-order
#: reductions, the kept weight) together, beside each alone.
VARIANT_INDUCTOR["chronicals-levers27"] = VARIANT_INDUCTOR["chronicals-pdl-nomix"]
VARIANT_OPTIONS["chronicals-levers27"] = VARIANT_OPTIONS["chronicals-keep-w1"]
#: Patterns a chronicals variant enables beyond the defaults (rope and gqa_attention are on by
#: default since sessions 6 and 5: their variants name them for older defaults).
VARIANT_ENABLE = {
    "chronicals-rope": ["rope"], "chronicals-rope-cudagraphs": ["rope"], "chronicals-gqa": ["gqa_attention"],
    "chronicals-concat": ["concat_linear"],  # q/k/v and gate/up (and LoRA's lora_A) as one GEMM each
    "chronicals-concat-cudagraphs": ["concat_linear"],
    "chronicals-concat-kv": ["concat_narrow_linear"],  # k/v as one GEMM, q apart
    "chronicals-lora-linear": ["lora_linear"],  # LoRA's wide projections: base and adapter in one GEMM
    "chronicals-lora-fused": ["lora_linear", "concat_linear"],
    "chronicals-fa4": ["flash_attention"],  # flash-attn-4's kernels instead of cuDNN's SDPA
    "chronicals-fa4-cudagraphs": ["flash_attention"],
}
#: Patterns a chronicals variant turns off (a default measured against its absence).
#: chronicals-no-epilogue: the MLP left to Inductor although QuACK is importable (mlp_epilogue
#: applies by default where it is; without QuACK "chronicals" is this variant)
VARIANT_DISABLE = {"chronicals-noconcat": ["concat_linear"], "chronicals-no-epilogue": ["mlp_epilogue"]}
#: Environment of a variant's worker process, set before chronicals_compile is imported.
VARIANT_ENV = {
    # cut cross-entropy with 4096-row gradient chunks and tile logits (kernel sweep: 26.4 vs 28.1 ms,
    # a 1.24 GB chunk buffer instead of 0.54 GB at the Qwen shape)
    "chronicals-bigchunk": {"CHRONICALS_CCE_CHUNK_ROWS": "4096", "CHRONICALS_CCE_LOGITS": "tiles"},
    # the default (matmul logits) with fewer, larger gradient chunks: memory against speed
    "chronicals-chunk4096": {"CHRONICALS_CCE_CHUNK_ROWS": "4096"},
    "chronicals-chunk8192": {"CHRONICALS_CCE_CHUNK_ROWS": "8192"},
    # three chunks at 8 x 2048 instead of five (3328 rows): 0.62 GiB more buffer, inside half of
    # Inductor's peak (16.41 GiB) by 0.1 GiB if the loss sets the peak
    "chronicals-chunk5504": {"CHRONICALS_CCE_CHUNK_ROWS": "5504"},
    "chronicals-chunk5504-cudagraphs": {"CHRONICALS_CCE_CHUNK_ROWS": "5504"},
    # QuACK's cross-entropy row kernel after each chunk's GEMM: one read of the chunk instead of two
    "chronicals-quack-ce": {"CHRONICALS_CCE_ROWS": "quack"},  # the default since session 18
    "chronicals-triton-ce": {"CHRONICALS_CCE_ROWS": "triton"},  # our row kernel, the default before
    # QuACK's gated GEMMs through its public call each time, as before session 20's direct launch
    "chronicals-quack-public": {"CHRONICALS_QUACK_LAUNCH": "public"},
    # the MLP's backward GEMM with QuACK's own 2-deep C prefetch, as before session 22 (4 by default)
    "chronicals-dgated-c2": {"CHRONICALS_QUACK_DGATED_C_STAGES": "quack"},
    # the MLP backward's tile cluster forced either way (by default 2 x 1 on the H100, 1 x 2 elsewhere)
    "chronicals-dgated-c1x2": {"CHRONICALS_QUACK_DGATED_CLUSTER": "1x2"},
    "chronicals-dgated-c2x1": {"CHRONICALS_QUACK_DGATED_CLUSTER": "2x1"},
    # cut cross-entropy recomputing in backward over vocabulary slices (about 0.3 GiB extra)
    "chronicals-lowmem": {"CHRONICALS_CCE_MODE": "recompute", "CHRONICALS_CCE_BACKWARD": "vocab"},
    # cce_mode="lean": vocabulary slices no wider than the hidden size (the least extra memory)
    "chronicals-cce-lean": {"CHRONICALS_CCE_MODE": "lean"},
}
MODES = ("full", "lora")
#: name -> (preset, batch, seq)
SHAPES = {
    "qwen0.5b-8x2048": ("qwen2.5-0.5b", 8, 2048),
    "qwen0.5b-16x4096": ("qwen2.5-0.5b", 16, 4096),
    "llama1b-8x2048": ("llama-3.2-1b", 8, 2048),
    "tiny-2x64": ("tiny", 2, 64),
}
TINY_VOCAB = 512
LORA_R = 32
#: |loss - eager loss| <= tol * |eager loss|. First step: same weights and batch, differences are
#: bf16 rounding of differently fused kernels (a few ulp of bf16, 2^-8 = 0.4%, accumulated over
#: layers). Final step: after N optimizer steps on random tokens trajectories drift further.
FIRST_LOSS_RTOL = {"bfloat16": 0.02, "float32": 1e-3}
FINAL_LOSS_RTOL = {"bfloat16": 0.05, "float32": 0.01}
RESULT_TAG = "E2E_RESULT "


# =========================================================================== worker

def _apply_liger(family: str) -> None:
    import liger_kernel.transformers as lk

    apply = {"qwen2": lk.apply_liger_kernel_to_qwen2, "llama": lk.apply_liger_kernel_to_llama}[family]
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def _cce_loss_step(model, variant: str, device: str):
    """Apple's cut cross-entropy as its README applies it (its 25.x wheel has no transformers patch):
    the decoder body under torch.compile, then ``linear_cross_entropy(hidden, lm_head.weight,
    labels, shift=1)``, which shifts and averages over the scored tokens as HF's loss does.
    ``cce`` keeps its default gradient filter (approximate: small softmax tiles are skipped);
    ``cce-exact`` passes ``filter_eps=None``. On CPU its pure-torch impl runs (the harness smoke run)."""
    from cut_cross_entropy import linear_cross_entropy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = base.model, base.get_output_embeddings()
    body.compile()
    kwargs = {"filter_eps": None} if variant == "cce-exact" else {}
    impl = "cce" if device.startswith("cuda") else "torch_compile"

    def step(ids):
        hidden = body(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, head.weight, ids, shift=1, impl=impl, **kwargs)
    return step


class Unavailable(Exception):
    """A variant that cannot run here (a peer package missing): a row saying so, not an error."""


def build_variant(spec: dict):
    """``(model, trainable, optimizer, loss_step, vocab)`` of one variant, compiled as its row says
    (``loss_step`` is None where the model computes its own loss). Shared by the one-process-per-
    variant runs here and the interleaved ones of ``e2e_paired.py``, so both time the same thing."""
    import torch

    from chronicals_compile.cli import presets
    from chronicals_compile.runtime import enable_activation_checkpointing

    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    preset = presets.PRESETS[spec["preset"]]
    variant, mode = spec["variant"], spec["mode"]
    if variant.startswith("liger"):
        try:
            _apply_liger(preset.family)
        except ImportError as err:
            raise Unavailable(f"n/a (liger_kernel not importable: {err.name or err})") from err
    torch.manual_seed(spec["seed"])
    vocab = preset.vocab or TINY_VOCAB
    model = presets.build_model(preset, vocab, dtype=dtype, device=device, seed=spec["seed"])
    model.config.use_cache = False
    if spec.get("gradient_checkpointing"):
        enable_activation_checkpointing(model)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        # peft keeps bf16/fp16 adapters in fp32 by default (autocast_adapter_dtype), so their GEMMs
        # run in fp32; "model" keeps them in the model's dtype (what bf16 LoRA stacks measure).
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"),
                               autocast_adapter_dtype=spec.get("lora_adapter_dtype", "fp32") == "fp32")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], fused=device.startswith("cuda") or None)
    loss_step = None
    if variant in ("inductor", "liger-compiled", "inductor-cudagraphs"):
        model.compile(mode=VARIANT_MODE.get(variant))
    elif variant.startswith("inductor-") and variant in VARIANT_INDUCTOR:  # plain compile, same switch: the fair reference
        model.compile(options=VARIANT_INDUCTOR[variant])
    elif variant.startswith("cce"):
        try:
            loss_step = _cce_loss_step(model, variant, device)
        except ImportError as err:
            raise Unavailable(f"n/a (cut_cross_entropy not importable: {err.name or err})") from err
    elif variant.startswith("chronicals"):
        import chronicals_compile

        chronicals_compile.compile(model, **chronicals_options(spec))
    return model, trainable, optimizer, loss_step, vocab


def chronicals_options(spec: dict) -> dict:
    """The options a chronicals variant hands ``chronicals_compile.compile``."""
    from chronicals_compile.config import CUDA_OFF_BY_DEFAULT, OFF_BY_DEFAULT

    variant = spec["variant"]
    options = {} if spec.get("chronicals_compiler", "inductor") == "inductor" else {
        "compiler": spec["chronicals_compiler"]}
    if variant == "chronicals-all":
        options["enable"] = sorted({*CUDA_OFF_BY_DEFAULT, *OFF_BY_DEFAULT})
    if variant in VARIANT_ENABLE:
        options["enable"] = VARIANT_ENABLE[variant]
    if variant in VARIANT_DISABLE:
        options["disable"] = VARIANT_DISABLE[variant]
    if variant == "chronicals-lean":  # recompute more in backward, hold less (see --lean-budget)
        options["memory_budget"] = spec["lean_budget"]
    options.update(VARIANT_INDUCTOR.get(variant, {}))
    options.update(VARIANT_OPTIONS.get(variant, {}))
    if variant in VARIANT_MODE:
        options["mode"] = VARIANT_MODE[variant]
    return options


def training_step(model, trainable, optimizer, loss_step, ids, variant: str):
    """One full step as every variant is timed: ``(loss, gradient norm)``, both detached tensors
    (the loss cloned: a CUDA graph's output is overwritten by its next replay)."""
    import torch

    if VARIANT_MODE.get(variant) == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be reused
    loss = loss_step(ids) if loss_step else model(input_ids=ids, labels=ids).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().clone(), norm.detach()


def worker(spec: dict) -> dict:
    import torch

    if spec.get("precompile"):
        # fill the compile caches only: leave kernel-config benchmarking (done at a kernel's first
        # launch, on a GPU shared with other precompiling workers) to the timed run
        torch._inductor.config.autotune_local_cache = False

    from chronicals_compile.cli import metrics

    device = spec["device"]
    variant = spec["variant"]
    batch, seq = spec["batch"], spec["seq"]
    result = {k: spec[k] for k in ("shape", "mode", "variant")}
    try:
        model, trainable, optimizer, loss_step, vocab = build_variant(spec)
    except Unavailable as why:
        return {**result, "status": str(why)}

    # The same batches for every variant: a CPU generator, then moved.
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    n_batches = spec["warmup"] + spec["steps"]
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n_batches)]
    real_tokens = batch * (seq - 1)  # labels that score after the shift
    all_tokens = batch * seq

    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    from gpu_clocks import ClockSampler

    clocks = ClockSampler(torch.cuda.current_device() if on_gpu else 0)
    losses, norms, times = [], [], []
    for i, ids in enumerate(batches):
        if on_gpu and i == spec["warmup"]:
            clocks.start()  # the timed steps only
        ids = ids.to(device, non_blocking=True)
        sync()
        t0 = time.perf_counter()
        loss, norm = training_step(model, trainable, optimizer, loss_step, ids, variant)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        norms.append(norm)
        del loss
    clocks.stop()
    losses = [float(x) for x in losses]
    norms = [float(x) for x in norms]
    timed = times[spec["warmup"]:]
    step_s = sorted(timed)[len(timed) // 2] if timed else float("nan")
    flops_tok = metrics.model_flops_per_token(model, context=seq)
    peak = spec.get("peak_flops") or metrics.peak_bf16_flops(
        torch.cuda.get_device_name() if on_gpu else None)
    tok_s = all_tokens / step_s
    real_s = real_tokens / step_s
    mem, _ = metrics.peak_memory_bytes(torch.device(device))  # CUDA: max_memory_allocated; CPU: peak RSS
    bad_norm = [i + 1 for i, g in enumerate(norms) if not math.isfinite(g) or g == 0.0]
    result.update({
        "status": "ok",
        "step_ms": step_s * 1e3,
        "tokens_per_s": tok_s,
        "real_tokens_per_s": real_s,
        "mfu": metrics.mfu(flops_tok, real_s, peak),
        "flops_per_token": flops_tok,
        "peak_memory_bytes": mem,
        "first_step_s": times[0],
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "losses": losses,
        "grad_norm": norms[-1],
        "grad_norms": norms,
        "bad_grad_norm_steps": bad_norm,
        "step_times_s": times,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        **clocks.summary(),
    })
    if variant.startswith("chronicals"):
        from torch._dynamo.utils import counters

        result["swaps"] = {k: v for k, v in counters["chronicals"].items() if not k.endswith("_fallback")}
    return result


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    os.environ.update(VARIANT_ENV.get(spec["variant"], {}))
    if os.environ.get("CHRONICALS_E2E_STACKS_AFTER"):
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["CHRONICALS_E2E_STACKS_AFTER"]), exit=False)
    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        result = worker(spec)
    except Exception as err:  # noqa: BLE001 - recorded in the table, not raised
        import torch

        base = {k: spec[k] for k in ("shape", "mode", "variant")}
        if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
            result = {**base, "status": "OOM"}
        else:
            last = traceback.format_exc().strip().splitlines()[-1]
            result = {**base, "status": f"error: {last[:200]}"}
            traceback.print_exc()
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# =========================================================================== parent

def run_variant(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           # a worker about to be timed out prints where every thread is (faulthandler), kept below
           "CHRONICALS_E2E_STACKS_AFTER": str(max(1.0, timeout - 10))}
    base = {k: spec[k] for k in ("shape", "mode", "variant")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)

    def stop_worker(signum, frame):  # killed from outside (timeout): take the worker's GPU work along
        os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop_worker)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return {**base, "status": f"timeout ({timeout:.0f} s)", "wall_s": time.perf_counter() - t0,
                "stderr_tail": (err or "").strip().splitlines()[-60:]}
    finally:
        signal.signal(signal.SIGTERM, previous)
    wall = time.perf_counter() - t0
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["wall_s"] = wall
            if result["status"].startswith("error") and err.strip():
                result["stderr_tail"] = err.strip().splitlines()[-20:]
            return result
    tail = (err.strip().splitlines() or ["(no output)"])[-1]
    status = "OOM" if "out of memory" in err.lower() else f"crashed (exit {proc.returncode}): {tail[:200]}"
    return {**base, "status": status, "wall_s": wall}


#: Variants whose compiled code does not depend on timings taken while compiling (max-autotune
#: picks GEMM templates and coordinate descent tuning picks block sizes by benchmarking them:
#: compiled beside other workers, they would choose under contention), so compiling them ahead,
#: several at once, changes nothing but the first step.
PRECOMPILABLE = tuple(v for v in VARIANTS if v not in ("eager", "liger", "chronicals-autotune", "chronicals-tuned",
                                                         "chronicals-autotune-gemm"))


def precompile(specs: list[dict], concurrency: int, timeout: float) -> float:
    """One untimed step of each compiled variant, ``concurrency`` processes at a time, so that the
    timed runs find their graphs in Inductor's and AOTAutograd's on-disk caches: a cold H200 host
    spent 50-60 s compiling each variant, one after another (session 5). Returns the seconds spent."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    pending = [dict(spec, steps=1, warmup=0, precompile=True) for spec in specs if spec["variant"] in PRECOMPILABLE]
    running: list[tuple[subprocess.Popen, float]] = []

    def stop_workers(signum, frame):  # killed from outside (a stage's timeout): take the workers along
        for proc, _ in running:
            os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop_workers)
    try:
        _drain(pending, running, concurrency, timeout, env)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return time.perf_counter() - t0


def _drain(pending: list[dict], running: list, concurrency: int, timeout: float, env: dict) -> None:
    while pending or running:
        while pending and len(running) < concurrency:
            spec = pending.pop(0)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
            running.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                             start_new_session=True), time.perf_counter()))
        time.sleep(0.5)
        for proc, started in list(running):
            if proc.poll() is not None:
                running.remove((proc, started))
            elif time.perf_counter() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                running.remove((proc, started))


def compare_losses(results: list[dict]) -> None:
    """Attach each run's loss difference to eager's (same shape and mode) and a verdict."""
    eager = {(r["shape"], r["mode"]): r for r in results if r["variant"] == "eager" and r["status"] == "ok"}
    for r in results:
        if r["status"] != "ok":
            continue
        health = "ok" if not r["bad_grad_norm_steps"] else f"BAD at steps {r['bad_grad_norm_steps']}"
        r["grad_health"] = health
        ref = eager.get((r["shape"], r["mode"]))
        if ref is None or r is ref:
            r["loss_check"] = "reference" if r is ref else "no eager run"
            continue
        dtype = r.get("dtype", "bfloat16")
        d_first = abs(r["first_loss"] - ref["first_loss"]) / max(1e-12, abs(ref["first_loss"]))
        d_final = abs(r["final_loss"] - ref["final_loss"]) / max(1e-12, abs(ref["final_loss"]))
        r["first_loss_rel_diff"] = d_first
        r["final_loss_rel_diff"] = d_final
        ok = d_first <= FIRST_LOSS_RTOL[dtype] and d_final <= FINAL_LOSS_RTOL[dtype]
        r["loss_check"] = "ok" if ok else (
            f"DIFFERS (first {d_first:.2%} > {FIRST_LOSS_RTOL[dtype]:.0%} or final {d_final:.2%} > "
            f"{FINAL_LOSS_RTOL[dtype]:.0%})")


COLUMNS = ("shape", "mode", "variant", "status", "tokens/s", "real tokens/s", "step ms", "MFU",
           "peak mem GiB", "first step s", "first loss", "final loss", "vs eager", "grad norm", "SM MHz", "W", "deg C", "clock reasons")


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        row = {"shape": r["shape"], "mode": r["mode"], "variant": r["variant"], "status": r["status"]}
        if r["status"] == "ok":
            mem = r.get("peak_memory_bytes")
            row.update({
                "tokens/s": r["tokens_per_s"], "real tokens/s": r["real_tokens_per_s"],
                "step ms": r["step_ms"],
                "MFU": f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a",
                "peak mem GiB": f"{mem / 2**30:.2f}" if mem is not None else "n/a",
                "first step s": r["first_step_s"], "first loss": f"{r['first_loss']:.4f}",
                "final loss": f"{r['final_loss']:.4f}",
                "vs eager": r.get("loss_check", "") + (
                    f" ({r['first_loss_rel_diff']:.2%} / {r['final_loss_rel_diff']:.2%})"
                    if "first_loss_rel_diff" in r else ""),
                "grad norm": f"{r['grad_norm']:.3g}" + ("" if r.get("grad_health") == "ok" else
                                                       f" {r.get('grad_health', '')}"),
                "SM MHz": f"{r['sm_mhz']:.0f}" if "sm_mhz" in r else "-",
                "W": f"{r['power_w']:.0f}" if "power_w" in r else "-",
                "deg C": f"{r['temp_c']:.0f}" if "temp_c" in r else "-",
                "clock reasons": r.get("clock_reasons", "-"),
            })
        rows.append(row)
    return rows


def draw_charts(results: list[dict], device: str, out: str, stem: str) -> list[str | None]:
    """Throughput and peak-memory bars per shape and mode (also from a saved JSON: --charts-from)."""
    import common

    groups_tp: dict = {}
    groups_mem: dict = {}
    for r in results:
        key = f"{r['shape']} {r['mode']}"
        ok = r["status"] == "ok"
        groups_tp.setdefault(key, {})[r["variant"]] = r["tokens_per_s"] if ok else None
        mem = r.get("peak_memory_bytes") if ok else None
        groups_mem.setdefault(key, {})[r["variant"]] = mem / 2**30 if mem is not None else None
    pngs = [common.bar_charts(os.path.join(out, stem + "-throughput.png"), groups_tp, "tokens/s",
                              f"training throughput ({device})")]
    if any(v is not None for g in groups_mem.values() for v in g.values()):
        pngs.append(common.bar_charts(os.path.join(out, stem + "-memory.png"), groups_mem, "peak GiB",
                                      f"peak memory ({device})"))
    return pngs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help="full, lora (LoRA r=32 on all linear projections)")
    p.add_argument("--shapes", default=None,
                   help=f"comma list of {', '.join(s for s in SHAPES if s != 'tiny-2x64')} "
                        "(default: all; tiny-2x64 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 10; 3 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first, compile included (default 3; 2 with --tiny)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per variant before it is killed (default 600)")
    p.add_argument("--precompile", type=int, default=0, metavar="N",
                   help="first compile every compiled variant untimed, N processes at a time (0: off); "
                        "the timed runs then load their graphs from the compile caches")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                   help="weights and compute (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (2 x 64 tokens, 2 layers): a smoke run")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                   help="output folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--name", default=None, help="file name stem (default: e2e-<date>-<gpu>)")
    p.add_argument("--commit", default=None,
                   help="commit to record when the tree has no .git (e.g. a device copy); "
                        "also read from $CHRONICALS_COMMIT")
    # Hidden: the chronicals variant's compiler (tests on CPU use aot_eager).
    p.add_argument("--lean-budget", type=float, default=0.5,
                   help="chronicals-lean's memory_budget: share of activations kept for backward (default 0.5)")
    p.add_argument("--lora-adapter-dtype", default="fp32", choices=("fp32", "model"),
                   help="LoRA A/B weights: fp32 (peft's default for bf16 models) or the model's dtype")
    p.add_argument("--charts-from", default=None,
                   help="redraw the PNG charts of a saved e2e JSON (e.g. a run cut by a time limit) and exit")
    p.add_argument("--chronicals-compiler", default="inductor", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.charts_from:
        with open(args.charts_from) as f:
            saved = json.load(f)
        out, name = os.path.split(os.path.abspath(args.charts_from))
        print("e2e: wrote", ", ".join(p for p in draw_charts(saved["results"], saved["environment"]["device"],
                                                            out, os.path.splitext(name)[0]) if p))
        return 0
    import torch

    import common

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    shapes = ([s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else
              (["tiny-2x64"] if args.tiny else [s for s in SHAPES if s != "tiny-2x64"]))
    for name, values, known in (("variant", variants, VARIANTS), ("mode", modes, MODES), ("shape", shapes, SHAPES)):
        bad = [v for v in values if v not in known]
        if bad:
            print(f"e2e: error: unknown {name}(s) {bad}; known: {list(known)}", file=sys.stderr)
            return 2
    steps = args.steps or (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    if "eager" not in variants:
        print("e2e: note: no eager run, so losses are not compared", file=sys.stderr)

    if args.commit:
        os.environ["CHRONICALS_COMMIT"] = args.commit
    env = common.environment(device)
    print("e2e: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    write = _writer(args, argv, env, device, dtype, steps, warmup)
    results = []
    specs = [{"shape": shape, "mode": mode, "variant": variant, "preset": SHAPES[shape][0], "batch": SHAPES[shape][1],
              "seq": SHAPES[shape][2], "device": device, "dtype": dtype, "steps": steps, "warmup": warmup,
              "seed": args.seed, "lr": args.lr, "gradient_checkpointing": args.gradient_checkpointing,
              "chronicals_compiler": args.chronicals_compiler, "lean_budget": args.lean_budget,
              "lora_adapter_dtype": args.lora_adapter_dtype,
              "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else None}
             for shape in shapes for mode in modes for variant in variants]
    if args.precompile > 0:
        spent = precompile(specs, args.precompile, args.timeout)
        print(f"e2e: precompiled {sum(s['variant'] in PRECOMPILABLE for s in specs)} variant(s), "
              f"{args.precompile} at a time, in {spent:.0f} s", flush=True)
    for spec in specs:
        shape, mode, variant = spec["shape"], spec["mode"], spec["variant"]
        r = run_variant(spec, args.timeout)
        r["dtype"] = dtype
        results.append(r)
        if r["status"] == "ok":
            print(f"e2e: {shape} {mode} {variant}: {r['tokens_per_s']:,.0f} tok/s, step {r['step_ms']:.1f} ms, "
                  f"peak {common_mem(r)}, loss {r['first_loss']:.4f} -> {r['final_loss']:.4f}, "
                  f"first step {r['first_step_s']:.1f} s ({r['wall_s']:.0f} s wall)", flush=True)
        else:
            print(f"e2e: {shape} {mode} {variant}: {r['status']} ({r.get('wall_s', 0):.0f} s wall)", flush=True)
            for line in r.get("stderr_tail", [])[-6:]:
                print(f"      {line}", flush=True)
        compare_losses(results)
        write(results, final=False)  # a run cut short by a time limit keeps what it measured
    write(results, final=True)
    return 0


def _writer(args, argv, env: dict, device: str, dtype: str, steps: int, warmup: int):
    """``write(results, final)``: the markdown table and JSON (every call), the PNGs and the printed
    table (final call only)."""
    import common

    stem = args.name or common.stamp("e2e", device)
    out = args.out
    formula = ("MFU = real tokens/s x FLOP/token / peak bf16 FLOP/s; FLOP/token = 6 x trained + 4 x frozen "
               "linear weights + 12 x layers x d_attn x seq (PaLM attention term); peak "
               + (f"{args.peak_tflops:g} TFLOP/s (given)" if args.peak_tflops else
                  "by GPU name (H200/H100 989 TFLOP/s dense bf16)"))
    cached = (f"; compiled variants were first compiled untimed, {args.precompile} at a time (--precompile), so "
              "it loads them from the compile caches" if args.precompile else "")
    notes = (f"{steps} timed steps after {warmup} warm-up step(s), median step time; first step s = the first "
             f"warm-up step (compilation included{cached}). Random weights and tokens (seed {args.seed}), {dtype}, sdpa "
             f"attention, AdamW(fused=True) lr {args.lr:g}, grad clipping 1.0; LoRA: r={LORA_R}, alpha={2 * LORA_R}, "
             f"all linear projections, adapter weights {args.lora_adapter_dtype}. chronicals-lean: memory_budget {args.lean_budget:g}. Each variant in its own process. Loss check: first-step loss within "
             f"{FIRST_LOSS_RTOL[dtype]:.0%} and final loss within {FINAL_LOSS_RTOL[dtype]:.0%} of eager's "
             f"(relative). Peak memory: " + ("torch.cuda.max_memory_allocated." if device.startswith("cuda") else
                                   "peak RSS of the worker process (CPU)."))
    command = "python benchmarks/e2e.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(results: list[dict], final: bool) -> None:
        table = common.markdown_table(table_rows(results), COLUMNS)
        md = common.write_markdown(os.path.join(out, stem + ".md"), "End-to-end training step", env,
                                   [("", f"Command: `{command.strip()}`"), ("", table), ("", formula), ("", notes)])
        payload = {"environment": env, "command": command, "steps": steps, "warmup": warmup, "formula": formula,
                   "results": results, "complete": final}
        js = common.write_json(os.path.join(out, stem + ".json"), payload)
        if not final:
            return
        pngs = draw_charts(results, env["device"], out, stem)
        print()
        print(table)
        print()
        print(formula)
        print("e2e: wrote " + ", ".join(p for p in [md, js, *pngs] if p)
              + ("" if all(pngs) else " (no PNG: matplotlib missing)"))

    return write


def common_mem(r: dict) -> str:
    mem = r.get("peak_memory_bytes")
    return f"{mem / 2**30:.2f} GiB" if mem is not None else "n/a"


if __name__ == "__main__":
    sys.exit(main())
