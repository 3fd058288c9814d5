"""Helpers for tests, demos and benchmarks: tiny models from configs (no hub, random weights)."""
from .models import FAMILIES, tiny_model, random_batch

__all__ = ["FAMILIES", "tiny_model", "random_batch"]
