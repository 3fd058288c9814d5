"""No document sees another: perturbation tests with teeth, and the non-packed paths stay correct."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from chronicals_compile.runtime import (
    ATTN_IMPLEMENTATION,
    PackingCollator,
    enable_packed_attention,
    warn_if_cache_in_training,
)
from chronicals_compile.testing.packed_models import VOCAB, random_docs, tiny_model

SPANS = [(0, 20), (20, 35), (35, 60)]  # documents A, B, C in one row


def _naive_dense_causal(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What packing without document masking does: plain causal attention over the whole row."""
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_naive_dense_causal", _naive_dense_causal)


def _logits(model, docs):
    with torch.no_grad():
        return model(**PackingCollator(bucket_multiple=64)(docs)).logits[0]


def _perturb(doc: list[int]) -> list[int]:
    return [(t * 7 + 3) % (VOCAB - 1) + 1 for t in doc]


@pytest.mark.parametrize("victim", [0, 1])
def test_perturbing_one_document_leaves_the_others_bitwise_unchanged(victim):
    docs = random_docs([e - s for s, e in SPANS], seed=10)
    model = tiny_model("llama")
    before = _logits(model, docs)
    changed = list(docs)
    changed[victim] = _perturb(docs[victim])
    after = _logits(model, changed)
    s, e = SPANS[victim]
    assert (after[s:e] - before[s:e]).abs().max() > 1e-2  # the perturbation does something
    for i, (s, e) in enumerate(SPANS):
        if i != victim:
            torch.testing.assert_close(after[s:e], before[s:e], rtol=0, atol=0)


def test_naive_dense_causal_attention_does_leak():
    """The same check fails for attention that ignores document boundaries: the test has teeth."""
    docs = random_docs([e - s for s, e in SPANS], seed=10)
    model = tiny_model("llama")
    model.set_attn_implementation("test_naive_dense_causal")
    before = _logits(model, docs)
    after = _logits(model, [_perturb(docs[0]), docs[1], docs[2]])
    for s, e in SPANS[1:]:
        assert (after[s:e] - before[s:e]).abs().max() > 1e-3


def test_no_gradient_flows_between_documents():
    docs = random_docs([e - s for s, e in SPANS], seed=11)
    batch = PackingCollator(bucket_multiple=64)(docs)
    model = tiny_model("qwen2")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "num_items_in_batch")}
    logits = model(inputs_embeds=embeds, **rest).logits
    s, e = SPANS[2]
    F.cross_entropy(logits[0, s : e - 1], batch["input_ids"][0, s + 1 : e]).backward()
    grad_norm_per_token = embeds.grad[0].norm(dim=-1)
    assert torch.all(grad_norm_per_token[:s] == 0)  # documents A and B get nothing from C's loss
    assert torch.all(grad_norm_per_token[s : e - 1] > 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_ordinary_padded_batch_matches_sdpa(side):
    """Without packing metadata (a normal padded batch with attention_mask) the fallback equals stock sdpa."""
    docs = random_docs([19, 11], seed=12)
    width = 19
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, d in enumerate(docs):
        sl = slice(0, len(d)) if side == "right" else slice(width - len(d), width)
        ids[r, sl] = torch.tensor(d)
        mask[r, sl] = 1
    ours, ref = tiny_model("mistral"), tiny_model("mistral", packed=False)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_generation_with_cache_matches_sdpa():
    """Decode steps (queries shorter than keys, left padding) use the offset-causal fallback."""
    docs = random_docs([9, 5], seed=13)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for r, d in enumerate(docs):
        ids[r, 9 - len(d) :] = torch.tensor(d)
        mask[r, 9 - len(d) :] = 1
    ours, ref = tiny_model("llama").eval(), tiny_model("llama", packed=False).eval()
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=mask, **kwargs)
        want = ref.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-4)


def test_enable_packed_attention_sets_implementation_and_turns_cache_off():
    model = tiny_model("llama", packed=False, use_cache=True)
    assert model.config.use_cache
    assert enable_packed_attention(model) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert all(
        m.config._attn_implementation == ATTN_IMPLEMENTATION for m in model.modules() if hasattr(m, "config")
    )
    assert model.config.use_cache is False
    x = torch.randint(1, VOCAB, (1, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=x, use_cache=True)  # explicit request in training: warned by the installed hook
        enable_packed_attention(model)  # idempotent: no second hook
        model(input_ids=x, use_cache=True)
    assert sum("use_cache=True" in str(w.message) for w in caught) == 1


def test_warn_if_cache_in_training_warns_once_and_only_in_training():
    model = tiny_model("llama", packed=False, use_cache=False)
    handle = warn_if_cache_in_training(model)
    x = torch.randint(1, VOCAB, (1, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=x, use_cache=False)
        model.eval()
        model(input_ids=x, use_cache=True)  # inference: fine
        model.train()
        model(input_ids=x, use_cache=True)
        model(input_ids=x, use_cache=True)
    cache_warnings = [w for w in caught if "use_cache=True" in str(w.message)]
    assert len(cache_warnings) == 1
    handle.remove()
