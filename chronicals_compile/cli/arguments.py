"""The flags of ``chronicals finetune`` and their checks: every bad value is one clear line."""
from __future__ import annotations

import argparse

from ..config import CCE_MODES


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
    g.add_argument("--lora-dtype", choices=("fp32", "model"), default="fp32",
                   help="LoRA adapter weights: fp32 (peft's default for bf16/fp16 models: the adapter "
                        "GEMMs run in fp32) or the model's dtype (on an H200, LoRA r=32 at 8x2048 ran "
                        "136k tok/s against 89k with fp32 adapters)")
    g.add_argument("--loraplus-ratio", type=float, default=16.0,
                   help="LoRA+: B matrices learn this many times faster than A (default: 16)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default: 1.0)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--memory-budget", type=float, default=None, metavar="FRACTION",
                   help="0..1: share of activations kept for backward; lower recomputes more and "
                        "saves memory (Inductor's activation_memory_budget; default: torch's)")
    g.add_argument("--cce-mode", choices=CCE_MODES, default=None,
                   help="cut cross-entropy: fused (default: gradients in the forward, fastest), "
                        "recompute (logits recomputed in backward) or lean (the least memory: about "
                        "dh's size in fp32 beyond the gradients, at ~1.7x fused's time)")
    g.add_argument("--enable", nargs="+", default=[], metavar="PATTERN",
                   help="also swap these patterns where they are off by default (e.g. rms_norm swiglu "
                        "concat_linear on CUDA); `explain` lists them")
    g.add_argument("--disable", nargs="+", default=[], metavar="PATTERN",
                   help="leave these patterns to Inductor (e.g. linear_cross_entropy to get logits back)")
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


def validate(args: argparse.Namespace) -> None:
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
    from ..config import PATTERNS

    for flag in ("enable", "disable"):
        unknown = [name for name in getattr(args, flag) if name not in PATTERNS]
        if unknown:
            raise UsageError(f"--{flag}: unknown pattern(s) {', '.join(unknown)}; known: {', '.join(PATTERNS)}")
    both = sorted(set(args.enable) & set(args.disable))
    if both:
        raise UsageError(f"--enable and --disable both name {', '.join(both)}")
