"""Helpers for tests, demos and benchmarks: tiny models from configs (no hub, random weights)."""
from .models import ALL_PROJECTIONS, FAMILIES, random_batch, tiny_model, with_lora

__all__ = ["ALL_PROJECTIONS", "FAMILIES", "tiny_model", "random_batch", "with_lora"]
