"""``chronicals finetune``: fine-tune a causal LM with the chronicals backend, BFD packing and LoRA+.

Pipeline: model (local folder or preset) -> data (embedded default or a local file), tokenized
with labels only on response tokens -> ``PackedDataset`` (Best-Fit-Decreasing into rows of
``--max-len``) -> ``PackingCollator`` (position ids restart per document, ``cu_seq_lens``) ->
``enable_packed_attention`` (attention never crosses documents) -> optional peft LoRA on every
linear projection with the LoRA+ optimizer -> ``chronicals_compile.compile`` -> an AdamW loop.

Every batch has the same shape, ``[rows, max_len]`` (rows padded to ``max_len``; BFD leaves
little to pad), so the compiled step is captured once. Two things would otherwise recompile:
the number of documents in a batch changes ``cu_seq_lens``' length (marked dynamic up front),
and ``max_length_q/k`` is a Python int (pinned to ``max_len``, an upper bound of every segment,
which is all a varlen kernel needs it to be).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time

from .data import DataError

IGNORE_INDEX = -100


class UsageError(ValueError):
    """Bad input: one ``chronicals: error:`` line on stderr, exit code 2."""


class TrainingError(RuntimeError):
    """The run itself went wrong (zero or NaN gradient norm, NaN loss): exit code 1."""


# --------------------------------------------------------------------------- arguments

def add_arguments(p: argparse.ArgumentParser) -> None:
    from .presets import PRESETS

    named = ", ".join(n for n in PRESETS if n != "default")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, metavar="PATH|PRESET",
                   help=f"a local Hugging Face model folder (from_pretrained), or a preset with random weights "
                        f"({named}). Default: a small Qwen2-shaped model (hidden 256, 4 layers) with the "
                        f"embedded tokenizer's vocabulary")
    g.add_argument("--dataset", default=None, metavar="PATH",
                   help="a local .jsonl/.json/.parquet file or a save_to_disk folder with a 'text' field or "
                        "'prompt'/'response' fields. Default: the embedded dataset (standard-library "
                        "docstrings as instruction/answer pairs; no network)")
    g.add_argument("--text-field", default=None, help="field holding plain text (loss on every token)")
    g.add_argument("--prompt-field", default=None, help="field holding the prompt (no loss on it)")
    g.add_argument("--response-field", default=None, help="field holding the response (the loss)")
    g.add_argument("--max-len", type=int, default=256,
                   help="tokens per packed row; longer prompt/response examples are truncated, longer "
                        "text examples split (default: 256)")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step = rows x max-len (default: 4096 on GPU, 512 on CPU)")

    g = p.add_argument_group("training")
    steps = g.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="optimizer steps")
    steps.add_argument("--epochs", type=float, default=None,
                       help="passes over the data (default: 5 on GPU for the embedded data, else 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, linear warm-up then cosine decay (default: 1e-3 for random "
                        "weights, 2e-5 full / 2e-4 LoRA for a pretrained folder)")
    g.add_argument("--lora-r", type=int, default=None,
                   help="LoRA rank: train peft LoRA adapters on every linear projection (not lm_head) "
                        "with the LoRA+ optimizer instead of all weights")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    g.add_argument("--loraplus-ratio", type=float, default=16.0,
                   help="LoRA+: B matrices learn this many times faster than A (default: 16)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--memory-budget", type=float, default=None, metavar="FRACTION",
                   help="0..1: share of activations kept for backward; lower recomputes more and "
                        "saves memory (Inductor's activation_memory_budget; default: torch's)")
    g.add_argument("--no-compile", action="store_true",
                   help="eager baseline: no chronicals backend, no Inductor")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights and compute (default auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if present")
    g.add_argument("--seed", type=int, default=0, help="weights of presets, data order (default: 0)")

    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="chronicals-out",
                   help="where the model (or adapter) and tokenizer go, as OUTPUT_DIR/model, plus loss.png, "
                        "metrics.json and report.txt (default: ./chronicals-out)")
    g.add_argument("--save-every", type=int, default=0,
                   help="also save OUTPUT_DIR/model every N steps (atomically: an interrupted run keeps "
                        "the last complete save); default: only at the end")
    # Hidden: who compiles the rewritten graph (tests use aot_eager: Inductor is slow on CPU).
    g.add_argument("--compiler", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help=argparse.SUPPRESS)
    g.add_argument("--tokenizer-vocab", type=int, default=4096, help=argparse.SUPPRESS)


def _validate(args: argparse.Namespace) -> None:
    def positive(name: str, value, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")

    if args.max_len is None or args.max_len < 8:
        raise UsageError(f"--max-len must be at least 8, got {args.max_len}")
    for name in ("batch_tokens", "steps", "epochs", "lr", "lora_r", "lora_alpha", "loraplus_ratio", "max_grad_norm"):
        positive(name, getattr(args, name))
    if args.save_every < 0:
        raise UsageError(f"--save-every must be >= 0, got {args.save_every}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.lora_r is None and args.lora_alpha is not None:
        raise UsageError("--lora-alpha needs --lora-r")
    if args.memory_budget is not None and not 0.0 <= args.memory_budget <= 1.0:
        raise UsageError(f"--memory-budget must be from 0 to 1, got {args.memory_budget}")


# --------------------------------------------------------------------------- setup

def _device_and_dtype(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return device, dtype


def _load_model_source(args):
    """('preset', Preset) or ('folder', path). Checked before any slow work."""
    from .presets import PRESETS

    name = args.model or "default"
    if name in PRESETS:
        return "preset", name
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UsageError(f"model folder {name!r} has no config.json (not a Hugging Face model folder)")
        return "folder", name
    raise UsageError(
        f"model {name!r} is neither a local folder nor a preset ({', '.join(PRESETS)}); "
        "there is no model-hub download: give a local from_pretrained folder"
    )


def _load_folder_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise UsageError(f"model folder {path!r}: could not load its tokenizer ({type(err).__name__})") from err
    if tok.eos_token_id is None:
        raise UsageError(f"model folder {path!r}: the tokenizer has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out of loss and attention anyway
    return tok


def _load_data(args):
    """(raw dataset, Fields, description)."""
    from . import data

    if args.dataset is None:
        if args.text_field or args.prompt_field or args.response_field:
            raise UsageError("--text-field/--prompt-field/--response-field need --dataset")
        ds = data.default_dataset()
        return ds, data.resolve_fields(ds.column_names), "embedded: standard-library docstrings"
    ds = data.load_dataset_path(args.dataset)
    if len(ds) == 0:
        raise UsageError(f"dataset {args.dataset!r} is empty")
    fields = data.resolve_fields(ds.column_names, args.text_field, args.prompt_field, args.response_field)
    return ds, fields, args.dataset


def _lr_lambda(total: int):
    warmup = max(1, min(10, total // 10))

    def fn(step: int) -> float:  # step counts from 0 before the first optimizer step
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


# --------------------------------------------------------------------------- saving

@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C for the two renames that swap a checkpoint in; deliver it right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def save_atomic(dst: str, write) -> None:
    """``write(tmp_dir)`` into a fresh sibling folder, then swap it in for ``dst`` by renames.

    An interruption while writing leaves ``dst`` untouched (the temporary folder is removed); the
    swap itself (``dst`` -> ``dst.old``, ``tmp`` -> ``dst``) runs with Ctrl-C held back.
    """
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.abspath(dst))
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    with _sigint_deferred():
        if os.path.exists(dst):
            old = f"{tmp}.old"
            os.rename(dst, old)
        os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _clean_stale_temporaries(output_dir: str) -> None:
    """Temporary folders of a run killed outright (SIGKILL) while saving."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(".model.tmp-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


