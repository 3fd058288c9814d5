"""The QK-RoPE pass: transformers' apply_rotary_pos_emb and its variants (GQA, partial rotary,
fp32 cos with bf16 q, per-batch positions), refusals, and the tiny families with peft LoRA,
gradient checkpointing, dynamic shapes and (once) the default Inductor compiler."""
import operator

import pytest
import torch
import torch.nn as nn

from chronicals_compile.runtime import enable_activation_checkpointing
from chronicals_compile.testing import ALL_PROJECTIONS, random_batch, tiny_model, with_lora
from chronicals_compile.testing.equivalence import (assert_same_training_step, compile_and_capture,
                                                      compiled_vs_eager)
from chronicals_compile.verify import rope as rope_case

FAST = {"compiler": "aot_eager"}
LAYERS = 2




def rope_nodes(graphs):
    return [n for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.target is torch.ops.chronicals.rope.default]


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_chunk(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2.neg(), x1), dim=-1)


class Attention(nn.Module):
    """The q/k half of an HF attention block: projections, view/transpose, then a rotary variant."""

    def __init__(self, variant: str = "hf", hq: int = 4, hk: int = 2, head_dim: int = 8,
                 hidden: int = 16, rotary_dim: int | None = None, cos_dtype=None):
        super().__init__()
        self.variant, self.hq, self.hk, self.d = variant, hq, hk, head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.cos_dtype = cos_dtype
        self.cos_round = None  # a float64 twin rounds cos/sin through the original's dtype
        self.q_proj = nn.Linear(hidden, hq * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, hk * head_dim, bias=False)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.rotary_dim, 2).float() / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.freq_scale = nn.Parameter(torch.ones(())) if variant == "cos_grad" else None

    def cos_sin(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        if self.freq_scale is not None:
            freqs = freqs * self.freq_scale
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.cos_dtype or x.dtype
        cos, sin = emb.cos(), emb.sin()
        if self.cos_round is not None:
            cos, sin = cos.to(self.cos_round), sin.to(self.cos_round)
        return cos.to(dtype), sin.to(dtype)

    def forward(self, x, position_ids):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.d).transpose(1, 2)
        cos, sin = self.cos_sin(x, position_ids)
        v = self.variant
        if v in ("hf", "cos_grad"):
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        elif v == "spelled":  # reversed operands everywhere, chunked rotate_half
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = sin * rotate_half_chunk(q) + cos * q
            k = k * cos + rotate_half(k) * sin
        elif v == "partial":
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            r = self.rotary_dim
            q_rot, q_pass = q[..., :r], q[..., r:]
            k_rot, k_pass = k[..., :r], k[..., r:]
            q = torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)
            k = torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)
        elif v == "lone":
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
        elif v == "reused":
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            rq = rotate_half(q)
            q, k = q * cos + rq * sin + 0 * rq.sum(), k * cos + rotate_half(k) * sin
        elif v == "bshd":  # rotate before the transpose, unsqueeze_dim=2
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            raise ValueError(v)
        return q, k


def run(module, x, pos, **options):
    report, graphs, (q, k) = compile_and_capture(module, x, pos, **options)
    return report, graphs, q, k


def assert_same_as_eager(module, x, pos, q, k, rtol=1e-5, atol=1e-6):
    def grads(qo, ko):
        loss = (qo.float() * wq).sum() + (ko.float() * wk).sum()
        return torch.autograd.grad(loss, [x, *[p for p in module.parameters() if p.requires_grad]])

    qe, ke = module(x, pos)
    assert q.dtype == qe.dtype and k.dtype == ke.dtype
    torch.testing.assert_close(q, qe, rtol=rtol, atol=atol)
    torch.testing.assert_close(k, ke, rtol=rtol, atol=atol)
    gen = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(qe.shape, generator=gen), torch.randn(ke.shape, generator=gen)
    for gc, ge in zip(grads(q, k), grads(qe, ke)):
        torch.testing.assert_close(gc, ge, rtol=rtol, atol=atol)


