"""Cut cross-entropy equivalence: loss, dh and dW of the Triton launchers against float64.

The references materialise the logits with torch's own ops, as transformers does:
``F.linear(h, W)`` in the input dtype, ``.float()``, the logit transform in fp32, then
``F.cross_entropy``; the float64 one does the same in float64. Both launch modes are covered:
``recompute`` (forward kernel, then the backward recomputing logit tiles) and ``fused``
(gradients computed during the forward, scaled by the incoming gradient afterwards).

Slack. The loss is compared with the plain dtype slack. dh is a reduction over the vocabulary
and dW over the tokens, and our rounding path differs from torch's while being no longer: torch
rounds the logits to the input dtype before the softmax; we keep them in fp32 (recompute) or round
them once when stored (fused, where the log-sum-exp still comes from the fp32 logits); both then
round G to the input dtype and run the same two fp32-accumulating GEMMs. So where torch's error
happens to vanish for one element ours need not, by the size of the same roundings: the gradients
get ``slack_scale = 2`` (twice the dtype's few-ulp slack). Measured with slack 1 over 250 random
interpreted cases the worst ratio was 0.89 (fp16 dW), 0.09 in fp32. A sqrt(K) scale would be
wrong here: mean-reduced gradients are O(1/N), and a large atol would make the check vacuous.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from .tolerance import Measurement, measure

NAME = "linear_cross_entropy"
IGNORE = ("none", "some", "all", "in_vocab")
GRAD_SLACK = 2.0
#: recompute: forward kernel + backward recomputing the logit tiles; fused: gradients in the
#: forward from tl.dot logit tiles; fused_matmul: the same from one GEMM's logits per row chunk.
#: recompute_vocab: the recompute backward walking vocabulary slices instead of row chunks;
#: recompute_lean: the same with slices no wider than the hidden size (``cce_mode="lean"``).
#: fused_quack: fused_matmul as the op runs it with QuACK's row kernel (``CHRONICALS_CCE_ROWS=quack``):
#: the row weight deferred to the scaling of the fp32 accumulators (where QuACK is missing, or for
#: label smoothing / soft-cap / logit scale, our row kernel writes the unweighted G instead).
MODES = ("recompute", "recompute_vocab", "recompute_lean", "fused", "fused_matmul", "fused_quack")
#: The recompute backward's layout for each recompute mode.
LAYOUT = {"recompute": "rows", "recompute_vocab": "vocab", "recompute_lean": "lean"}


def _default_dtypes():
    dtypes = [torch.float32, torch.float16]
    if torch.cuda.is_available():  # the interpreter's bf16 tl.dot is wrong; real GPUs get bf16
        dtypes.append(torch.bfloat16)
    return dtypes


def cases(max_tokens: int = 37, max_vocab: int = 300, max_hidden: int = 48, dtypes=None) -> st.SearchStrategy:
    hiddens = [d for d in (7, 16, 40, 48, 64, 896) if d <= max_hidden] or [max_hidden]
    return st.fixed_dictionaries({
        "tokens": st.integers(1, max_tokens),
        "hidden": st.sampled_from(hiddens),
        "vocab": st.integers(2, max_vocab),
        "dtype": st.sampled_from(list(dtypes or _default_dtypes())),
        "reduction": st.sampled_from(["mean", "sum"]),
        "ignore": st.sampled_from(IGNORE),
        "label_smoothing": st.sampled_from([0.0, 0.1]),
        "softcap": st.sampled_from([0.0, 3.0]),
        "scale": st.sampled_from([1.0, 0.5]),
        "mode": st.sampled_from(MODES),
        "tiles_per_group": st.sampled_from([None, 1, 3]),
        "chunk_rows": st.sampled_from([None, 7, 16]),
        "seed": st.integers(0, 2**31 - 1),
    })


def quick_cases() -> st.SearchStrategy:
    return cases(max_tokens=16, max_vocab=300, max_hidden=48)


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, ignore: str, seed: int,
                device: str = "cpu"):
    # drawn where they live: a [256000, 2304] weight takes seconds to draw on a CPU
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen, device=device)
    # logits of a few units: the softmax is neither flat nor one-hot
    w = torch.randn(vocab, hidden, generator=gen, device=device) * (2.0 / math.sqrt(hidden))
    target = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    ignore_index = -100
    if ignore == "some":
        target[torch.rand(tokens, generator=gen, device=device) < 0.3] = -100
    elif ignore == "all":
        target[:] = -100
    elif ignore == "in_vocab":  # an ignore_index that is also a class id
        ignore_index = int(target[0])
    return h.to(dtype), w.to(dtype), target, ignore_index


def torch_loss(h, w, target, ignore_index, reduction, label_smoothing, softcap, scale, grad=1.0):
    """Materialised logits, the transformers way, in ``h.dtype`` (float64 for the reference)."""
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    z = F.linear(h, w)
    if z.dtype != torch.float64:
        z = z.float()
    if scale != 1.0:
        z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    dh, dw = torch.autograd.grad(loss * grad, (h, w))
    return loss.detach(), dh, dw


def ours(h, w, target, ignore_index, reduction, label_smoothing, softcap, scale, mode, grad, tiles):
    from ..kernels import linear_cross_entropy as k

    args = (ignore_index, reduction, label_smoothing, softcap, scale)
    if mode == "fused_quack":
        loss, dh, dw, grad_scale = k.fused(h, w, target, *args, tiles=tiles, logits="matmul", rows="quack",
                                           keep_fp32=True, defer_weight=True)
        g = torch.tensor(grad, dtype=torch.float32, device=h.device) * grad_scale
        return loss, (dh * g).to(h.dtype), (dw * g).to(w.dtype)
    if mode in ("fused", "fused_matmul"):
        loss, dh, dw = k.fused(h, w, target, *args, tiles=tiles, rows="triton",  # our row kernel; QuACK's: fused_quack
                               logits="matmul" if mode == "fused_matmul" else "tiles")
        g = torch.tensor(grad, dtype=torch.float32, device=h.device)
        return loss, (dh.float() * g).to(dh.dtype), (dw.float() * g).to(dw.dtype)
    loss, lse = k.forward(h, w, target, *args, tiles=tiles)
    dh, dw = k.backward(torch.tensor(grad, device=h.device), h, w, target, lse, *args, tiles=tiles,
                        layout=LAYOUT[mode])
    return loss, dh, dw


def check(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, reduction: str = "mean",
          ignore: str = "some", label_smoothing: float = 0.0, softcap: float = 0.0, scale: float = 1.0,
          mode: str = "recompute", tiles_per_group: int | None = None, chunk_rows: int | None = None,
          seed: int = 0, device: str = "cpu", tiles=None, dw_rows: int | None = None) -> list[Measurement]:
    """``dw_rows``: compare only that many vocabulary rows of dW (every target row plus random
    others) - at real shapes dW is up to 590M elements and the comparison runs in float64 on the
    host; dh and the loss are always compared whole."""
    import dataclasses

    from ..kernels.linear_cross_entropy import default_tiles

    h, w, target, ignore_index = make_inputs(tokens, hidden, vocab, dtype, ignore, seed, device)
    tiles = tiles or default_tiles(dtype, torch.device(device))
    # chunk_rows also sizes the vocab layout's slices, so that small cases cross slice boundaries
    # (the lean layout keeps its own sizing: hidden-wide slices, which small cases cross too)
    tiles = dataclasses.replace(tiles, tiles_per_group=tiles_per_group, chunk_rows=chunk_rows,
                                vocab_cols=None if chunk_rows is None or mode == "recompute_lean"
                                else 3 * chunk_rows + 1)
    grad = 0.75
    opts = (ignore_index, reduction, label_smoothing, softcap, scale)
    got = ours(h, w, target, *opts, mode, grad, tiles)
    ref = torch_loss(h.double(), w.double(), target, *opts, grad=grad)
    same = torch_loss(h, w, target, *opts, grad=grad)
    tag = f"{NAME}[{mode}]"
    if dw_rows is not None and dw_rows < vocab:
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        pick = torch.randperm(vocab, generator=gen, device=device)[:dw_rows]
        pick = torch.unique(torch.cat([pick, target[(target >= 0) & (target < vocab)]]))
        got = (got[0], got[1], got[2][pick])
        ref = (ref[0], ref[1], ref[2][pick])
        same = (same[0], same[1], same[2][pick])
    return [
        measure(f"{tag}.loss", got[0], same[0], ref[0], dtype=dtype),
        measure(f"{tag}.dh", got[1], same[1], ref[1], dtype=dtype, slack_scale=GRAD_SLACK),
        measure(f"{tag}.dw", got[2], same[2], ref[2], dtype=dtype, slack_scale=GRAD_SLACK),
    ]
