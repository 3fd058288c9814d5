"""Activation checkpointing across transformers releases.

Why: transformers >= 5.2x renamed ``gradient_checkpointing_enable`` to
``activation_checkpointing_enable`` and the old name now warns (it goes in v6). The CLI, the
benchmarks and the tests all turn it on; this keeps one spelling that works on both sides of the
rename, always with the non-reentrant checkpoint (the reentrant one cannot be traced by Dynamo).
"""
from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any) -> None:
    """Turn on non-reentrant activation checkpointing under whichever name ``model`` offers."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TypeError(f"{type(model).__name__} supports no activation checkpointing "
                        "(neither activation_checkpointing_enable nor gradient_checkpointing_enable)")
