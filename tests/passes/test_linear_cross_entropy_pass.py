"""The lm_head + cross-entropy pass: transformers' loss path, the logits policy, and safe refusals."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import chronicals_compile
from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import FAMILIES, random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import assert_same_training_step, compiled_vs_eager

FAST = {"compiler": "aot_eager"}
NAME = "linear_cross_entropy"


def _num_items(batch):
    return torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fuses_loss_drops_logits_trains_like_eager(family):
    model = tiny_model(family, layers=1)
    report, eager, compiled = compiled_vs_eager(model, random_batch(pad_labels=3), options=FAST)
    assert report.swaps.get(NAME) == 1, str(report)
    assert report.output.logits is None
    assert any("logits dropped" in n for n in report.notes)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("tie", [False, True])
def test_num_items_in_batch_padded_labels_tied_and_untied(tie):
    """HF's gradient-accumulation path: sum reduction, then ``/ num_items_in_batch`` (left in the graph)."""
    model = tiny_model("llama", layers=1, tie=tie)
    batch = random_batch(seq=12, pad_labels=4, seed=1)
    batch["num_items_in_batch"] = _num_items(batch) + 5  # as if other micro-batches had 5 more labels
    report, eager, compiled = compiled_vs_eager(model, batch, options=FAST)
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)
    if tie:
        assert "model.embed_tokens.weight" in compiled[1]


def test_gemma2_soft_cap_and_tied_embedding():
    """Gemma 2: ``logits / cap -> tanh -> * cap`` between lm_head (the tied embedding) and the loss."""
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, final_logit_softcapping=5.0,
        use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    report, eager, compiled = compiled_vs_eager(model, random_batch(pad_labels=2), options=FAST)
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)


def test_peft_lora_frozen_lm_head():
    model = with_lora(tiny_model("qwen2", layers=1), ["q_proj", "v_proj"])
    report, eager, compiled = compiled_vs_eager(model, random_batch(pad_labels=2), options=FAST)
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)


def test_lora_wrapped_lm_head_is_left_alone_with_reason():
    model = with_lora(tiny_model("llama", layers=1), ["q_proj", "lm_head"])
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert report.swaps.get(NAME, 0) == 0, str(report)
    assert any(f.pattern == NAME and "lm_head" in f.reason for f in report.fallbacks), str(report)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("policy", ["keep", "detach"])
def test_keep_and_detach_return_correct_logits(policy):
    model = tiny_model("mistral", layers=1)
    batch = random_batch(pad_labels=2)
    with torch.no_grad():
        want = model(**batch).logits
    report, eager, compiled = compiled_vs_eager(model, batch, options={**FAST, "chronicals.logits": policy})
    assert report.swaps.get(NAME) == 1, str(report)
    logits = report.output.logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert logits.requires_grad == (policy == "keep")
    assert_same_training_step(eager, compiled)