def assert_as_close_to_float64_as_eager(module, x, pos, q, k):
    """Half precision: eager rounds q*cos, rot*sin and their sum (and each gradient term)
    separately, we round once; so compare both to a float64 twin with the project's rule."""
    import copy

    from chronicals_compile.verify.tolerance import assert_all_ok, measure

    twin = copy.deepcopy(module).double()
    twin.cos_round = module.cos_dtype or x.dtype
    gen = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(q.shape, generator=gen).double(), torch.randn(k.shape, generator=gen).double()

    def run_grads(mod, xx, qo, ko):
        loss = (qo.double() * wq).sum() + (ko.double() * wk).sum()
        return torch.autograd.grad(loss, [xx, *mod.parameters()])

    qe, ke = module(x, pos)
    x64 = x.detach().double().requires_grad_(True)
    qr, kr = twin(x64, pos)
    assert q.dtype == qe.dtype and k.dtype == ke.dtype
    # The rotation itself is elementwise: the elementwise rule applies.
    assert_all_ok([measure("q_out", q, qe, qr, dtype=torch.bfloat16),
                   measure("k_out", k, ke, kr, dtype=torch.bfloat16)])
    # Gradients of x and the projection weights are sums over tokens of rounded terms: compare
    # the relative error in norm, ours against eager's (elementwise, the two rounding patterns
    # win and lose by chance).
    names = ["dx", *(n for n, _ in module.named_parameters())]
    for name, o, e, r in zip(names, run_grads(module, x, q, k), run_grads(module, x, qe, ke),
                             run_grads(twin, x64, qr, kr)):
        err_ours = float((o.double() - r).norm() / r.norm())
        err_eager = float((e.double() - r).norm() / r.norm())
        assert err_ours <= 1.25 * err_eager + 1e-4, (name, err_ours, err_eager)


def inputs(batch=2, seq=5, hidden=16, dtype=torch.float32, per_batch_positions=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, hidden, generator=gen).to(dtype).requires_grad_(True)
    if per_batch_positions:
        pos = torch.stack([torch.arange(seq) + 3 * i for i in range(batch)])
    else:
        pos = torch.arange(seq)[None]
    return x, pos


@pytest.mark.parametrize("variant, kw", [
    ("hf", {}),
    ("hf", {"hq": 6, "hk": 1}),                      # GQA 6:1
    ("hf", {"hq": 2, "hk": 2, "head_dim": 80}),      # MHA, head dim 80
    ("spelled", {}),
    ("partial", {"head_dim": 12, "rotary_dim": 8}),  # partial rotary: exact, the outer cat stays
])
def test_variant_is_swapped_once_and_exact(variant, kw):
    torch.manual_seed(0)
    module = Attention(variant, **kw)
    x, pos = inputs(hidden=16, per_batch_positions=variant == "hf")
    report, graphs, q, k = run(module, x, pos)
    assert report.swaps.get("rope") == 1, str(report)
    (node,) = rope_nodes(graphs)
    getitems = list(node.users)
    assert len(getitems) == 2 and all(u.target is operator.getitem for u in getitems)
    assert all("example_value" in u.meta for u in getitems)
    assert_same_as_eager(module, x, pos, q, k)


def test_fp32_cos_with_bf16_q_promotes_like_torch():
    """cos/sin fp32 and q bf16: torch's q*cos is fp32, so the rotated q must be fp32 too."""
    torch.manual_seed(0)
    module = Attention("hf", cos_dtype=torch.float32).to(torch.bfloat16)
    x, pos = inputs(dtype=torch.bfloat16)
    report, graphs, q, k = run(module, x, pos)
    assert report.swaps.get("rope") == 1, str(report)
    assert q.dtype == k.dtype == torch.float32
    assert_as_close_to_float64_as_eager(module, x, pos, q, k)


def test_bf16_everywhere_rounds_once():
    torch.manual_seed(0)
    module = Attention("hf").to(torch.bfloat16)
    x, pos = inputs(dtype=torch.bfloat16)
    report, graphs, q, k = run(module, x, pos)
    assert report.swaps.get("rope") == 1, str(report)
    assert q.dtype == torch.bfloat16
    assert_as_close_to_float64_as_eager(module, x, pos, q, k)


