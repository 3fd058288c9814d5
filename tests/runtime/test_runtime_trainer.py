"""HF Trainer end to end on CPU: LoRA+ optimizer, packed dataset and collator, chronicals_varlen attention."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from chronicals_compile.runtime import PackedDataset, PackingCollator, create_loraplus_optimizer, enable_packed_attention
from chronicals_compile.testing.packed_models import VOCAB, tiny_model


def _documents(n: int = 96) -> list[list[int]]:
    """Learnable data: each document counts upward (mod vocab) from a random start, random length."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(1, VOCAB, (n,), generator=g).tolist()
    lengths = torch.randint(8, 60, (n,), generator=g).tolist()
    return [[(s + i) % (VOCAB - 1) + 1 for i in range(length)] for s, length in zip(starts, lengths)]


class _Recorder(TrainerCallback):
    def __init__(self):
        self.grad_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        self.grad_norms.append(torch.stack([g.norm() for g in grads if g is not None]).norm().item())


def test_trainer_with_loraplus_and_packing(tmp_path):
    model = tiny_model("llama", packed=False, use_cache=True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                   "gate_proj", "up_proj", "down_proj"]))
    enable_packed_attention(model)
    base = model.get_base_model()
    assert base.config._attn_implementation == "chronicals_varlen" and base.config.use_cache is False

    dataset = PackedDataset(_documents(), capacity=128)
    collator = PackingCollator(bucket_multiple=64)
    assert dataset.report().efficiency > 0.9

    seen: list[dict] = []

    def record(module, args, kwargs):
        seen.append({"labels": kwargs["labels"].clone(), "n": kwargs.get("num_items_in_batch"),
                     "cu": kwargs.get("cu_seq_lens_q")})

    handle = base.register_forward_pre_hook(record, with_kwargs=True)
    optimizer = create_loraplus_optimizer(model, lr=3e-3, ratio=16.0)
    recorder = _Recorder()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=12, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        lr_scheduler_type="constant", dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      optimizers=(optimizer, None), callbacks=[recorder])
    trainer.train()
    handle.remove()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses  # it learns
    assert len(recorder.grad_norms) == 12 and all(g > 0 for g in recorder.grad_norms)
    # LoRA+ ratios survive Trainer's scheduler
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["lora_B"] == 16.0 * lrs["lora_A"]
    # num_items_in_batch: the packing metadata reached the model, and the loss was normalised by the valid
    # (shifted) labels of both accumulated micro-batches, i.e. per token of the optimizer step.
    assert len(seen) == 24 and all(s["cu"] is not None for s in seen)
    for first, second in zip(seen[0::2], seen[1::2]):
        expected = sum((s["labels"][..., 1:] != -100).sum() for s in (first, second))
        assert int(first["n"]) == int(second["n"]) == int(expected)
