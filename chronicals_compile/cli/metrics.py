"""Throughput, MFU, memory and plots: shared by ``chronicals finetune`` and ``benchmarks/``.

MFU (model FLOPs utilisation) = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with

    model FLOPs per token = sum over linear weights W of k(W) * numel(W)  +  12 * L * d * S

* ``k = 6`` for a trained weight (2 forward, 2 for the input gradient, 2 for the weight
  gradient) and ``k = 4`` for a frozen one (LoRA's base weights need no weight gradient). The
  tied lm_head counts once, as a linear layer; embedding lookups are not FLOPs. For full
  fine-tuning this is the familiar ``6 * N``.
* ``12 * L * d * S``: attention scores and weighted values, forward and backward, per token, as
  PaLM (Chowdhery et al. 2022, appendix B) counts it: ``L`` layers, ``d`` = heads x head_dim,
  ``S`` the context a token attends over, *without* halving for causality. For unpacked rows
  ``S`` is the row length; for packed documents it is the token-weighted mean document length
  ``sum(n_i^2) / sum(n_i)``, the work a document-masked kernel actually has to do.

Tokens are real tokens (padding excluded) unless a caller says otherwise.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

#: Peak dense bf16 tensor-core FLOP/s (no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def linear_flops_per_token(model) -> float:
    """``sum k(W) * numel(W)`` over the model's ``nn.Linear`` weights (k = 6 trained, 4 frozen)."""
    import torch

    total = 0.0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += (6 if module.weight.requires_grad else 4) * module.weight.numel()
    return total


def attention_flops_per_token(layers: int, attn_dim: int, context: float) -> float:
    return 12.0 * layers * attn_dim * context


def packed_context(lengths: Iterable[int]) -> float:
    """Token-weighted mean document length: ``sum(n^2) / sum(n)``."""
    lengths = list(lengths)
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def model_flops_per_token(model, context: float) -> float:
    """Training FLOPs per token for ``model`` (plain or peft) at attention context ``context``."""
    config = _config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_dim = config.num_attention_heads * head_dim
    return linear_flops_per_token(model) + attention_flops_per_token(config.num_hidden_layers, attn_dim, context)


def _config(model):
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    return base.config


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    if not peak or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / peak


def peak_memory_bytes(device) -> tuple[int | None, str]:
    """(bytes, what was measured): ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS elsewhere."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss if sys.platform == "darwin" else rss * 1024), "peak process RSS"
    except Exception:  # pragma: no cover - non-POSIX
        return None, "unavailable"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window shrinks at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(losses: Sequence[float], path: str, title: str = "training loss") -> bool:
    """Write a loss-curve PNG (matplotlib, Agg backend). False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    steps = list(range(1, len(losses) + 1))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss per step")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        ax.plot(steps, smooth(losses, window), color="tab:blue", linewidth=2, label=f"moving mean ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
