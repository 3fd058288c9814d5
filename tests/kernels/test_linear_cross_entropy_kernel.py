"""Cut cross-entropy: Triton launchers (interpreted on CPU) and the ops' CPU reference, vs float64."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

from chronicals_compile.kernels import linear_cross_entropy as k
from chronicals_compile.verify import linear_cross_entropy as case
from chronicals_compile.verify.tolerance import assert_all_ok, measure

SMALL = k.Tiles(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=4, num_stages=1)


@settings(max_examples=20)
@given(case.cases())
def test_matches_float64(params):
    assert_all_ok(case.check(**params))


@pytest.mark.parametrize("mode", case.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_option_at_once(mode, dtype):
    assert_all_ok(case.check(tokens=37, hidden=40, vocab=300, dtype=dtype, reduction="mean", ignore="some",
                             label_smoothing=0.1, softcap=3.0, scale=0.5, mode=mode, tiles_per_group=3,
                             chunk_rows=16, seed=3))


@pytest.mark.parametrize("hidden", [896, 2304])
def test_real_hidden_sizes(hidden):
    for mode in case.MODES:
        assert_all_ok(case.check(tokens=5, hidden=hidden, vocab=37, dtype=torch.float16, mode=mode, seed=hidden))


@pytest.mark.parametrize("mode", case.MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored_like_torch(mode, reduction):
    """mean: NaN loss (0/0), sum: 0; gradients are zeros, never NaN."""
    h, w, t, _ = case.make_inputs(9, 16, 50, torch.float32, "all", 0)
    loss, dh, dw = case.ours(h, w, t, -100, reduction, 0.1, 0.0, 1.0, mode, 1.0, SMALL)
    ref = F.cross_entropy(h @ w.t(), t, reduction=reduction)
    assert torch.isnan(loss) if reduction == "mean" else loss == 0
    assert torch.isnan(ref) == torch.isnan(loss)
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_out_of_range_target_gives_nan_not_a_wrong_loss():
    h, w, t, _ = case.make_inputs(5, 16, 20, torch.float32, "none", 0)
    t[2] = 25
    loss, _ = k.forward(h, w, t, tiles=SMALL)
    assert torch.isnan(loss)


def test_empty_batch():
    h, w = torch.zeros(0, 16), torch.randn(20, 16)
    t = torch.zeros(0, dtype=torch.int64)
    assert torch.isnan(k.forward(h, w, t, reduction="mean", tiles=SMALL)[0])
    assert k.forward(h, w, t, reduction="sum", tiles=SMALL)[0] == 0
    loss, dh, dw = k.fused(h, w, t, reduction="sum", tiles=SMALL)
    assert loss == 0 and dh.shape == h.shape and torch.equal(dw, torch.zeros_like(dw))


def test_unneeded_gradients_are_skipped():
    h, w, t, _ = case.make_inputs(9, 16, 50, torch.float32, "some", 1)
    _, lse = k.forward(h, w, t, tiles=SMALL)
    dh, dw = k.backward(torch.tensor(1.0), h, w, t, lse, need_dh=True, need_dw=False, tiles=SMALL)
    assert dh.shape == h.shape and dw.numel() == 0
    _, dh, dw = k.fused(h, w, t, need_dh=False, need_dw=True, tiles=SMALL)
    assert dh.numel() == 0 and dw.shape == w.shape


class _LargestAllocation(TorchDispatchMode):
    """Largest tensor any torch op returns, in bytes (the interpreter's host copies count too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


@pytest.mark.parametrize("mode", case.MODES)
def test_never_allocates_tokens_times_vocab(mode):
    n, d, v, chunk = 37, 8, 300, 8
    h, w, t, _ = case.make_inputs(n, d, v, torch.float16, "some", 2)
    tiles = k.Tiles(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=4, num_stages=1, chunk_rows=chunk,
                    vocab_cols=chunk)
    with _LargestAllocation() as seen:
        if mode.startswith("fused"):
            k.fused(h, w, t, label_smoothing=0.1, tiles=tiles, logits="matmul" if mode == "fused_matmul" else "tiles")
        else:
            _, lse = k.forward(h, w, t, label_smoothing=0.1, tiles=tiles)
            k.backward(torch.tensor(1.0), h, w, t, lse, label_smoothing=0.1, tiles=tiles,
                       layout=case.LAYOUT[mode])
    # fp32 dW accumulator (rows) or dh accumulator (vocab), the [chunk, V] or [N, slice] gradient
    # buffer, the per-group statistics: all < N x V
    assert seen.largest <= max(4 * v * d, 4 * n * d, 2 * chunk * max(v, n),
                               4 * 4 * n * math.ceil(v / 32)) < 2 * n * v, seen.largest


class _Allocations(TorchDispatchMode):
    """(op, shape, dtype) of every fresh 2-d allocation (empty / empty_like / zeros), not of conversions
    (outputs come from empty_like, working buffers from empty)."""

    FRESH = (torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.zeros.default)

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FRESH and out.dim() == 2:
            self.seen.add((func.__name__, tuple(out.shape), out.dtype))
        return out


@pytest.mark.parametrize("n, v, d, need_dh, need_dw, accumulator", [
    (37, 300, 64, True, True, "dh"),     # N < V: dh's N x d fp32 accumulator (Qwen's case)
    (300, 37, 16, True, True, "dw"),     # V < N: dW's V x d is the smaller one to hold
    (37, 300, 64, True, False, None),    # frozen lm_head: row chunks write dh straight out
    (37, 300, 64, False, True, None),    # frozen h: vocab slices write dW straight out
])
def test_lean_holds_only_the_smaller_accumulator(n, v, d, need_dh, need_dw, accumulator):
    """cce_mode="lean" (layout ``lean``): one fp32 accumulator at most, the smaller one needed, and
    a gradient buffer no larger than the smaller of dh and dW (one tile at least); gradients as
    exact as torch's. Fails if the layout's sizing regresses to the vocab layout's wide slices."""
    h, w, t, ii = case.make_inputs(n, d, v, torch.float16, "some", n + v)
    tiles = k.default_tiles(h.dtype, h.device)
    _, lse = k.forward(h, w, t)
    with _Allocations() as seen:
        dh, dw = k.backward(torch.tensor(0.75), h, w, t, lse, ii, need_dh=need_dh, need_dw=need_dw, layout="lean")
    fp32 = {shape for _, shape, dtype in seen.seen if dtype == torch.float32}
    assert fp32 == {"dh": {(n, d)}, "dw": {(v, d)}, None: set()}[accumulator], seen.seen
    buffers = [s for op, s, dtype in seen.seen if dtype == h.dtype and op == "empty.memory_format"]
    assert len(buffers) == 1, seen.seen
    (rows, cols), = buffers
    assert rows * cols <= max(min(n, v) * d, tiles.block_n * v if rows < n else n * tiles.block_v), buffers
    ref = case.torch_loss(h.double(), w.double(), t, ii, "mean", 0.0, 0.0, 1.0, grad=0.75)
    same = case.torch_loss(h, w, t, ii, "mean", 0.0, 0.0, 1.0, grad=0.75)
    got = [(dh, 1), (dw, 2)] if need_dh and need_dw else [(dh, 1)] if need_dh else [(dw, 2)]
    assert (dw.numel() == 0) != need_dw and (dh.numel() == 0) != need_dh
    assert_all_ok([measure(f"lean.{i}", g, same[i], ref[i], dtype=h.dtype, slack_scale=case.GRAD_SLACK)
                   for g, i in got])


# ---- the ops' CPU implementation: the chunked torch reference ----

def _ops():
    from chronicals_compile import ops  # noqa: F401

    return torch.ops.chronicals


@pytest.mark.parametrize("opts", [(-100, "mean", 0.0, 0.0, 1.0), (3, "sum", 0.1, 3.0, 0.5)])
def test_cpu_reference_ops_chunked_match_float64(monkeypatch, opts):
    import chronicals_compile.ops.linear_cross_entropy as mod

    monkeypatch.setattr(mod, "_CPU_CHUNK_ELEMENTS", 64)  # several row chunks
    ops = _ops()
    h, w, t, _ = case.make_inputs(23, 16, 30, torch.float32, "some", 5)
    t[t == -100] = opts[0]
    ref = case.torch_loss(h.double(), w.double(), t, *opts)
    loss, lse = ops.linear_cross_entropy(h, w, t, *opts)
    dh, dw = ops.linear_cross_entropy_backward(torch.tensor(1.0), h, w, t, lse, *opts, True, True)
    floss, fdh, fdw, fscale = ops.linear_cross_entropy_fused(h, w, t, *opts, True, True)
    fdh, fdw = fdh * fscale, fdw * fscale  # the row losses' sum's gradients, times what makes them the loss's
    for got, want in ((loss, ref[0]), (dh, ref[1]), (dw, ref[2]), (floss, ref[0]), (fdh, ref[1]), (fdw, ref[2])):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [(-100, "mean", 0.0, 0.0, 1.0), (-100, "sum", 0.1, 3.0, 0.5)])
