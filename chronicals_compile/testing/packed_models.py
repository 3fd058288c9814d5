"""Tiny random causal LMs with packed-document attention, and random documents: the runtime tests'
fixtures (no hub access needed)."""

from __future__ import annotations

import torch

from chronicals_compile.runtime import enable_packed_attention

from .models import FAMILIES, tiny_model as _base_model

VOCAB = 128
__all__ = ["FAMILIES", "VOCAB", "tiny_model", "random_docs", "doc_spans"]


def tiny_model(family: str, *, packed: bool = True, seed: int = 0, **overrides) -> torch.nn.Module:
    """hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), vocab 128, fp32, random weights, in train
    mode, with packed-document attention (or stock sdpa with ``packed=False``)."""
    if family == "mistral":
        overrides.setdefault("sliding_window", None)
    overrides.setdefault("max_position_embeddings", 1024)
    model = _base_model(family, vocab=VOCAB, intermediate=overrides.pop("intermediate_size", 128), seed=seed,
                        **overrides)
    # Random init gives tiny logits; a larger lm_head makes losses and their gradients less uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    if packed:
        enable_packed_attention(model)
    else:
        model.set_attn_implementation("sdpa")
    return model.train()


def random_docs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def doc_spans(batch: dict) -> list[tuple[int, int, int]]:
    """(row, start, end) of every non-padding segment, from the collator's cu_seq_lens and labels."""
    cu = batch["cu_seq_lens_q"].tolist()
    width = batch["input_ids"].shape[1]
    spans = []
    for a, b in zip(cu[:-1], cu[1:]):
        row, start = divmod(a, width)
        spans.append((row, start, start + (b - a)))
    return spans