def test_eval_without_grad_keeps_logits_and_explains_why():
    model = tiny_model("llama", layers=1).eval()
    batch = random_batch(pad_labels=2)
    with torch.no_grad():
        want = model(**batch)
        report = chronicals_compile.explain(copy.deepcopy(model), **batch, options=FAST)
    assert report.swaps.get(NAME, 0) == 0
    assert any(f.pattern == NAME and "no gradients" in f.reason for f in report.fallbacks), str(report)
    torch.testing.assert_close(report.output.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report.output.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_eval_with_drop_fuses_the_loss():
    model = tiny_model("llama", layers=1).eval()
    batch = random_batch(pad_labels=2)
    with torch.no_grad():
        want = model(**batch).loss
        report = chronicals_compile.explain(copy.deepcopy(model), **batch,
                                            options={**FAST, "chronicals.logits": "drop"})
    assert report.swaps.get(NAME) == 1, str(report)
    assert report.output.logits is None
    torch.testing.assert_close(report.output.loss, want, rtol=1e-5, atol=1e-6)


def test_drop_warns_once_naming_the_option():
    import chronicals_compile.passes.linear_cross_entropy as lce

    lce._warned_drop = False
    model = tiny_model("llama", layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chronicals_compile.explain(copy.deepcopy(model), **random_batch(), options=FAST)
        chronicals_compile.explain(copy.deepcopy(model), **random_batch(seed=3), options=FAST)
    ours = [w for w in caught if "chronicals.logits" in str(w.message)]
    assert len(ours) == 1


def test_recompute_mode_trains_like_eager():
    model = tiny_model("qwen2", layers=1)
    report, eager, compiled = compiled_vs_eager(model, random_batch(pad_labels=3),
                                                options={**FAST, "cce_mode": "recompute"})
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)


@pytest.mark.parametrize("mode", ["fused", "recompute", "lean"])
def test_chunk_rows_option_reaches_the_op(mode):
    """chronicals.cce_chunk_rows is an argument of the op in the graph (the CUDA launchers chunk by
    it; the CPU reference has its own chunks), so is the lean mode's backward layout, and training
    is unchanged."""
    from chronicals_compile.testing.equivalence import compile_and_capture

    model = tiny_model("qwen2", layers=1)
    batch = random_batch(pad_labels=3)
    report, graphs, out = compile_and_capture(_LossOnly(model), batch["input_ids"], batch["labels"],
                                              cce_chunk_rows=64, cce_mode=mode)
    calls = [n for g in graphs for n in g.graph.nodes
             if n.op == "call_function" and "linear_cross_entropy" in str(n.target)]
    assert len(calls) == 1, [c.args for c in calls]
    args = calls[0].args
    if mode == "fused":
        assert "fused" in str(calls[0].target) and args[-1] == 64, args
    else:  # the forward op: (..., chunk_rows, layout)
        assert "fused" not in str(calls[0].target), args
        assert args[-2:] == (64, "lean" if mode == "lean" else ""), args
    report, eager, compiled = compiled_vs_eager(model, batch, options={**FAST, "cce_chunk_rows": 64,
                                                                       "cce_mode": mode})
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)