def test_opcheck_and_gradcheck(opts):
    ops = _ops()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(9, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 13, (9,), generator=gen)
    t[2] = -100
    torch.library.opcheck(ops.linear_cross_entropy.default, (h, w, t) + opts)
    torch.library.opcheck(ops.linear_cross_entropy_fused.default, (h, w, t) + opts + (True, True))
    torch.library.opcheck(ops.linear_cross_entropy_fused.default, (h, w.detach(), t) + opts + (True, False))
    lse = ops.linear_cross_entropy(h, w, t, *opts)[1].detach()
    torch.library.opcheck(ops.linear_cross_entropy_backward.default,
                          (torch.tensor(1.5, dtype=torch.float64), h.detach(), w.detach(), t, lse) + opts + (True, True))
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy(a, b, t, *opts)[0], (h, w))
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy_fused(a, b, t, *opts, True, True)[0], (h, w))
    # the schema's last argument, the backward layout, through opcheck and gradcheck (the CPU
    # reference ignores it: that it reaches the CUDA launcher is the GPU tests' business)
    torch.library.opcheck(ops.linear_cross_entropy.default, (h, w, t) + opts + (0, "lean"))
    assert torch.autograd.gradcheck(lambda a, b: ops.linear_cross_entropy(a, b, t, *opts, 0, "lean")[0], (h, w))


