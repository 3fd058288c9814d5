"""``chronicals::gated_mlp``: a gated MLP ``down(act(gate(x)) * up(x))`` whose activation lives in
GEMM epilogues, forward and backward.

Why one op for the three linears: the activation's forward belongs to the gate/up GEMM's epilogue
(it writes ``preact`` and ``h = act(g) * u`` while the accumulators are in registers), and its
backward to the epilogue of the GEMM that makes ``dh = dy @ W_down`` (which reads ``preact`` there
and writes ``d(preact)`` and the recomputed ``h`` for the down projection's weight gradient): the
down projection's backward and the activation's are one kernel, so no op boundary can fall
between them. What is saved for backward is ``x`` and ``preact`` (the gate and up outputs,
which the unfused graph keeps too); ``h``, the largest activation of a layer, is recomputed by
that epilogue, as ``gate_recompute`` does for the unfused graph.

Layout: QuACK's epilogue takes gate and up columns interleaved (g0, u0, g1, u1, ...), so the op
interleaves the two weights each call (a copy of 2 x F x d elements, ~17 MB a layer at
Qwen2.5-0.5B: ~10 us); ``x @ W1.T`` with that weight is one GEMM, as are its input gradient
``d(preact) @ W1`` and weight gradient ``d(preact).T @ x``, which the autograd formula splits
back into the gate's and the up projection's (``_deinterleave``). With ``keep_weight`` the forward's
interleaved weight is a third output, saved for backward, so the backward does not interleave
again: one copy a layer less (~10 us on the H200) for 2 x F x d more elements held between
forward and backward (0.39 GiB at Qwen2.5-0.5B). Without it the third output is empty.

CUDA with QuACK runs its kernels (``kernels.quack_gated_gemm``); everything else runs the same
layout in torch ops, the specification the GPU path is tested against (and what CPU tests of the
pass exercise). Gradients are computed only for the inputs that need them. A second derivative
(``create_graph=True``) differentiates the unfused math in torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import quack_gated_gemm
from .registration import define_op
from .swiglu import GELU_TANH, SILU, _act_and_grad

_CODES = {"swiglu": SILU, "geglu": GELU_TANH}


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _interleave(w_gate: Tensor, w_up: Tensor) -> Tensor:
    """[F, d] and [F, d] -> [2F, d] with rows g0, u0, g1, u1, ..."""
    return torch.stack([w_gate, w_up], dim=1).reshape(2 * w_gate.shape[0], w_gate.shape[1])


def _fast(x2: Tensor, w_gate: Tensor, w_down: Tensor, activation: str) -> bool:
    """QuACK's kernels take this call: CUDA sm90/sm100 with QuACK, bf16/fp16, one dtype, widths that
    give 16-byte rows (TMA) and a contiguous down weight. The pass proves all of it; a direct call
    that does not meet it gets the torch path."""
    widths_ok = all(s % 8 == 0 for s in (*w_gate.shape, w_down.shape[0]))
    return (activation in quack_gated_gemm.ACTIVATIONS and widths_ok and w_down.is_contiguous()
            and x2.dtype == w_gate.dtype == w_down.dtype
            and quack_gated_gemm.unavailable_reason(x2.device, x2.dtype) is None)


def _aligned(t: Tensor) -> Tensor:
    """Contiguous rows at a 16-byte-aligned address, as TMA descriptors need (a view with an odd
    storage offset is copied)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def gated_mlp_reference(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str) -> Tensor:
    """What the op equals: the three linears of a Hugging Face MLP, in torch ops."""
    g, u = F.linear(x, w_gate), F.linear(x, w_up)
    act = F.silu(g) if activation == "swiglu" else F.gelu(g, approximate="tanh")
    return F.linear(act * u, w_down)


def _check(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str) -> None:
    if activation not in _CODES:
        raise ValueError(f"chronicals::gated_mlp: activation must be one of {sorted(_CODES)}, got {activation!r}")
    f, d = w_gate.shape
    if w_up.shape != w_gate.shape or w_down.dim() != 2 or w_down.shape[1] != f or x.shape[-1] != d:
        raise ValueError(f"chronicals::gated_mlp: shapes do not chain: x {tuple(x.shape)}, gate {tuple(w_gate.shape)}, "
                         f"up {tuple(w_up.shape)}, down {tuple(w_down.shape)}")


def _postact(preact: Tensor, activation: str) -> Tensor:
    c = torch.promote_types(preact.dtype, torch.float32)
    pairs = preact.unflatten(-1, (-1, 2)).to(c)
    value, _ = _act_and_grad(pairs[..., 0], _CODES[activation])
    return (value * pairs[..., 1]).to(preact.dtype)


