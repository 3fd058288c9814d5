"""LoRA+ groups on peft models: found by layer structure, equal to peft's where the rules coincide."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer
from torch import nn

from chronicals_compile.runtime import create_loraplus_optimizer, loraplus_param_groups
from chronicals_compile.testing.packed_models import tiny_model

LR, RATIO, EMB_LR, WD = 1e-3, 16.0, 5e-4, 0.1


def _peft(model_kwargs=None, **lora):
    base = tiny_model("llama", packed=False, **(model_kwargs or {}))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **lora))


def _assignment(groups) -> dict[int, tuple[float, float]]:
    """id(param) -> (lr, weight_decay), checking that no parameter is in two groups."""
    out: dict[int, tuple[float, float]] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out
            out[id(p)] = (g["lr"], g["weight_decay"])
    return out


def _ours(model, **kw):
    groups = loraplus_param_groups(model, LR, ratio=RATIO, embedding_lr=EMB_LR, weight_decay=WD, **kw)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assignment = _assignment(groups)
    assert set(assignment) == trainable  # every trainable parameter once, no frozen one
    return groups, assignment


def _peft_assignment(model):
    opt = peft_create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
        loraplus_lr_embedding=EMB_LR, loraplus_weight_decay=WD,
    )
    return _assignment(opt.param_groups)


def _by_name(model, assignment):
    return {n: assignment[id(p)] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        dict(target_modules=["q_proj", "v_proj", "embed_tokens"]),  # embedding adapters
        dict(target_modules=["q_proj", "v_proj"], lora_bias=True),  # biases on B
        dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),  # 2-D modules_to_save
    ],
    ids=["linears", "embedding", "lora_bias", "modules_to_save"],
)
def test_equal_to_peft_where_rules_coincide(lora):
    model = _peft(**lora)
    groups, ours = _ours(model)
    assert ours == _peft_assignment(model)
    names = _by_name(model, ours)
    for name, (lr, wd) in names.items():
        if ".lora_A." in name:
            assert (lr, wd) == (LR, WD)
        elif ".lora_B." in name:
            assert (lr, wd) == (LR * RATIO, 0.0 if name.endswith("bias") else WD)
        elif ".lora_embedding_" in name:
            assert (lr, wd) == (EMB_LR, WD)
        else:
            assert (lr, wd) == (LR, WD) and "modules_to_save" in name
    assert {g["name"] for g in groups} >= {"lora_A"}


def test_dora_magnitudes_and_trainable_norms_keep_base_rate_without_decay():
    model = _peft(target_modules=["q_proj", "v_proj"], use_dora=True)
    model.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable RMSNorm
    _, ours = _ours(model)
    theirs = _peft_assignment(model)
    names = _by_name(model, ours)
    magnitudes = [n for n in names if "lora_magnitude_vector" in n]
    assert len(magnitudes) == 4
    for name in magnitudes + ["base_model.model.model.norm.weight"]:
        assert names[name] == (LR, 0.0)
        p = dict(model.named_parameters())[name]
        assert theirs[id(p)][0] == LR * RATIO  # peft speeds up every 1-D parameter; we do not
    assert theirs[id(model.base_model.model.model.norm.weight)][1] == WD  # and peft decays RMSNorm weights


def test_modules_to_save_bias_keeps_base_rate():
    model = _peft(model_kwargs=dict(mlp_bias=True), target_modules=["q_proj"], modules_to_save=["down_proj"])
    _, ours = _ours(model)
    names = _by_name(model, ours)
    saved_bias = [n for n in names if "modules_to_save" in n and n.endswith("bias")]
    saved_weight = [n for n in names if "modules_to_save" in n and n.endswith("weight")]
    assert len(saved_bias) == len(saved_weight) == 2
    assert all(names[n] == (LR, 0.0) for n in saved_bias)
    assert all(names[n] == (LR, WD) for n in saved_weight)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.lora_B_head = nn.Linear(8, 8)  # named like a LoRA factor, but it is not one

    def forward(self, x):
        return self.lora_B_head(self.body(x))


def test_groups_come_from_layer_structure_not_names():
    model = get_peft_model(_Net(), LoraConfig(r=2, target_modules=["body"], modules_to_save=["lora_B_head"]))
    _, ours = _ours(model)
    names = _by_name(model, ours)
    head = {n: v for n, v in names.items() if "lora_B_head" in n}
    assert head and all(v[0] == LR for v in head.values())
    theirs = _peft_assignment(model)
    p = dict(model.named_parameters())["base_model.model.lora_B_head.modules_to_save.default.weight"]
    assert theirs[id(p)][0] == LR * RATIO  # a name match puts it in B


def test_fused_adamw_moves_b_ratio_times_further_than_a():
    """First AdamW step is lr * g/|g| per element: the B/A step ratio must be exactly `ratio`."""
    model = _peft(target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0, so A gets gradients
    opt = create_loraplus_optimizer(model, lr=LR, ratio=RATIO, fused=True, eps=1e-12)
    assert all(g["fused"] for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randint(1, 128, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    step = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    a = [v for n, v in step.items() if ".lora_A." in n]
    b = [v for n, v in step.items() if ".lora_B." in n]
    assert a and b
    for v in a:
        assert v == pytest.approx(LR, rel=1e-3)
    for v in b:
        assert v == pytest.approx(LR * RATIO, rel=1e-3)


def test_embedding_lr_defaults_to_base_lr_and_errors():
    model = _peft(target_modules=["embed_tokens", "q_proj"])
    groups = {g["name"]: g for g in loraplus_param_groups(model, LR)}
    assert groups["lora_embedding"]["lr"] == LR and groups["lora_B"]["lr"] == LR * 16
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        loraplus_param_groups(tiny_model("llama", packed=False), LR)
    with pytest.raises(ValueError, match="ratio"):
        loraplus_param_groups(model, LR, ratio=0)
