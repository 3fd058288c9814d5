"""LoRA+ parameter groups: B learns ``ratio`` times faster than A.

LoRA+ (Hayou et al., 2024, arXiv:2402.12354) shows that with B initialised at
zero, equal learning rates for A and B are inefficient at width; B should move
faster. The groups are found from peft's layer structure (``LoraLayer.lora_A``,
``lora_B``, ``lora_embedding_A/B``, ``lora_magnitude_vector``), never from
parameter-name patterns, so renamed adapters or odd module paths cannot land
in the wrong group.

Where this differs from ``peft.optimizers.create_loraplus_optimizer`` (0.21),
and why:

* peft gives every 1-D trainable parameter the B rate (``lr * ratio``): biases
  of ``modules_to_save`` copies, trainable norms and DoRA magnitudes. Those are
  not LoRA B factors; here they keep the base rate.
* peft's weight-decay exclusion only knows ``nn.LayerNorm``; transformers' RMSNorm
  classes (``LlamaRMSNorm``...) are their own types. Here no decay goes to biases,
  to parameters of any module whose class name contains ``Norm``, or to any
  other 1-D parameter (DoRA magnitudes, scales).
* peft defaults the embedding-adapter rate to an absolute 1e-6; here
  ``embedding_lr=None`` means the base ``lr``, which scales with the user's choice.

For LoRA on linears and embeddings (with or without ``lora_bias``) and for 2-D
``modules_to_save`` weights the per-parameter (lr, weight_decay) assignment is
identical to peft's; ``tests/runtime/test_loraplus.py`` checks that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["loraplus_param_groups", "create_loraplus_optimizer"]


def _lora_roles(model: nn.Module) -> dict[int, str]:
    """id(param) -> 'A' | 'B' | 'embedding' | 'magnitude' for every peft LoRA factor."""
    from peft.tuners.lora import LoraLayer

    roles: dict[int, str] = {}

    def params(container: Any) -> Iterator[nn.Parameter]:
        if isinstance(container, nn.ParameterDict):
            yield from container.values()
        elif isinstance(container, nn.Module):
            yield from container.parameters()

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for attr, role in (
            ("lora_A", "A"),
            ("lora_B", "B"),
            ("lora_embedding_A", "embedding"),
            ("lora_embedding_B", "embedding"),
            ("lora_magnitude_vector", "magnitude"),
        ):
            for p in params(getattr(module, attr, None)):
                roles.setdefault(id(p), role)
    return roles


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        norm_types = (*norm_types, rms)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _owned_params(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """(full name, owning module, local name, param), each shared parameter once."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield (f"{mod_name}.{local}" if mod_name else local), module, local, p


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over the trainable parameters of a peft model.

    Groups (empty ones omitted; each carries a ``"name"`` for logging):
    ``lora_A`` (lr), ``lora_B`` (lr * ratio), ``lora_B_no_decay`` (lora_bias
    biases, lr * ratio), ``lora_embedding`` (embedding adapters A and B,
    ``embedding_lr``), ``base`` / ``base_no_decay`` (every other trainable
    parameter: modules_to_save, trainable norms, DoRA magnitudes, at lr).
    Frozen parameters never appear.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    roles = _lora_roles(model)
    if not roles:
        raise ValueError(
            "no peft LoRA layers found in the model; LoRA+ needs LoRA adapters (peft.get_peft_model with LoraConfig)"
        )
    emb_lr = lr if embedding_lr is None else embedding_lr
    specs = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "lora_B_no_decay": (lr * ratio, 0.0),
        "lora_embedding": (emb_lr, weight_decay),
        "base": (lr, weight_decay),
        "base_no_decay": (lr, 0.0),
    }
    members: dict[str, list[nn.Parameter]] = {k: [] for k in specs}
    for _, module, local, p in _owned_params(model):
        if not p.requires_grad:
            continue
        no_decay = local == "bias" or p.ndim < 2 or _is_norm(module)
        role = roles.get(id(p))
        if role == "A":
            key = "lora_A"
        elif role == "B":
            key = "lora_B_no_decay" if no_decay else "lora_B"
        elif role == "embedding":
            key = "lora_embedding"
        else:  # DoRA magnitudes, modules_to_save, trainable norms, anything else trainable
            key = "base_no_decay" if no_decay or role == "magnitude" else "base"
        members[key].append(p)
    return [
        {"params": members[k], "lr": specs[k][0], "weight_decay": specs[k][1], "name": k}
        for k in specs
        if members[k]
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    ratio: float = 16.0,
    embedding_lr: float | None = None,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over ``loraplus_param_groups``; extra kwargs (``fused=True``, betas...) go to it.

    Hand it to HF Trainer as ``optimizers=(optimizer, None)``: Trainer's
    scheduler scales every group's own lr, so the B/A ratio is kept.
    """
    groups = loraplus_param_groups(model, lr, ratio=ratio, embedding_lr=embedding_lr, weight_decay=weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