# --------------------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> int:
    _validate(args)
    source, model_name = _load_model_source(args)  # fail fast, before importing torch
    t_start = time.perf_counter()

    import torch

    from .. import compile as chronicals_compile
    from ..runtime import PackedDataset, PackingCollator, create_loraplus_optimizer, enable_packed_attention
    from . import data, metrics, presets

    _quiet_libraries()
    device, dtype = _device_and_dtype(args)
    on_gpu = device.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # ---- data and tokenizer
    try:
        raw, fields, data_desc = _load_data(args)
        if source == "folder":
            tokenizer = _load_folder_tokenizer(model_name)
        else:
            tokenizer = data.train_tokenizer(_tokenizer_sample(raw, fields, args.seed), args.tokenizer_vocab)
        tok = data.tokenize(raw, tokenizer, fields, args.max_len)
    except DataError as err:
        raise UsageError(str(err)) from err
    lengths = [len(x) for x in tok.dataset["input_ids"]]
    packed = PackedDataset(tok.dataset, args.max_len, overflow="split")
    n_packs = len(packed)
    rows = max(1, (args.batch_tokens or (4096 if on_gpu else 512)) // args.max_len)
    rows = min(rows, n_packs)
    steps_per_epoch = max(1, n_packs // rows)
    if args.steps is not None:
        total_steps = args.steps
    else:
        # The embedded default is sized for a 2-core CPU in a few minutes, compile included
        # (1 epoch = 192 steps of 2 x 256 tokens); a GPU does five epochs of 16 x 256 in seconds.
        epochs = args.epochs if args.epochs is not None else (5 if on_gpu and args.dataset is None else 1)
        total_steps = max(1, round(epochs * steps_per_epoch))

    # ---- model
    if source == "preset":
        preset = presets.PRESETS[model_name]
        vocab = preset.vocab or len(tokenizer)
        if len(tokenizer) > vocab:
            raise UsageError(f"tokenizer has {len(tokenizer)} tokens, more than preset {model_name}'s vocabulary {vocab}")
        model = presets.build_model(preset, vocab, dtype=dtype, device=device, seed=args.seed,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model_desc = f"preset {model_name} ({preset.family}, random weights)"
        pretrained = False
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, attn_implementation="sdpa")
        except Exception as err:
            raise UsageError(f"could not load model folder {model_name!r}: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
        model.to(device)
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}")
        model_desc = f"{model_name} ({model.config.model_type})"
        pretrained = True
    n_params = sum(p.numel() for p in model.parameters())
    model.config.use_cache = False
    if args.gradient_checkpointing:
        # transformers >= 5.2x renames it activation_checkpointing_enable (the old name warns).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    lr = args.lr if args.lr is not None else (
        1e-3 if not pretrained else (2e-4 if args.lora_r else 2e-5))
    fused = {"fused": True} if on_gpu else {}
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, ratio=args.loraplus_ratio,
                                              weight_decay=args.weight_decay, **fused)
        mode_desc = f"LoRA r={args.lora_r} alpha={lora.lora_alpha:g} on all linear projections, LoRA+ ratio {args.loraplus_ratio:g}"
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, **fused)
        mode_desc = "full fine-tuning"
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps))
    enable_packed_attention(model)
    model.train()
    if not args.no_compile:
        options = {} if args.compiler == "inductor" else {"compiler": args.compiler}
        if args.memory_budget is not None:
            options["memory_budget"] = args.memory_budget
        chronicals_compile(model, **options)

    collator = PackingCollator(pad_token_id=tokenizer.pad_token_id, bucket_multiple=args.max_len,
                               max_length=args.max_len)

    def collate(features):
        batch = collator(features)
        batch["max_length_q"] = batch["max_length_k"] = args.max_len  # static; bounds every segment
        docs = [len(d) for f in features for d in f["input_ids"] if len(d)]
        return batch, docs

    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(packed, batch_size=rows, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=generator)

    output_dir = args.output_dir
    model_dir = os.path.join(output_dir, "model")
    _clean_stale_temporaries(output_dir)
    setup_s = time.perf_counter() - t_start

    def save(step: int, complete: bool) -> None:
        state = {"step": step, "total_steps": total_steps, "complete": complete, "losses": losses,
                 "model": model_desc, "mode": mode_desc, "lora": bool(args.lora_r), "seed": args.seed}

        def write(tmp: str) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)

        save_atomic(model_dir, write)

    # ---- header
    print(f"chronicals finetune: {model_desc}, {metrics.human_count(n_params)} parameters "
          f"({metrics.human_count(n_trainable)} trainable), {mode_desc}")
    print(f"  data: {data_desc}: {len(lengths)} examples, {sum(lengths):,} tokens "
          f"({'loss on response tokens' if fields.supervised else 'loss on all tokens'}"
          f"{f', {tok.truncated} truncated to {args.max_len}' if tok.truncated else ''}); "
          f"BFD: {n_packs} rows of <= {args.max_len} tokens, {packed.report().efficiency:.1%} full")
    print(f"  {total_steps} steps of {rows} x {args.max_len} tokens, lr {lr:g}, {str(dtype).replace('torch.', '')} "
          f"on {_device_name(device)}, "
          f"{'eager (--no-compile)' if args.no_compile else 'backend chronicals' + ('' if args.compiler == 'inductor' else f' ({args.compiler})')}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    sys.stdout.flush()

    # ---- train
    from tqdm.auto import tqdm

    from ..report import collecting

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    grad_norms: list[float] = []
    step_times: list[float] = []
    step_tokens: list[int] = []
    contexts: list[float] = []
    report = None
    step = 0
    last_saved = None
    interrupted = False
    bar = tqdm(total=total_steps, desc="finetune", unit="step", dynamic_ncols=True, mininterval=0.5,
               file=sys.stderr)
    try:
        while step < total_steps:
            for batch, docs in loader:
                if step >= total_steps:
                    break
                t0 = time.perf_counter()
                batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
                if not args.no_compile:
                    torch._dynamo.maybe_mark_dynamic(batch["cu_seq_lens_q"], 0)
                    torch._dynamo.maybe_mark_dynamic(batch["cu_seq_lens_k"], 0)
                ctx = collecting() if step == 0 and not args.no_compile else contextlib.nullcontext()
                with ctx as collected:
                    out = model(**batch)
                    out.loss.backward()
                if step == 0:
                    report = collected
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                loss_v, gnorm_v = float(out.loss.detach()), float(gnorm)  # one sync per step
                if not math.isfinite(loss_v):
                    raise TrainingError(f"loss is {loss_v} at step {step + 1}: the run diverged "
                                        f"(try a lower --lr, or --dtype fp32)")
                if not math.isfinite(gnorm_v) or gnorm_v == 0.0:
                    what = "zero" if gnorm_v == 0.0 else str(gnorm_v)
                    raise TrainingError(
                        f"gradient norm is {what} at step {step + 1} (loss {loss_v:.4g}): "
                        + ("no trainable parameter received a gradient" if gnorm_v == 0.0 else
                           "the gradients overflowed (try a lower --lr, or --dtype fp32)"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if on_gpu:
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                step += 1
                losses.append(loss_v)
                grad_norms.append(gnorm_v)
                step_times.append(dt)
                step_tokens.append(sum(docs))
                contexts.append(metrics.packed_context(docs))
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{sum(docs) / dt:,.0f}", refresh=False)
                bar.update(1)
                if args.save_every and step % args.save_every == 0 and step < total_steps:
                    save(step, complete=False)
                    last_saved = step
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    os.makedirs(output_dir, exist_ok=True)
    plotted = bool(losses) and metrics.plot_loss(losses, os.path.join(output_dir, "loss.png"),
                                                 title=f"chronicals finetune: {model_desc}")
    if interrupted:
        where = f"{model_dir} (step {last_saved})" if last_saved else "none was saved in this run"
        print(f"\nchronicals: interrupted at step {step}/{total_steps}; last complete checkpoint: {where}",
              file=sys.stderr)
        return 130
    save(step, complete=True)

    # ---- summary
    steady = slice(1, None) if len(step_times) > 1 else slice(0, None)
    tokens_per_s = sum(step_tokens[steady]) / max(1e-9, sum(step_times[steady]))
    padded_per_s = rows * args.max_len * len(step_times[steady]) / max(1e-9, sum(step_times[steady]))
    context = sum(c * n for c, n in zip(contexts, step_tokens)) / max(1, sum(step_tokens))
    flops_tok = metrics.model_flops_per_token(model, context)
    peak = metrics.peak_bf16_flops(_device_name(device)) if on_gpu else None
    utilisation = metrics.mfu(flops_tok, tokens_per_s, peak)
    mem, mem_kind = metrics.peak_memory_bytes(device)
    tail = losses[-min(10, len(losses)):]
    final_loss = sum(tail) / len(tail)
    total_s = time.perf_counter() - t_start

    lines = [
        "",
        "chronicals finetune: done",
        f"  loss            {losses[0]:.4f} (step 1) -> {final_loss:.4f} (mean of the last {len(tail)} steps)",
        f"  gradient norm   healthy: finite and non-zero at every step "
        f"(min {min(grad_norms):.3g}, max {max(grad_norms):.3g}, last {grad_norms[-1]:.3g})",
        f"  throughput      {tokens_per_s:,.0f} real tokens/s ({padded_per_s:,.0f} incl. padding), "
        f"steps 2..{len(step_times)}" if len(step_times) > 1 else
        f"  throughput      {tokens_per_s:,.0f} real tokens/s (one step, compile included)",
        f"  first step      {step_times[0]:.2f} s" + ("" if args.no_compile else " (includes compilation)"),
        "  MFU             " + (
            f"{utilisation:.1%} = {flops_tok / 1e9:.3g} GFLOP/token x tokens/s / {peak / 1e12:.0f} TFLOP/s peak bf16 "
            "(FLOP/token = 6 x trained + 4 x frozen linear weights + 12 x layers x d_attn x context; see "
            "chronicals_compile/cli/metrics.py)" if utilisation is not None else
            ("n/a on CPU" if not on_gpu else f"n/a (peak FLOP/s of {_device_name(device)} unknown)")),
        f"  peak memory     {metrics.human_bytes(mem)} ({mem_kind})",
        f"  time            {total_s:.1f} s total, {setup_s:.1f} s setup, {sum(step_times):.1f} s training",
        f"  saved           {model_dir} ({'adapter' if args.lora_r else 'model'} + tokenizer), "
        + (f"{os.path.join(output_dir, 'loss.png')}, " if plotted else "no loss.png (matplotlib missing), ")
        + "metrics.json, report.txt",
    ]
    if args.no_compile:
        report_text = "chronicals: --no-compile: eager baseline, nothing compiled"
    else:
        report_text = str(report) if report is not None else "chronicals: no report"
    print("\n".join(lines))
    print()
    print(report_text)
    with open(os.path.join(output_dir, "report.txt"), "w") as f:
        f.write(report_text + "\n")
    summary = {
        "model": model_desc, "mode": mode_desc, "parameters": n_params, "trainable_parameters": n_trainable,
        "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""), "compiled": not args.no_compile,
        "steps": step, "rows": rows, "max_len": args.max_len, "lr": lr, "losses": losses, "grad_norms": grad_norms,
        "step_seconds": step_times, "real_tokens_per_step": step_tokens, "real_tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": padded_per_s, "flops_per_token": flops_tok, "attention_context": context,
        "mfu": utilisation, "peak_flops": peak, "peak_memory_bytes": mem, "peak_memory_kind": mem_kind,
        "total_seconds": total_s, "first_step_seconds": step_times[0],
        "swaps": report.swaps if report is not None else {},
    }
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


def _tokenizer_sample(raw, fields, seed: int, limit: int = 20000) -> list[str]:
    from .data import corpus_texts

    if len(raw) > limit:
        raw = raw.shuffle(seed=seed).select(range(limit))
    return corpus_texts(raw, fields)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _quiet_libraries() -> None:
    import warnings

    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
    # The explain report printed at the end already notes that logits are dropped.
    warnings.filterwarnings("ignore", message="chronicals: lm_head \\+ cross-entropy is fused")