def gated_mlp(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, activation: str,
              keep_weight: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, preact, w1)``: the MLP's output, the interleaved gate/up outputs kept for backward,
    and the interleaved weight when ``keep_weight`` (else an empty tensor)."""
    _check(x, w_gate, w_up, w_down, activation)
    x2 = _rows(x)
    w1 = _interleave(w_gate, w_up)
    if _fast(x2, w_gate, w_down, activation):
        x2 = _aligned(x2)
        preact, h = quack_gated_gemm.gated_forward(x2, w1, activation)
    else:
        preact = x2 @ w1.t()
        h = _postact(preact, activation)
    y = h @ w_down.t()
    return y.reshape(*x.shape[:-1], w_down.shape[0]), preact, w1 if keep_weight else w_gate.new_empty((0,))


def _gated_mlp_fake(x, w_gate, w_up, w_down, activation, keep_weight=False):
    rows = 1
    for size in x.shape[:-1]:
        rows = rows * size
    y = x.new_empty((*x.shape[:-1], w_down.shape[0]))
    w1 = w_gate.new_empty((2 * w_gate.shape[0], w_gate.shape[1]) if keep_weight else (0,))
    return y, x.new_empty((rows, 2 * w_gate.shape[0])), w1


def _dpreact_reference(dh: Tensor, preact: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    c = torch.promote_types(preact.dtype, torch.float32)
    pairs = preact.unflatten(-1, (-1, 2)).to(c)
    g, u = pairs[..., 0], pairs[..., 1]
    value, slope = _act_and_grad(g, _CODES[activation])
    dhc = dh.to(c)
    dpre = torch.stack([dhc * u * slope, dhc * value], dim=-1).flatten(-2)
    return dpre.to(preact.dtype), (value * u).to(preact.dtype)


def gated_mlp_backward(grad: Tensor, x: Tensor, preact: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                       activation: str, needs: list[bool], w1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``needs``: (x, w_gate, w_up, w_down); ``w1``: the forward's interleaved weight, or an empty
    tensor (interleaved again here). Returns ``(dx, dw1, dw_down)`` with ``dw1`` the gate
    and up gradients still interleaved ([2F, d], rows g0, u0, g1, ...): the caller splits it (see
    ``_backward``). A gradient not needed comes back empty."""
    need_x, need_gate, need_up, need_down = needs
    dy2, x2 = _rows(grad), _rows(x)
    if _fast(dy2, w_gate, w_down, activation) and preact.dtype == dy2.dtype:
        dpre, h = quack_gated_gemm.gated_backward(_aligned(dy2), w_down, _aligned(preact), activation)
    else:
        dpre, h = _dpreact_reference(dy2 @ w_down, preact, activation)
    dx, dw1, dwd = (grad.new_empty((0,)) for _ in range(3))  # distinct: outputs may not alias
    if need_down:
        dwd = dy2.t() @ h
    del h
    if need_x:
        dx = (dpre @ (w1 if w1.numel() else _interleave(w_gate, w_up))).reshape(x.shape)
    if need_gate or need_up:
        dw1 = dpre.t() @ x2
    return dx, dw1, dwd


def _gated_mlp_backward_fake(grad, x, preact, w_gate, w_up, w_down, activation, needs, w1):
    need_x, need_gate, need_up, need_down = needs

    def like(t, need):
        return t.new_empty(t.shape) if need else grad.new_empty((0,))

    dw1 = w_gate.new_empty((2 * w_gate.shape[0], w_gate.shape[1])) if need_gate or need_up else grad.new_empty((0,))
    return like(x, need_x), dw1, like(w_down, need_down)


def _deinterleave(dw1: Tensor, need_gate: bool, need_up: bool) -> tuple[Tensor | None, Tensor | None]:
    """The gate and up weight gradients out of the interleaved one. Outside the op on purpose:
    under compile these two copies are Inductor kernels reading rows of 2d contiguous elements at
    copy bandwidth, where torch's strided copy inside the op ran at a third of it (H200, session
    14's profile: 11.8 us each, 0.57 ms a step)."""
    if not (need_gate or need_up):
        return None, None
    pairs = dw1.view(dw1.shape[0] // 2, 2, dw1.shape[1])
    return (pairs[:, 0].contiguous() if need_gate else None,
            pairs[:, 1].contiguous() if need_up else None)


def _setup_context(ctx, inputs, output) -> None:
    x, w_gate, w_up, w_down, activation, *_ = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, w_gate, w_up, w_down, output[1], output[2])


def _backward(ctx, grad_y: Tensor, grad_preact, grad_w1):
    # preact and w1 are outputs only so that autograd saves them; the pass never hands them on
    x, w_gate, w_up, w_down, preact, w1 = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    if torch.is_grad_enabled():  # create_graph=True: the unfused math, differentiable as written
        wanted = [t for t, n in zip((x, w_gate, w_up, w_down), needs) if n]
        with torch.enable_grad():
            y = gated_mlp_reference(x, w_gate, w_up, w_down, ctx.activation)
            got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
        return (*(next(got) if n else None for n in needs), None, None)
    dx, dw1, dwd = _BACKWARD_OP(grad_y, x, preact, w_gate, w_up, w_down, ctx.activation, needs, w1)
    dwg, dwu = _deinterleave(dw1, needs[1], needs[2])
    return (dx if needs[0] else None, dwg, dwu, dwd if needs[3] else None, None, None)


# Library-defined, not custom_op: this op is called 24 times a forward and its backward 24 times
# a backward, and custom_op's per-call Python layers cost the host time (ops/registration.py).
_BACKWARD_OP = define_op("chronicals::gated_mlp_backward", gated_mlp_backward, fake=_gated_mlp_backward_fake)
define_op("chronicals::gated_mlp", gated_mlp, fake=_gated_mlp_fake, backward=_backward, setup_context=_setup_context)
