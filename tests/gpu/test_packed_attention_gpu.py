"""Packed == unpacked on the GPU, bf16 (issue 5): per-document losses and every gradient of one
packed row through ``chronicals_varlen`` (FlashAttention varlen) equal those of running each
document alone, eager and compiled with ``chronicals_compile.compile`` (Inductor).

Tolerance, measured rather than guessed: both bf16 sides are compared with a float64 run of the
same (bf16-rounded) weights, one document at a time through stock sdpa. The stock per-document
bf16 run's own distance from that reference, on this GPU, is the yardstick; ours must satisfy

    rel(ours) <= 2 * rel(stock bf16 per document) + 1e-3,   rel(x) = ||x - ref64|| / ||ref64||

per gradient tensor and for the vector of per-document losses. The factor 2 leaves room for a
different but equally exact kernel (flash varlen vs sdpa's flash/cuDNN/efficient choice, one
backward vs four accumulated ones); 1e-3 is about the error of rounding an exact result to
bf16 once (2^-9 relative per element, about 1.1e-3 in norm) and covers tensors where the stock
run happens to be unusually close. A document leak (attention across a boundary) moves
gradients at O(1e-1..1) relative: ``test_bound_catches_a_leak`` checks that it fails this bound.
(Dry run on a CPU, varlen emulated by an fp32-inside kernel: ours sat at 0.4-0.5 of the bound,
stock bf16 errors were 0.4-1.5e-2 per gradient, and merging two documents went 25x over it.)

The test also proves ``varlen_attn`` ran (``torch_attn::_varlen_attn`` and its backward in the
profiler's op list, no sdpa op): a silent fallback to the masked-SDPA path would still be
correct and would otherwise pass unnoticed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LENGTHS = [37, 128, 301, 5]  # 471 tokens -> one 512-wide row (bucket 64) with a 41-token padding tail
VOCAB, LAYERS = 1024, 2
DEVICE = "cuda"
#: family -> extra config; mistral-sw96 puts a sliding window inside the 128- and 301-token documents
CASES = {"llama": {}, "qwen2": {}, "mistral": {}, "mistral-sw96": {"sliding_window": 96}}


def _models(case: str):
    """(packed bf16, stock-sdpa bf16, stock-sdpa float64): identical bf16-rounded weights."""
    from chronicals_compile.runtime import enable_packed_attention
    from chronicals_compile.testing import tiny_model

    model = tiny_model(case.split("-")[0], layers=LAYERS, hidden=256, heads=4, kv_heads=2, vocab=VOCAB,
                       intermediate=512, seed=0, **CASES[case])
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    with torch.no_grad():  # random init gives near-uniform logits; spread them so losses differ
        model.lm_head.weight.mul_(10.0)
    model = model.to(device=DEVICE, dtype=torch.bfloat16).train()
    stock = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    for m in (stock, ref64):
        m.set_attn_implementation("sdpa")
    return enable_packed_attention(model), stock, ref64


def _batch():
    from chronicals_compile.runtime import PackingCollator

    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    batch = PackingCollator(bucket_multiple=64)(docs)
    assert batch["input_ids"].shape == (1, 512) and batch["max_length_q"] == 301
    return docs, {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}


def _per_document(model, docs, n_items, loss_dtype):
    """Each document alone: mean loss per document; .grad = d(sum of token losses / n_items)."""
    losses = []
    for d in docs:
        x = torch.tensor([d], device=DEVICE)
        z = model(input_ids=x).logits[0, :-1].to(loss_dtype)
        losses.append(F.cross_entropy(z, x[0, 1:]).detach().double())
        (F.cross_entropy(z, x[0, 1:], reduction="sum") / n_items).backward()
    return torch.stack(losses), _grads(model)


def _doc_losses(logits, batch):
    cu, ids = batch["cu_seq_lens_q"].tolist(), batch["input_ids"][0]
    return torch.stack([F.cross_entropy(logits[0, a:b - 1].float(), ids[a + 1:b]).double()
                        for a, b in zip(cu[:len(LENGTHS)], cu[1:len(LENGTHS) + 1])])


def _run_profiled(runner, batch):
    """One packed training forward + backward; returns the loss output and the op names seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = runner(**batch)
        out.loss.backward()  # op names are recorded at dispatch: no synchronize needed
    return out, [e.name for e in prof.events()]


