"""Training runtime: LoRA+ parameter groups, BFD packing, packed batches, document-aware attention.

Nothing here imports Triton or the compiler backend; it works with plain
eager transformers models as well as compiled ones.
"""

from .attention import (
    ATTN_IMPLEMENTATION,
    chronicals_varlen_attention,
    enable_packed_attention,
    register_packed_attention,
    warn_if_cache_in_training,
)
from .checkpointing import enable_activation_checkpointing
from .collator import PackedDataset, PackingCollator
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .packing import PackingReport, Piece, pack_bfd, packing_report, split_into_pieces

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PackedDataset",
    "PackingCollator",
    "PackingReport",
    "Piece",
    "chronicals_varlen_attention",
    "create_loraplus_optimizer",
    "enable_activation_checkpointing",
    "enable_packed_attention",
    "loraplus_param_groups",
    "pack_bfd",
    "packing_report",
    "register_packed_attention",
    "split_into_pieces",
    "warn_if_cache_in_training",
]