def test_unknown_layout_is_refused_by_name():
    ops = _ops()
    h, w, t, _ = case.make_inputs(4, 8, 6, torch.float32, "none", 0)
    with pytest.raises(RuntimeError, match="layout must be one of"):
        ops.linear_cross_entropy(h, w, t, -100, "mean", 0.0, 0.0, 1.0, 0, "columns")
    with pytest.raises(ValueError, match="layout must be one of"):
        k.backward(torch.tensor(1.0), h, w, t, torch.zeros(4), layout="columns")


def test_fused_backward_refuses_a_gradient_it_did_not_compute():
    ops = _ops()
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    t = torch.randint(0, 6, (4,))
    loss = ops.linear_cross_entropy_fused(h, w, t, -100, "mean", 0.0, 0.0, 1.0, True, False)[0]
    with pytest.raises(RuntimeError, match="need_dw=False"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_first_chunk_overwrites_an_uninitialised_accumulator(dtype):
    """The fp32 accumulators start as torch.empty: the first chunk's GEMM must ignore what is there
    (beta = 0), NaN included, and later chunks must add."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(11, 13, generator=gen).to(dtype)
    h = torch.randn(11, 6, generator=gen).to(dtype)
    acc = torch.full((13, 6), float("nan"))
    k._accumulate_dw(acc, g, h, first=True)
    want = g.double().t() @ h.double()
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-5)
    k._accumulate_dw(acc, g, h)
    torch.testing.assert_close(acc.double(), 2 * want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scale_is_the_fp32_product_rounded_once(dtype):
    """The fused backward's dh/dW scaling (one Triton pass in eager CUDA) equals torch's spelling.
    bf16 runs on the GPU (tests/gpu): the interpreter's fp32 -> bf16 store does not round to nearest."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4099, generator=gen).to(dtype)[::3]  # odd length, non-contiguous
    g = torch.tensor(0.37)
    assert torch.equal(k.scale(x, g), (x.float() * g).to(dtype))


def test_scale_by_op_matches_reference():
    ops = _ops()
    x = torch.randn(5, 7)
    g = torch.tensor(1.7)
    assert torch.equal(ops.scale_by(x, g, torch.bfloat16), (x * g).to(torch.bfloat16))
    torch.library.opcheck(ops.scale_by.default, (x, g, torch.bfloat16))
    assert torch.equal(k.scale(x, g, torch.float16), (x * g).to(torch.float16))


def test_fused_keeps_fp32_accumulators_closer_to_float64():
    """keep_fp32 (what the op uses): dh and dW unrounded, at least as close to float64 as the
    rounded ones, and equal to them once rounded."""
    h, w, t, _ = case.make_inputs(37, 24, 70, torch.float16, "some", 9)
    tiles = k.Tiles(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=4, num_stages=1, chunk_rows=16,
                    row_block=32, row_warps=4)
    _, dh, dw = k.fused(h, w, t, tiles=tiles)
    _, dh32, dw32 = k.fused(h, w, t, tiles=tiles, keep_fp32=True)
    assert dh32.dtype == dw32.dtype == torch.float32 and dh.dtype == dw.dtype == torch.float16
    ref = case.torch_loss(h.double(), w.double(), t, -100, "mean", 0.0, 0.0, 1.0)
    for kept, rounded, want in ((dh32, dh, ref[1]), (dw32, dw, ref[2])):
        torch.testing.assert_close(kept.to(torch.float16), rounded, rtol=1e-3, atol=1e-6)
        assert (kept.double() - want).abs().max() <= (rounded.double() - want).abs().max() + 1e-9


def test_fused_op_rounds_once_after_scaling_by_the_incoming_gradient():
    """The op returns fp32 dh/dW for bf16 inputs; the backward scales them and rounds once."""
    ops = _ops()
    h, w, t, _ = case.make_inputs(23, 16, 40, torch.bfloat16, "some", 6)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, dh, dw, grad_scale = ops.linear_cross_entropy_fused(h, w, t, -100, "sum", 0.0, 0.0, 1.0, True, True)
    assert dh.dtype == dw.dtype == torch.float32 and float(grad_scale) == 1.0
    (loss * 0.37).backward()
    g = torch.tensor(0.37)
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.equal(h.grad, (dh * g).to(torch.bfloat16)) and torch.equal(w.grad, (dw * g).to(torch.bfloat16))


def test_fused_keep_fp32_without_dh():
    """keep_fp32 with need_dh=False (h needs no gradient): dW only, no write into the [0] placeholder."""
    h, w, t, _ = case.make_inputs(21, 16, 40, torch.float16, "some", 12)
    tiles = k.Tiles(block_n=16, block_v=32, block_d=16, group_n=2, num_warps=4, num_stages=1, chunk_rows=8,
                    row_block=32, row_warps=4)
    _, dh, dw32 = k.fused(h, w, t, need_dh=False, tiles=tiles, keep_fp32=True)
    _, _, dw = k.fused(h, w, t, tiles=tiles)
    assert dh.numel() == 0 and dw32.dtype == torch.float32
    torch.testing.assert_close(dw32.to(torch.float16), dw, rtol=1e-3, atol=1e-6)


def _quack_stand_in(z, target, ignore_index, loss_out):
    """What QuACK's row kernel computes (its source, quack/cross_entropy.py), in torch: each row's
    ``lse - z[target]`` (0 when ignored) and ``softmax(z) - onehot(target)`` over ``z`` (zeros when
    ignored). It runs only on CUDA, so on CPU this stands in for it to test our side of the call."""
    zf = z.float()
    lse = torch.logsumexp(zf, dim=-1)
    ignored = target == ignore_index
    safe = target.clamp(0, z.shape[1] - 1)
    loss_out.copy_(torch.where(ignored, 0.0, lse - zf.gather(1, safe[:, None])[:, 0]))
    g = torch.softmax(zf, dim=-1) - F.one_hot(safe, z.shape[1]).float()
    z.copy_(torch.where(ignored[:, None], 0.0, g).to(z.dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore", ["some", "all", "none"])
@pytest.mark.parametrize("deferred", [False, True])
def test_quack_row_path_plumbing(monkeypatch, reduction, ignore, deferred):
    """Our side of QuACK's row kernel: unweighted G, the row weight applied to the fp32 accumulators
    (or deferred to the op's backward as grad_scale), out-of-range targets handed over as ignored,
    several ragged chunks; against float64, with the kernel's documented math standing in for it."""
    from chronicals_compile.kernels import quack_cross_entropy

    calls = []
    monkeypatch.setattr(k, "_quack_rows", lambda *a: True)
    monkeypatch.setattr(quack_cross_entropy, "rows_in_place",
                        lambda *a: (calls.append(a[0].shape), _quack_stand_in(*a)))
    h, w, t, _ = case.make_inputs(37, 40, 300, torch.float16, ignore, 2)
    tiles = dataclasses.replace(SMALL, chunk_rows=16)
    want = case.torch_loss(h.double(), w.double(), t, -100, reduction, 0.0, 0.0, 1.0)
    if deferred:
        loss, dh, dw, grad_scale = k.fused(h, w, t, reduction=reduction, tiles=tiles, keep_fp32=True,
                                           defer_weight=True)
        dh, dw = (dh * grad_scale).half(), (dw * grad_scale).half()
    else:
        loss, dh, dw = k.fused(h, w, t, reduction=reduction, tiles=tiles)
    assert len(calls) == 3  # 37 rows in chunks of at most 16
    same = case.torch_loss(h, w, t, -100, reduction, 0.0, 0.0, 1.0)
    assert_all_ok([measure(n, o, s, r, dtype=torch.float16) for n, o, s, r in
                   zip(("loss", "dh", "dw"), (loss, dh, dw), same, want)])


def test_quack_row_path_out_of_range_target_is_nan(monkeypatch):
    from chronicals_compile.kernels import quack_cross_entropy

    seen = []
    monkeypatch.setattr(k, "_quack_rows", lambda *a: True)
    monkeypatch.setattr(quack_cross_entropy, "rows_in_place",
                        lambda z, tgt, ig, out: (seen.append(tgt.clone()), _quack_stand_in(z, tgt, ig, out)))
    h, w, t, _ = case.make_inputs(9, 16, 30, torch.float32, "none", 4)
    t[2], t[5] = 30, -3
    loss, dh, dw = k.fused(h, w, t, tiles=SMALL)
    assert math.isnan(float(loss)) and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    assert int(seen[0][2]) == int(seen[0][5]) == -100  # handed over as ignored: no out-of-bounds read


@pytest.mark.parametrize("vocab,taken", [(151936, True), (4096, True), (4099, False), (32003, False),
                                         (32004, False), (2**18 + 8, False)])
def test_quack_takes_only_vocabularies_it_compiles(monkeypatch, vocab, taken):
    """16-byte rows and at most QUACK_MAX_VOCAB; plain logits from a GEMM; asked only with rows="quack"."""
    from chronicals_compile.kernels import quack_cross_entropy

    monkeypatch.setattr(quack_cross_entropy, "unavailable_reason", lambda *a: None)
    cuda = torch.device("cuda", 0)
    assert k._quack_rows(torch.bfloat16, cuda, "matmul", "quack", True, vocab) is taken
    assert not k._quack_rows(torch.bfloat16, cuda, "matmul", "triton", True, vocab)
    assert not k._quack_rows(torch.bfloat16, cuda, "tiles", "quack", True, vocab)
    assert not k._quack_rows(torch.bfloat16, cuda, "matmul", "quack", False, vocab)
