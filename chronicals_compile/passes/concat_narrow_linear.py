"""Linears narrower than their shared input become one GEMM; wider ones stay apart.

Why: under grouped-query attention the k and v projections are narrow (128 output features of
Qwen2.5-0.5B's 896, 512 of Llama-3.2-1B's 2048), and a GEMM that narrow is wave-quantised: in
the Qwen0.5B 8 x 2048 step their forward, input-gradient and weight-gradient GEMMs ran at 205-285
TFLOP/s against 550-700 for the rest (H100, benchmarks/results/2026-12-06-h100-session19/call1,
2.3 ms a step for 5% of the FLOPs). Fused in pairs they read the input once and double each GEMM's
narrow side. q, as wide as its input, already runs near peak and keeps its own GEMM, so the pieces
to gather stay small: fusing q/k/v whole (``concat_linear``) was no faster in the step.

Off by default: in that step it was within the spread (+0.6% and -1.0% in two runs on one H100,
benchmarks/results/2026-12-06-h100-session21).

How: ``concat_linear``'s matcher and rewrite, keeping only linears whose output is narrower than
their input; everything that pass leaves alone (mixed dtypes, frozen beside trainable, views a
column slice does not allow) this one leaves alone too. It runs after ``concat_linear``: with both on,
what that pass fused is no longer a linear here, and a group it refused may still lose its
narrow members to this one.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from . import concat_linear
from .graph_utils import arg, meta

NAME = "concat_narrow_linear"
is_anchor = concat_linear.is_anchor


def _narrow(linear: fx.Node, x: torch.Tensor) -> bool:
    return meta(arg(linear, 1, "weight")).shape[0] < x.shape[-1]


def match(node: fx.Node, ctx=None):
    return concat_linear.match(node, ctx, keep=_narrow)


def rewrite(gm: fx.GraphModule, found, ctx) -> fx.Node:
    return concat_linear.rewrite(gm, found, ctx, name=NAME)