@pytest.mark.parametrize("variant, reason", [
    ("cos_grad", "cos/sin require grad"),
    ("lone", "no partner"),
    ("reused", "rotate_half(x) has 2 users"),
    ("bshd", "does not broadcast over heads"),
])
def test_refusals_are_reported_and_leave_the_graph_alone(variant, reason):
    torch.manual_seed(0)
    module = Attention(variant)
    x, pos = inputs()
    report, graphs, q, k = run(module, x, pos)
    assert report.swaps.get("rope", 0) == 0, str(report)
    fallbacks = [f for f in report.fallbacks if f.pattern == "rope"]
    assert any(reason in f.reason for f in fallbacks), str(report)
    assert not rope_nodes(graphs)
    assert_same_as_eager(module, x, pos, q, k)


def test_graph_inputs_straight_into_the_rotation():
    """q, k, cos, sin all graph inputs (placeholders), another input after them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def f(q, k, cos, sin, scale):
        q_out, k_out = apply_rotary_pos_emb(q, k, cos, sin)
        return q_out * scale, k_out * scale

    q, k, cos, sin, *_ = rope_case.make_inputs(2, 5, 1, 3, 8, torch.float32)
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    cos, sin, scale = cos.squeeze(1), sin.squeeze(1), torch.tensor(2.0)
    report, graphs, (q_out, k_out) = compile_and_capture(f, q, k, cos, sin, scale)
    assert report.swaps.get("rope") == 1, str(report)
    ref_q, ref_k = f(q, k, cos, sin, scale)
    torch.testing.assert_close(q_out, ref_q)
    torch.testing.assert_close(k_out, ref_k)
    (g1, g2), (r1, r2) = (torch.autograd.grad((o1.sum() + o2.sum()), (q, k)) for o1, o2 in
                          ((q_out, k_out), (ref_q, ref_k)))
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)


def test_disable_leaves_rope_to_inductor():
    module = Attention("hf")
    x, pos = inputs()
    report, graphs, q, k = run(module, x, pos, disable=["rope"])
    assert report.swaps.get("rope", 0) == 0 and not rope_nodes(graphs)


def test_dynamic_shapes_module():
    torch.manual_seed(0)
    module = Attention("hf")
    x, pos = inputs(batch=3, seq=7)
    report, graphs, (q, k) = compile_and_capture(module, x, pos, dynamic=True)
    assert report.swaps.get("rope") == 1, str(report)
    assert_same_as_eager(module, x, pos, q, k)


# --- whole models ---------------------------------------------------------------------------

def assert_counts(report):
    assert report.swaps.get("rope") == LAYERS, str(report)
    assert report.swaps.get("swiglu") == LAYERS, str(report)
    assert report.swaps.get("rms_norm") == 2 * LAYERS + 1, str(report)
    assert not [f for f in report.fallbacks if f.pattern in ("swiglu", "rope")], str(report)


def test_peft_lora_on_every_projection():
    model = with_lora(tiny_model("mistral", layers=LAYERS), ALL_PROJECTIONS, b_std=0.05)
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert_counts(report)
    assert_same_training_step(eager, compiled)


def test_gradient_checkpointing():
    model = tiny_model("qwen2", layers=LAYERS)
    enable_activation_checkpointing(model)
    model.train()
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert_counts(report)
    assert_same_training_step(eager, compiled)


def test_dynamic_shapes_model():
    model = tiny_model("llama", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(seq=11), options=FAST, dynamic=True)
    assert_counts(report)
    assert_same_training_step(eager, compiled)


def test_default_inductor_compiler():
    model = tiny_model("qwen2", layers=LAYERS)
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options={})
    assert_counts(report)
    assert_same_training_step(eager, compiled)


def test_phi3_fused_projections_and_partial_rotary():
    """Phi-3: q/k sliced out of one fused qkv projection, half the head dim rotated, gate and up
    split from one fused projection: all matched in place."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, use_cache=False, partial_rotary_factor=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    report, eager, compiled = compiled_vs_eager(model, random_batch(), options=FAST)
    assert_counts(report)
    assert_same_training_step(eager, compiled)
