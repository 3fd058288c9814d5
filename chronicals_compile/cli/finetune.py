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
import sys
import time

from .arguments import TrainingError, UsageError, validate
from .checkpoint import clean_stale_temporaries, save_atomic
from .data import DataError

IGNORE_INDEX = -100


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


# --------------------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> int:
    validate(args)
    source, model_name = _load_model_source(args)  # fail fast, before importing torch
    t_start = time.perf_counter()

    import torch

    from .distributed import init_world

    _quiet_libraries()
    device, dtype = _device_and_dtype(args)
    on_gpu = device.type == "cuda"
    world = init_world(on_gpu)
    if world.distributed and on_gpu:
        device = torch.device("cuda", world.local_rank)
    try:
        return _run(args, source, model_name, t_start, device, dtype, world)
    finally:
        world.close()


def _run(args: argparse.Namespace, source: str, model_name: str, t_start: float, device, dtype,
         world) -> int:
    """The run proper, on one rank (``world``: torchrun's process group, or a single process)."""
    import torch

    from .distributed import wrap
    from .. import compile as chronicals_compile
    from ..runtime import (PackedDataset, PackingCollator, create_loraplus_optimizer, enable_activation_checkpointing,
                           enable_packed_attention)
    from . import data, metrics, presets

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
    steps_per_epoch = max(1, n_packs // (rows * world.size))
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
        enable_activation_checkpointing(model)

    lr = args.lr if args.lr is not None else (
        1e-3 if not pretrained else (2e-4 if args.lora_r else 2e-5))
    fused = {"fused": True} if on_gpu else {}
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=args.lora_dtype == "fp32")
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, ratio=args.loraplus_ratio,
                                              weight_decay=args.weight_decay, **fused)
        adapter_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_A" in n)
        mode_desc = (f"LoRA r={args.lora_r} alpha={lora.lora_alpha:g} on all linear projections "
                     f"(adapters {str(adapter_dtype).replace('torch.', '')}), LoRA+ ratio {args.loraplus_ratio:g}")
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
        if args.cce_mode is not None:
            options["cce_mode"] = args.cce_mode
        if args.enable:
            options["enable"] = list(args.enable)
        if args.disable:
            options["disable"] = list(args.disable)
        chronicals_compile(model, **options)
    train_model = wrap(model, world, device)  # DDP under torchrun: compiled in place, then wrapped

    collator = PackingCollator(pad_token_id=tokenizer.pad_token_id, bucket_multiple=args.max_len,
                               max_length=args.max_len)

    def collate(features):
        batch = collator(features)
        batch["max_length_q"] = batch["max_length_k"] = args.max_len  # static; bounds every segment
        docs = [len(d) for f in features for d in f["input_ids"] if len(d)]
        return batch, docs

    generator = torch.Generator().manual_seed(args.seed)
    sampler = None
    if world.distributed:  # each rank its own rows; the same shuffle order on every rank
        sampler = torch.utils.data.DistributedSampler(packed, num_replicas=world.size, rank=world.rank,
                                                      shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(packed, batch_size=rows, shuffle=sampler is None, sampler=sampler,
                                         drop_last=True, collate_fn=collate, generator=generator)

    output_dir = args.output_dir
    model_dir = os.path.join(output_dir, "model")
    if world.main:
        clean_stale_temporaries(output_dir)
    setup_s = time.perf_counter() - t_start

    def save(step: int, complete: bool) -> None:
        if not world.main:
            return
        state = {"step": step, "total_steps": total_steps, "complete": complete, "losses": losses,
                 "model": model_desc, "mode": mode_desc, "lora": bool(args.lora_r), "seed": args.seed}

        def write(tmp: str) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)

        save_atomic(model_dir, write)

    # ---- header
    say = print if world.main else (lambda *a, **k: None)
    say(f"chronicals finetune: {model_desc}, {metrics.human_count(n_params)} parameters "
          f"({metrics.human_count(n_trainable)} trainable), {mode_desc}")
    say(f"  data: {data_desc}: {len(lengths)} examples, {sum(lengths):,} tokens "
          f"({'loss on response tokens' if fields.supervised else 'loss on all tokens'}"
          f"{f', {tok.truncated} truncated to {args.max_len}' if tok.truncated else ''}); "
          f"BFD: {n_packs} rows of <= {args.max_len} tokens, {packed.report().efficiency:.1%} full")
    say(f"  {total_steps} steps of {rows} x {args.max_len} tokens{f' per rank, {world.size} ranks (DDP)' if world.distributed else ''}, lr {lr:g}, {str(dtype).replace('torch.', '')} "
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
               file=sys.stderr, disable=not world.main)
    epoch = 0
    try:
        while step < total_steps:
            if sampler is not None:
                sampler.set_epoch(epoch)
            epoch += 1
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
                    out = train_model(**batch)
                    out.loss.backward()
                if step == 0:
                    report = collected
                gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
                # one sync per step (under DDP: one all-reduce of the loss and the real tokens)
                loss_sum, tokens_v = world.sum([float(out.loss.detach()), float(sum(docs))], device)
                loss_v, gnorm_v = loss_sum / world.size, float(gnorm)
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
                step_tokens.append(int(tokens_v))
                contexts.append(metrics.packed_context(docs))
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens_v / dt:,.0f}", refresh=False)
                bar.update(1)
                if args.save_every and step % args.save_every == 0 and step < total_steps:
                    save(step, complete=False)
                    last_saved = step
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    if not world.main:  # rank 0 saves and reports; the figures it prints are already global
        return 130 if interrupted else 0
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
    padded_per_s = world.size * rows * args.max_len * len(step_times[steady]) / max(1e-9, sum(step_times[steady]))
    ranks = f" over {world.size} ranks" if world.distributed else ""
    context = sum(c * n for c, n in zip(contexts, step_tokens)) / max(1, sum(step_tokens))
    flops_tok = metrics.model_flops_per_token(model, context)
    peak = metrics.peak_bf16_flops(_device_name(device)) if on_gpu else None
    peak = peak * world.size if peak else peak  # tokens/s are summed over the ranks
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
        f"  throughput      {tokens_per_s:,.0f} real tokens/s{ranks} ({padded_per_s:,.0f} incl. padding), "
        f"steps 2..{len(step_times)}" if len(step_times) > 1 else
        f"  throughput      {tokens_per_s:,.0f} real tokens/s{ranks} (one step, compile included)",
        f"  first step      {step_times[0]:.2f} s" + ("" if args.no_compile else " (includes compilation)"),
        "  MFU             " + (
            f"{utilisation:.1%} = {flops_tok / 1e9:.3g} GFLOP/token x tokens/s / {peak / 1e12:.0f} TFLOP/s peak bf16 "
            "(FLOP/token = 6 x trained + 4 x frozen linear weights + 12 x layers x d_attn x context; see "
            "chronicals_compile/cli/metrics.py)" if utilisation is not None else
            ("n/a on CPU" if not on_gpu else f"n/a (peak FLOP/s of {_device_name(device)} unknown)")),
        f"  peak memory     {metrics.human_bytes(mem)} ({mem_kind}{', rank 0' if world.distributed else ''})",
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
        "total_seconds": total_s, "first_step_seconds": step_times[0], "world_size": world.size,
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
