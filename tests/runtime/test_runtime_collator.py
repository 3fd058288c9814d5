"""PackingCollator / PackedDataset: the exact batch layout, HF-compatible keys, every token once."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from transformers import DataCollatorWithFlattening

from chronicals_compile.runtime import PackedDataset, PackingCollator


def test_documents_flatten_into_one_bucketed_row():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    batch = PackingCollator(bucket_multiple=4, pad_token_id=0)(docs)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, 32, 33, 34, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12]  # the padding tail is its own segment
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_k"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 4 and type(batch["max_length_q"]) is int
    assert batch["num_items_in_batch"].item() == 2 + 1 + 3
    assert all(v.device.type == "cpu" for v in batch.values() if isinstance(v, torch.Tensor))


def test_default_bucket_is_128_and_max_length_caps_it():
    docs = [list(range(1, 101)), list(range(1, 51))]
    assert PackingCollator()(docs)["input_ids"].shape == (1, 256)
    assert PackingCollator(max_length=200)(docs)["input_ids"].shape == (1, 200)
    with pytest.raises(ValueError, match="more than max_length=100"):
        PackingCollator(max_length=100)(docs)


def test_matches_transformers_flattening_collator_without_padding():
    """Same keys and values as DataCollatorWithFlattening(return_flash_attn_kwargs=True)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, n).tolist() for n in (5, 17, 1, 9)]
    ours = PackingCollator(bucket_multiple=1, return_num_items_in_batch=False)([{"input_ids": d} for d in docs])
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    assert ours.keys() == theirs.keys()
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            assert torch.equal(ours[key], theirs[key]), key
            assert ours[key].dtype == theirs[key].dtype, key
        else:
            assert ours[key] == theirs[key], key


def test_given_labels_are_kept_and_first_label_masked():
    feats = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},  # prompt-masked
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
    ]
    batch = PackingCollator(bucket_multiple=8)(feats)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, -100, 10, 11, -100]]
    # what HF Trainer counts for a shifting causal-LM loss
    assert batch["num_items_in_batch"].item() == (batch["labels"][..., 1:] != -100).sum().item() == 4


def test_rows_of_packs_and_flattened_boundaries():
    packs = [{"input_ids": [[1, 2, 3], [4, 5]]}, {"input_ids": [[6, 7, 8, 9, 10, 11]]}]
    batch = PackingCollator(bucket_multiple=4)(packs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 11, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 8, 14, 16]
    assert batch["max_length_q"] == 6
    assert batch["num_items_in_batch"].item() == 2 + 1 + 5
    with pytest.raises(ValueError, match="2 documents but 1 label lists"):
        PackingCollator()([{"input_ids": [[1, 2], [3, 4]], "labels": [[1, 2]]}])
    with pytest.raises(ValueError, match="all packs or all single documents"):
        PackingCollator()([{"input_ids": [[1, 2]]}, {"input_ids": [1, 2]}])


def _tokens_by_document(dataset: PackedDataset) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for b, item in zip(dataset.bins, dataset):
        for piece_id, ids in zip([p for p in b if dataset.pieces[p].length], item["input_ids"]):
            piece = dataset.pieces[piece_id]
            seen.setdefault(piece.seq, []).append((piece.start, ids))
    return {seq: [t for _, ids in sorted(parts) for t in ids] for seq, parts in seen.items()}


@pytest.mark.parametrize("kind", ["lists", "tensors", "dicts", "hf_dataset"])
def test_packed_dataset_keeps_every_token_once(kind):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 1000, n).tolist() for n in rng.integers(1, 90, 60)] + [list(range(1, 251))]
    labels = [[-100] + d[1:] for d in docs]
    data = {
        "lists": docs,
        "tensors": [torch.tensor(d) for d in docs],
        "dicts": [{"input_ids": d, "labels": l} for d, l in zip(docs, labels)],
        "hf_dataset": datasets.Dataset.from_dict({"input_ids": docs, "labels": labels}),
    }[kind]
    ds = PackedDataset(data, capacity=128)  # the 250-token document is split into 128 + 122
    assert _tokens_by_document(ds) == dict(enumerate(docs))
    assert all(sum(len(x) for x in item["input_ids"]) <= 128 for item in ds)
    assert ("labels" in ds[0]) == (kind in ("dicts", "hf_dataset"))
    report = ds.report(bucket_multiple=64)
    assert report.num_sequences == 61 and report.split_sequences == 1
    assert report.real_tokens == sum(map(len, docs))
    assert report.efficiency > 0.9
    assert report.padded_efficiency <= 1.0 and report.padded_tokens % 64 == 0

    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=PackingCollator(bucket_multiple=64))
    total_valid = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] in (64, 128)
        assert batch["cu_seq_lens_q"][-1].item() == batch["input_ids"].numel()
        total_valid += batch["num_items_in_batch"].item()
    n_pieces = len(ds.pieces)
    expected = sum(len(d) for d in docs) - n_pieces  # every piece's first label is masked
    if kind in ("dicts", "hf_dataset"):
        expected = sum(len(d) - 1 for d in docs) - (n_pieces - len(docs))  # the given label[0] is -100 already
    assert total_valid == expected


def test_packed_dataset_overflow_error_and_truncate():
    docs = [[1] * 10, [2] * 30]
    with pytest.raises(ValueError, match="exceed the capacity"):
        PackedDataset(docs, capacity=16, overflow="error")
    ds = PackedDataset(docs, capacity=16, overflow="truncate")
    assert sorted(len(x) for item in ds for x in item["input_ids"]) == [10, 16]
    assert ds.report().truncated_tokens == 14