def _assert_varlen_ran(names):
    fwd = sum(n == "torch_attn::_varlen_attn" for n in names)
    bwd = sum(n == "torch_attn::_varlen_attn_backward" for n in names)
    sdpa = sorted({n for n in names if "scaled_dot_product" in n})
    assert fwd >= LAYERS and bwd >= LAYERS and not sdpa, (
        f"varlen_attn calls: forward {fwd}, backward {bwd} (want >= {LAYERS} each); sdpa ops {sdpa}: "
        "the packed path fell back to masked SDPA")


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _violations(ours, stock, ref):
    """[(what, rel ours, bound)] for every loss vector / gradient outside the bound."""
    (l_o, g_o), (l_s, g_s), (l_r, g_r) = ours, stock, ref
    out = []
    for name, o, s, r in [("per-document losses", l_o, l_s, l_r)] + [(n, g_o[n], g_s[n], g_r[n]) for n in g_r]:
        assert r.abs().sum() > 0, f"reference for {name} is zero: the test has no teeth"
        bound = 2 * _rel(s, r) + 1e-3
        if not _rel(o, r) <= bound:
            out.append((name, _rel(o, r), bound))
    return out


def _references(case, docs, batch):
    _, stock, ref64 = _models(case)
    n = batch["num_items_in_batch"]
    return _per_document(stock, docs, n, torch.float32), _per_document(ref64, docs, n, torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_equals_unpacked_bf16_eager(case):
    docs, batch = _batch()
    model, _, _ = _models(case)
    assert model.config._attn_implementation == "chronicals_varlen"
    out, names = _run_profiled(model, batch)
    _assert_varlen_ran(names)
    ours = (_doc_losses(out.logits.detach(), batch), _grads(model))
    stock, ref = _references(case, docs, batch)
    bad = _violations(ours, stock, ref)
    assert not bad, f"{case}: outside 2 x stock-bf16 error + 1e-3: {bad}"


@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral"])
def test_packed_equals_unpacked_bf16_compiled(case):
    """Default backend options: on CUDA the loss is our fused linear cross-entropy and the training
    graph drops logits, so per-document losses come from a second, label-free compiled call."""
    import chronicals_compile

    docs, batch = _batch()
    model, _, _ = _models(case)
    runner = chronicals_compile.compile(model)
    runner(**batch).loss.backward()  # compile outside the profiled call
    model.zero_grad(set_to_none=True)
    _, names = _run_profiled(runner, batch)
    _assert_varlen_ran(names)
    grads = _grads(model)
    with torch.no_grad():
        unlabeled = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
        losses = _doc_losses(runner(**unlabeled).logits, batch)
    stock, ref = _references(case, docs, batch)
    bad = _violations((losses, grads), stock, ref)
    assert not bad, f"{case} compiled: outside 2 x stock-bf16 error + 1e-3: {bad}"


def test_bound_catches_a_leak():
    """The same row through stock sdpa without document boundaries (plain causal over 512 tokens,
    positions not restarted) must fail the bound by a wide margin: the tolerance has teeth."""
    docs, batch = _batch()
    _, leaky, _ = _models("llama")
    out = leaky(input_ids=batch["input_ids"], labels=batch["labels"],
                num_items_in_batch=batch["num_items_in_batch"])
    out.loss.backward()
    got = (_doc_losses(out.logits.detach(), batch), _grads(leaky))
    stock, ref = _references("llama", docs, batch)
    bad = _violations(got, stock, ref)
    assert bad and max(rel / bound for _, rel, bound in bad) > 3, bad
