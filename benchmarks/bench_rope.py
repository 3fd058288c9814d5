"""QK-RoPE kernels, phase by phase: ours (q and k in one launch) against eager transformers-style
``q*cos + rotate_half(q)*sin``, torch.compile (Inductor) of the same function, and Liger-Kernel
(a missing variant when ``liger_kernel`` does not import).

Timing, rotation through input sets and every column: ``common.measure_phases``. Per phase:

* ``fwd``: ``(q_out, k_out)``. eager: the function above; torch.compile: it compiled (inference
  graph); ours: ``kernels.rope.rope_forward`` (the launcher, no autograd); Liger:
  ``LigerRopeFunction.forward`` called directly (it rotates q and k in place).
* ``bwd``: ``(dq, dk)`` from the incoming gradients. eager: the explicit formula
  ``ops.rope.rope_backward_reference`` (the transposed rotation); torch.compile: that formula
  compiled by Inductor (the same math, fused as Inductor likes: the fair separate backward;
  AOTAutograd's own is what ``fwd+bwd`` measures); ours: ``kernels.rope.rope_backward``; Liger:
  ``LigerRopeFunction.backward`` (in place on the gradients).
* ``fwd+bwd``: autograd, ``torch.autograd.grad((q_out, k_out), (q_leaf, k_leaf), (gq, gk))`` with
  the eager function, its compiled form, ``torch.ops.chronicals.rope`` or ``LigerRopeFunction.apply``.

Layouts as Dynamo hands them over: q and k are ``linear(...).view(B, S, H, D).transpose(1, 2)``
views of ``[B, S, H*D]`` leaves; cos/sin are ``[B, 1, S, D]`` (per-sequence positions, as with
packing); the incoming gradients are laid out like the forward outputs (``[B, S, H, D]`` memory
viewed as ``[B, H, S, D]``), so no variant pays a layout copy the others do not.

Minimal bytes (element size s; qk = B*S*(Hq+Hk)*D*s, cs = B*S*D*s): fwd 2qk + 2cs (read q, k,
cos, sin; write q_out, k_out); bwd the same with the gradients; fwd+bwd their sum. Every shape
moves >= 70 MB per call and the sets rotate past 4x L2.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import FakeCtx, Variant, autograd_grads  # noqa: E402

#: (B, S, Hq, Hk, D[, interleaved]): Qwen2.5-0.5B, Llama-3-8B, a D=256 model (Gemma-7B-like heads),
#: and GLM-4's heads with GLM's interleaved pairs (Liger has no interleaved variant).
SHAPES = [(8, 2048, 14, 2, 64), (8, 2048, 32, 8, 128), (4, 2048, 16, 16, 256), (8, 2048, 32, 2, 128, True)]
SMOKE_SHAPES = [(2, 8, 4, 2, 16), (2, 8, 4, 2, 16, True)]


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _eager(q, k, cos, sin):
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_pairs(x):  # GLM's rotate_half
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _eager_interleaved(q, k, cos, sin):
    return q * cos + _rotate_pairs(q) * sin, k * cos + _rotate_pairs(k) * sin


def phase_bytes(bsz: int, seq: int, hq: int, hk: int, d: int, dtype: torch.dtype) -> dict[str, int]:
    s = torch.finfo(dtype).bits // 8
    qk, cs = bsz * seq * (hq + hk) * d * s, bsz * seq * d * s
    one = 2 * qk + 2 * cs
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}


def _variants(compile_fn, liger: bool = True, interleaved: bool = False) -> dict[str, Variant]:
    from chronicals_compile.kernels.rope import rope_backward, rope_forward
    from chronicals_compile.ops.rope import rope_backward_reference, rope_interleaved_backward_reference

    eager_fn = _eager_interleaved if interleaved else _eager
    backward_reference = rope_interleaved_backward_reference if interleaved else rope_backward_reference
    ours_op = torch.ops.chronicals.rope_interleaved if interleaved else torch.ops.chronicals.rope

    def ref_bwd(gq, gk, cos, sin):
        return backward_reference(gq, gk, cos, sin, gq.dtype, gk.dtype)

    def impl(fwd, bwd, autograd_fwd, prepare=None):
        return Variant(fwd=lambda s: fwd(*s["qk"](), s["cos"], s["sin"]),
                       bwd=lambda s: bwd(s),
                       fwd_bwd=lambda s: autograd_grads(autograd_fwd(*s["qk"](), s["cos"], s["sin"]), s),
                       prepare=prepare)

    def grads(s):
        return s["gq"], s["gk"], s["cos"], s["sin"]

    c_fwd, c_bwd, c_joint = compile_fn(eager_fn), compile_fn(ref_bwd), compile_fn(eager_fn)
    variants = {
        "eager": impl(eager_fn, lambda s: ref_bwd(*grads(s)), eager_fn),
        "torch.compile": impl(c_fwd, lambda s: c_bwd(*grads(s)), c_joint),
        "chronicals": impl(lambda q, k, cos, sin: rope_forward(q, k, cos, sin, interleaved=interleaved),
                           lambda s: rope_backward(*grads(s), s["gq"].dtype, s["gk"].dtype, interleaved=interleaved),
                           ours_op),
    }
    # the kernel as it was before session 28 (64-bit offsets, k in q's row block) and as session 28
    # left it (32-bit offsets, shared row block): the A/B of both changes in one run
    def old_kernel(**how):
        class Old(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, cos, sin):
                ctx.save_for_backward(cos, sin)
                ctx.dtypes = (q.dtype, k.dtype)
                return rope_forward(q, k, cos, sin, interleaved=interleaved, **how)

            @staticmethod
            def backward(ctx, gq, gk):
                cos, sin = ctx.saved_tensors
                return (*rope_backward(gq, gk, cos, sin, *ctx.dtypes, interleaved=interleaved, **how), None, None)

        return impl(lambda q, k, cos, sin: rope_forward(q, k, cos, sin, interleaved=interleaved, **how),
                    lambda s: rope_backward(*grads(s), s["gq"].dtype, s["gk"].dtype, interleaved=interleaved, **how),
                    Old.apply)

    variants["chronicals-shared-rows"] = old_kernel(shared_rows=True)
    variants["chronicals-64bit"] = old_kernel(shared_rows=True, index_64=True)
    if liger and not interleaved:
        try:
            from liger_kernel.ops.rope import LigerRopeFunction as L
        except Exception:  # noqa: BLE001 - a missing peer is a missing column, not a failure
            return variants

        def prepare(s):
            s["ctx"] = FakeCtx()
            L.forward(s["ctx"], *s["qk"](), s["cos"], s["sin"])

        variants["liger"] = impl(lambda q, k, cos, sin: L.forward(FakeCtx(), q, k, cos, sin),
                                 lambda s: L.backward(s["ctx"], s["gq"], s["gk"]), L.apply, prepare)
    return variants


def run(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, copy_gbps: float = 4300.0, *,
        shapes=None, timers=None, compile_fn=None, liger: bool = True, log=print) -> list[dict]:
    import chronicals_compile.ops  # noqa: F401 - registers torch.ops.chronicals.*

    compile_fn = compile_fn or (lambda f: torch.compile(f, dynamic=False))
    rows = []
    for bsz, seq, hq, hk, d, *flag in shapes or SHAPES:
        interleaved = bool(flag and flag[0])
        torch._dynamo.reset()  # fresh compile per shape: no recompile limit, no stale guards

        def make_set(seed, bsz=bsz, seq=seq, hq=hq, hk=hk, d=d):
            g = torch.Generator(device).manual_seed(seed)
            q_leaf = torch.randn(bsz, seq, hq * d, generator=g, device=device, dtype=dtype).requires_grad_()
            k_leaf = torch.randn(bsz, seq, hk * d, generator=g, device=device, dtype=dtype).requires_grad_()
            pos = torch.arange(seq, device=device, dtype=torch.float32).expand(bsz, seq)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
            emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
            gq = torch.randn(bsz, seq, hq, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
            gk = torch.randn(bsz, seq, hk, d, generator=g, device=device, dtype=dtype).transpose(1, 2)
            return {"qk": lambda: (q_leaf.view(bsz, seq, hq, d).transpose(1, 2),
                                   k_leaf.view(bsz, seq, hk, d).transpose(1, 2)),
                    "cos": emb.cos().to(dtype).unsqueeze(1), "sin": emb.sin().to(dtype).unsqueeze(1),
                    "gq": gq, "gk": gk, "leaves": (q_leaf, k_leaf), "grads": (gq, gk)}

        label = {"op": "rope", "shape": f"B{bsz} S{seq} Hq{hq} Hk{hk} D{d}" + (" interleaved" if interleaved else "")}
        rows += common.measure_phases(label, make_set, _variants(compile_fn, liger, interleaved),
                                      phase_bytes(bsz, seq, hq, hk, d, dtype), device=device,
                                      copy_gbps=copy_gbps, timers=timers, log=log)
    return rows


def main() -> None:
    common.bench_main(run, SMOKE_SHAPES)


if __name__ == "__main__":
    main()