class _BackwardOpCalls(TorchDispatchMode):
    """The arguments of every ``chronicals::linear_cross_entropy_backward`` call it sees."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "linear_cross_entropy_backward" in str(func):
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_lean_layout_reaches_the_backward_op(compiler):
    """The CPU reference ignores the layout, so training like eager cannot show that lean's layout
    survives from the forward op (where the pass writes it) to the backward op (where the CUDA
    launcher reads it); this records the backward op's arguments as the compiled model's
    backward runs."""
    torch._dynamo.reset()
    model = tiny_model("qwen2", layers=1)
    batch = random_batch(pad_labels=3)
    compiled = torch.compile(model, backend="chronicals",
                             options={"chronicals.compiler": compiler, "chronicals.cce_mode": "lean"})
    loss = compiled(**batch).loss
    with _BackwardOpCalls() as seen:
        loss.backward()
    assert len(seen.calls) == 1 and seen.calls[0][-1] == "lean", seen.calls


class _LossOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids=input_ids, labels=labels).loss


def test_dynamic_shapes_and_gradient_checkpointing():
    model = tiny_model("llama", layers=1)
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=13, pad_labels=2), options=FAST,
                                                dynamic=True)
    assert report.swaps.get(NAME) == 1, str(report)
    assert_same_training_step(eager, compiled)


def test_default_inductor_compiler():
    torch._dynamo.reset()
    model = tiny_model("qwen2", layers=1)
    batch = random_batch(pad_labels=2)
    batch["num_items_in_batch"] = _num_items(batch)
    report, eager, compiled = compiled_vs_eager(model, batch)
    assert report.swaps.get(NAME) == 1, str(report)
    assert report.output.logits is None
    assert_same_training_step(eager, compiled, rtol=1e-4, atol=1e-5)


# ---- spellings and refusals on small heads ----

class Head(nn.Module):
    """lm_head + loss written in a chosen way; returns (loss, logits) like a model output."""

    def __init__(self, kind="plain", vocab=40, hidden=16, bias=False, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(hidden, vocab, bias=bias, dtype=dtype)
        self.kind, self.vocab = kind, vocab
        self.class_weight = torch.rand(vocab)

    def forward(self, h, t):
        k, v = self.kind, self.vocab
        if k == "torch_linear_ce":
            return F.linear_cross_entropy(h.view(-1, h.shape[-1]), self.proj.weight, t.view(-1)), None
        logits = self.proj(h)
        z = logits.float()
        if k == "softcap":  # Granite-style scaling, then Gemma-style soft-cap, smoothing, sum
            z = z / 0.5
            z = z / 3.0
            z = torch.tanh(z)
            z = z * 3.0
            t = torch.where(t == -100, 7, t)  # padding spelled with another ignore_index
            return F.cross_entropy(z.view(-1, v), t.view(-1), reduction="sum", label_smoothing=0.1,
                                   ignore_index=7), logits
        if k == "weights":
            return F.cross_entropy(z.view(-1, v), t.view(-1), weight=self.class_weight), logits
        if k == "none":
            return F.cross_entropy(z.view(-1, v), t.view(-1), reduction="none"), logits
        if k == "argmax":
            return F.cross_entropy(z.view(-1, v), t.view(-1)), logits, z.argmax(-1)
        if k == "bf16_no_upcast":
            return F.cross_entropy(logits.view(-1, v), t.view(-1)), logits
        return F.cross_entropy(z.view(-1, v), t.view(-1)), logits


def _head_batch(vocab=40, hidden=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, hidden, generator=gen).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (2, 9), generator=gen)
    t[0, :3] = -100
    return h, t


def _run(kind, **kw):
    dtype = kw.get("dtype", torch.float32)
    head = Head(kind, **kw)
    h, t = _head_batch(dtype=dtype)
    twin, h2 = copy.deepcopy(head), h.detach().clone().requires_grad_(True)
    eager = head(h, t)
    report = chronicals_compile.explain(twin, h2, t, options=FAST)
    return head, twin, h, h2, eager, report


@pytest.mark.parametrize("kind", ["plain", "torch_linear_ce", "softcap"])
def test_spellings_fuse_and_match(kind):
    head, twin, h, h2, eager, report = _run(kind)
    assert report.swaps.get(NAME) == 1, str(report)
    loss = report.output[0]
    torch.testing.assert_close(loss, eager[0], rtol=1e-5, atol=1e-6)
    eager[0].backward()
    loss.backward()
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin.proj.weight.grad, head.proj.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,kw,reason", [
    ("weights", {}, "class weights"),
    ("plain", {"bias": True}, "bias"),
    ("none", {}, "reduction='none'"),
    ("argmax", {}, "also used by"),
])
def test_refusals_are_reported_and_stay_correct(kind, kw, reason):
    head, twin, h, h2, eager, report = _run(kind, **kw)
    assert report.swaps.get(NAME, 0) == 0, str(report)
    assert any(f.pattern == NAME and reason in f.reason for f in report.fallbacks), str(report)
    torch.testing.assert_close(report.output[0], eager[0])


def test_bf16_loss_without_upcast_keeps_its_dtype():
    head, twin, h, h2, eager, report = _run("bf16_no_upcast", dtype=torch.bfloat16)
    assert report.swaps.get(NAME) == 1, str(report)
    loss = report.output[0]
    assert loss.dtype == torch.bfloat16
    # ours rounds once at the end, torch rounds the logits first: compare against float64
    ref = F.cross_entropy(F.linear(h.double(), head.proj.weight.double()).view(-1, 40), _head_batch()[1].view(-1))
    assert abs(float(loss) - float(ref)) <= abs(float(eager[0]) - float(ref)) + 2e-2
