"""``chronicals::linear_cross_entropy*``: lm_head + cross-entropy without materialised logits.

Semantics, for ``h [N, d]``, ``weight [V, d]`` (same dtype), ``target [N]`` int64::

    raw = h @ weight.T                                  # fp32 accumulation, never stored N x V
    z = scale * raw;  z = softcap * tanh(z / softcap)   # each only when set (scale 1, softcap 0 = off)
    loss = F.cross_entropy(z.float(), target, ignore_index=, reduction=, label_smoothing=)

``reduction`` is ``mean`` or ``sum``; the loss is fp32 and 0-dim (all rows ignored: NaN for mean,
0 for sum, zero gradients, exactly like torch). A target outside ``[0, V)`` that is not
``ignore_index`` gives a NaN loss (torch raises; we cannot without a host sync).

Three ops:

``linear_cross_entropy(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale)
-> (loss, lse)``
    Forward only; ``lse [N]`` (fp32) is saved for the backward op. Differentiable (``lse`` is not).
``linear_cross_entropy_backward(grad, h, weight, target, lse, ..., need_dh, need_dw) -> (dh, dw)``
    Recomputes the logit tiles. A gradient not needed comes back as an empty ``[0]`` tensor.
    ``layout`` (both ops; the forward hands it to its backward) picks how CUDA walks the gradient:
    ``""`` the launchers' default, ``rows``, ``vocab`` or ``lean`` (the least memory: see
    ``kernels.linear_cross_entropy.BACKWARD_LAYOUT``).
``linear_cross_entropy_fused(h, weight, target, ..., need_dh, need_dw) -> (loss, dh, dw, grad_scale)``
    Computes the gradients during the forward (the logits are computed once); differentiable in
    ``loss``, whose backward only scales dh and dw by the incoming gradient times ``grad_scale``.
    dh and dw are the fp32 accumulators (fp64 for fp64 inputs), rounded once, after the scaling;
    ``grad_scale`` is 1 where the row weight was applied per logit, 1 / valid rows for a mean
    where QuACK's row kernel (which applies none) wrote the gradient.

CUDA runs the Triton launchers of ``kernels.linear_cross_entropy``; other devices run the chunked
torch reference below (row chunks of at most ``_CPU_CHUNK_ELEMENTS`` logits, so CPU evaluation is
memory-light too), which is also the specification.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

#: Logits held at once by the CPU reference (fp32 elements).
_CPU_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, v: int):
    rows = max(1, _CPU_CHUNK_ELEMENTS // max(v, 1))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _logits(hc: Tensor, wf: Tensor, softcap: float, scale: float) -> Tensor:
    z = hc.to(wf.dtype) @ wf.t()
    if scale != 1.0:
        z = z * scale
    if softcap != 0.0:
        z = softcap * torch.tanh(z / softcap)
    return z


def reference_forward(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str,
                      label_smoothing: float, softcap: float, scale: float) -> tuple[Tensor, Tensor]:
    acc = _acc_dtype(h)
    n, v = h.shape[0], weight.shape[0]
    wf = weight.to(acc)
    row_loss = torch.zeros((n,), dtype=acc, device=h.device)
    lse = torch.empty((n,), dtype=acc, device=h.device)
    valid = target != ignore_index
    for r0, r1 in _chunks(n, v):
        z = _logits(h[r0:r1], wf, softcap, scale)
        t = target[r0:r1]
        lse_c = torch.logsumexp(z, dim=-1)
        in_range = (t >= 0) & (t < v)
        zt = z.gather(1, t.clamp(0, max(v - 1, 0)).unsqueeze(1)).squeeze(1)
        zt = torch.where(in_range, zt, torch.full_like(zt, float("nan")))
        loss = lse_c - (1.0 - label_smoothing) * zt
        if label_smoothing:
            loss = loss - (label_smoothing / v) * z.sum(-1)
        row_loss[r0:r1] = torch.where(valid[r0:r1], loss, torch.zeros_like(loss))
        lse[r0:r1] = lse_c
    total = row_loss.sum()
    if reduction == "mean":
        total = total / valid.sum()
    return total, lse


def reference_backward(grad: Tensor, h: Tensor, weight: Tensor, target: Tensor, lse: Tensor,
                       ignore_index: int, reduction: str, label_smoothing: float, softcap: float,
                       scale: float, need_dh: bool, need_dw: bool,
                       acc_outputs: bool = False) -> tuple[Tensor, Tensor]:
    """``acc_outputs``: dh and dW in the accumulation dtype (the fused op's outputs), else rounded
    to the inputs' dtypes."""
    acc = _acc_dtype(h)
    n, v = h.shape[0], weight.shape[0]
    wf = weight.to(acc)
    valid = target != ignore_index
    g = grad.detach().to(acc).reshape(())
    if reduction == "mean":
        g = g / valid.sum()
    row_w = torch.where(valid, g.expand(n), torch.zeros((), dtype=acc, device=h.device))
    dh_dtype, dw_dtype = (acc, acc) if acc_outputs else (h.dtype, weight.dtype)
    dh = torch.empty(h.shape, dtype=dh_dtype, device=h.device) if need_dh else h.new_empty((0,), dtype=dh_dtype)
    dw = torch.zeros((v, weight.shape[1]), dtype=acc, device=h.device) if need_dw else None
    for r0, r1 in _chunks(n, v):
        hc = h[r0:r1].to(acc)
        z = _logits(hc, wf, softcap, scale)
        t = target[r0:r1]
        gz = torch.exp(z - lse[r0:r1].to(acc).unsqueeze(1))
        hit = (torch.arange(v, device=h.device).unsqueeze(0) == t.unsqueeze(1))
        gz = gz - (1.0 - label_smoothing) * hit.to(acc)
        if label_smoothing:
            gz = gz - label_smoothing / v
        gz = gz * row_w[r0:r1].unsqueeze(1)
        if softcap != 0.0:
            gz = gz * (1.0 - (z / softcap) ** 2)
        if scale != 1.0:
            gz = gz * scale
        if need_dh:
            dh[r0:r1] = (gz @ wf).to(dh_dtype)
        if need_dw:
            dw.addmm_(gz.t(), hc)
    dw = dw.to(dw_dtype) if need_dw else weight.new_empty((0,), dtype=dw_dtype)
    return dh, dw


def _check_args(h: Tensor, weight: Tensor, target: Tensor, reduction: str) -> None:
    torch._check(h.dim() == 2 and weight.dim() == 2, lambda: "h must be [N, d] and weight [V, d]")
    torch._check(h.shape[1] == weight.shape[1], lambda: "h and weight disagree on the hidden size")
    torch._check(h.dtype == weight.dtype, lambda: f"h is {h.dtype} but weight is {weight.dtype}")
    torch._check(target.dim() == 1 and target.shape[0] == h.shape[0], lambda: "target must be [N]")
    torch._check(target.dtype == torch.int64, lambda: "target must be int64")
    torch._check(reduction in ("mean", "sum"), lambda: f"reduction {reduction!r} not supported")


#: ``layout`` values of the forward and backward ops ("" = the launchers' default).
LAYOUTS = ("", "rows", "vocab", "lean")


def _check_layout(layout: str) -> None:
    torch._check(layout in LAYOUTS, lambda: f"layout must be one of {LAYOUTS}, got {layout!r}")


def _tiles(h: Tensor, chunk_rows: int):
    """The launchers' default tiles, with ``chunk_rows`` rows per gradient chunk when it is set
    (``chronicals.cce_chunk_rows``; 0 = the launchers' own sizing). The CPU reference ignores it."""
    if not chunk_rows:
        return None
    from ..kernels import linear_cross_entropy as k

    return dataclasses.replace(k.default_tiles(h.dtype, h.device), chunk_rows=int(chunk_rows))


def _lse_dtype(h: Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# forward op (+ recomputing backward op)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("chronicals::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str,
                         label_smoothing: float, softcap: float, scale: float,
                         chunk_rows: int = 0, layout: str = "") -> tuple[Tensor, Tensor]:
    _check_args(h, weight, target, reduction)
    _check_layout(layout)
    loss, lse = reference_forward(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale)
    return loss.to(_lse_dtype(h)), lse.to(_lse_dtype(h))


@linear_cross_entropy.register_kernel("cuda")
def _linear_cross_entropy_cuda(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale,
                               chunk_rows=0, layout=""):
    from ..kernels import linear_cross_entropy as k

    _check_args(h, weight, target, reduction)
    _check_layout(layout)
    return k.forward(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale)


@linear_cross_entropy.register_fake
def _(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale, chunk_rows=0, layout=""):
    _check_args(h, weight, target, reduction)
    _check_layout(layout)
    dtype = _lse_dtype(h)
    return h.new_empty((), dtype=dtype), h.new_empty((h.shape[0],), dtype=dtype)


@torch.library.custom_op("chronicals::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: Tensor, h: Tensor, weight: Tensor, target: Tensor, lse: Tensor,
                                  ignore_index: int, reduction: str, label_smoothing: float,
                                  softcap: float, scale: float, need_dh: bool,
                                  need_dw: bool, chunk_rows: int = 0, layout: str = "") -> tuple[Tensor, Tensor]:
    _check_layout(layout)
    return reference_backward(grad, h, weight, target, lse, ignore_index, reduction, label_smoothing,
                              softcap, scale, need_dh, need_dw)


@linear_cross_entropy_backward.register_kernel("cuda")
def _linear_cross_entropy_backward_cuda(grad, h, weight, target, lse, ignore_index, reduction,
                                        label_smoothing, softcap, scale, need_dh, need_dw, chunk_rows=0,
                                        layout=""):
    from ..kernels import linear_cross_entropy as k

    return k.backward(grad, h, weight, target, lse, ignore_index, reduction, label_smoothing,
                      softcap, scale, need_dh, need_dw, tiles=_tiles(h, chunk_rows), layout=layout or None)


@linear_cross_entropy_backward.register_fake
def _(grad, h, weight, target, lse, ignore_index, reduction, label_smoothing, softcap, scale,
      need_dh, need_dw, chunk_rows=0, layout=""):
    _check_layout(layout)
    return (h.new_empty(h.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale, *rest = inputs
    _, lse = output
    ctx.save_for_backward(h, weight, target, lse)
    ctx.args = (ignore_index, reduction, label_smoothing, softcap, scale)
    ctx.chunk_rows = rest[0] if rest else 0
    ctx.layout = rest[1] if len(rest) > 1 else ""
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss: Tensor, _grad_lse: Tensor):
    h, weight, target, lse = ctx.saved_tensors
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dh or need_dw):
        return (None,) * 10
    dh, dw = linear_cross_entropy_backward(grad_loss, h, weight, target, lse, *ctx.args, need_dh, need_dw,
                                           ctx.chunk_rows, ctx.layout)
    return (dh if need_dh else None, dw if need_dw else None) + (None,) * 8


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# gradient-in-forward op
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("chronicals::linear_cross_entropy_fused", mutates_args=())
def linear_cross_entropy_fused(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int,
                               reduction: str, label_smoothing: float, softcap: float, scale: float,
                               need_dh: bool, need_dw: bool,
                               chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dh, dw, grad_scale)``: ``grad_scale * dh`` and ``grad_scale * dw`` are the loss's
    gradients for an incoming gradient of 1; dh and dW are in the accumulation dtype (fp32 for half
    inputs, as the loss), ``grad_scale`` is 0-dim in it. Where the row weight is applied per logit
    (this reference, our Triton row kernels) it is 1; where QuACK's row kernel wrote the gradient
    (no weight: dh and dW are the row losses' sum's) it is 1 / valid rows for a mean (0 if none).
    The backward multiplies it in with the incoming gradient and rounds once, to the inputs' dtypes."""
    _check_args(h, weight, target, reduction)
    loss, lse = reference_forward(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale)
    acc = _acc_dtype(h)
    dh, dw = reference_backward(torch.ones((), dtype=acc), h, weight, target, lse, ignore_index,
                                reduction, label_smoothing, softcap, scale, need_dh, need_dw, acc_outputs=True)
    return loss.to(_lse_dtype(h)), dh, dw, torch.ones((), dtype=acc, device=h.device)


@linear_cross_entropy_fused.register_kernel("cuda")
def _linear_cross_entropy_fused_cuda(h, weight, target, ignore_index, reduction, label_smoothing,
                                     softcap, scale, need_dh, need_dw, chunk_rows=0):
    from ..kernels import linear_cross_entropy as k

    _check_args(h, weight, target, reduction)
    loss, dh, dw, grad_scale = k.fused(h, weight, target, ignore_index, reduction, label_smoothing, softcap,
                                       scale, need_dh, need_dw, tiles=_tiles(h, chunk_rows), keep_fp32=True,
                                       defer_weight=True)
    acc = _lse_dtype(h)
    return loss, dh.to(acc), dw.to(acc), grad_scale.to(acc)  # no-ops but for fp64 and the [0] placeholders


@linear_cross_entropy_fused.register_fake
def _(h, weight, target, ignore_index, reduction, label_smoothing, softcap, scale, need_dh, need_dw,
      chunk_rows=0):
    _check_args(h, weight, target, reduction)
    acc = _lse_dtype(h)
    return (h.new_empty((), dtype=acc), h.new_empty(h.shape if need_dh else (0,), dtype=acc),
            weight.new_empty(weight.shape if need_dw else (0,), dtype=acc), h.new_empty((), dtype=acc))


def _fused_setup_context(ctx, inputs, output) -> None:
    _, dh, dw, grad_scale = output
    ctx.save_for_backward(dh, dw, grad_scale)
    ctx.computed = inputs[8], inputs[9]  # need_dh, need_dw as the pass decided them
    ctx.dtypes = inputs[0].dtype, inputs[1].dtype
    ctx.mark_non_differentiable(dh, dw, grad_scale)


def _fused_backward(ctx, grad_loss: Tensor, _grad_dh, _grad_dw, _grad_scale_grad):
    dh, dw, grad_scale = ctx.saved_tensors
    g = grad_loss.to(_acc_dtype(dh)) * grad_scale.to(_acc_dtype(dh))

    def scaled(x: Tensor, needed: bool, computed: bool, name: str, dtype: torch.dtype):
        if not needed:
            return None
        if not computed:  # never a silent zero gradient
            raise RuntimeError(f"chronicals::linear_cross_entropy_fused was called with need_{name}=False "
                               f"but autograd asks for the gradient of {name}")
        if torch.compiler.is_compiling():  # Inductor fuses this spelling into one pass (and into what follows)
            return (x * g).to(dtype)  # scaled in the accumulation dtype, rounded once
        return scale_by(x, g, dtype)

    return (scaled(dh, ctx.needs_input_grad[0], ctx.computed[0], "dh", ctx.dtypes[0]),
            scaled(dw, ctx.needs_input_grad[1], ctx.computed[1], "dw", ctx.dtypes[1])) + (None,) * 9


linear_cross_entropy_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


@torch.library.custom_op("chronicals::scale_by", mutates_args=())
def scale_by(x: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x * g).to(dtype)`` in x's (accumulation) dtype, ``g`` 0-dim: one rounding. CUDA: one Triton pass."""
    return _scale_reference(x, g, dtype)


def _scale_reference(x: Tensor, g: Tensor, dtype: torch.dtype) -> Tensor:
    return (x * g.to(x.dtype)).to(dtype)


@scale_by.register_kernel("cuda")
def _scale_by_cuda(x, g, dtype):
    from ..kernels import linear_cross_entropy as k

    if x.dtype == torch.float64:  # the Triton pass computes in fp32
        return _scale_reference(x, g, dtype)
    return k.scale(x, g.float(), dtype)


@scale_by.register_fake
def _(x, g, dtype):
    return x.new_empty(x.shape, dtype=dtype)
