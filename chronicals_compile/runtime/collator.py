"""Packed training batches: BFD packs in, transformers' flattening kwargs out.

``PackedDataset`` runs ``pack_bfd`` once over the whole corpus (packing needs
the global view; a per-batch collator only sees a handful of documents) and
yields one pack per item. ``PackingCollator`` turns packs, or plain documents,
into tensors whose keys are the ones ``DataCollatorWithFlattening`` uses, so
any attention backend that understands them (ours, flash_attention_2) works.

Batch layout (all built on the host, nothing to sync on the device):

* ``input_ids``/``labels``/``position_ids``: ``[B, T]`` int64, one pack per row
  (a list of single documents becomes one ``[1, T]`` row). ``T`` is the longest
  row rounded up to ``bucket_multiple`` so a compiled step sees a handful of
  shapes instead of one per batch.
* ``labels``: the first label of every document and all padding are ``-100``.
  ``ForCausalLMLoss`` shifts left, so position ``t`` is scored on label
  ``t + 1``: masking each document's first label is what stops the previous
  document's last token from being trained to predict across the boundary.
* ``position_ids`` restart at 0 per document (and per padding tail).
* ``cu_seq_lens_q/k``: int32 boundaries over the ``B * T`` flattened tokens; each
  row's padding tail is its own segment, so no document attends to padding and
  the boundaries always end at ``B * T`` (what varlen kernels expect).
* ``max_length_q/k``: python ints (the longest segment).
* ``num_items_in_batch``: 0-d int64, the labels the shifted loss will score.
  HF Trainer recomputes the same number (over ``labels[..., 1:]``) and sums
  it across gradient-accumulation micro-batches, overriding this one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .packing import Overflow, Piece, PackingReport, pack_bfd, packing_report, split_into_pieces

IGNORE_INDEX = -100

__all__ = ["PackedDataset", "PackingCollator", "round_up"]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def _to_list(x: Any) -> list[int]:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    return list(x)


class _Source:
    """Uniform random access to (input_ids, labels | None) over the accepted inputs."""

    def __init__(self, data: Any, labels: Sequence[Any] | None) -> None:
        self.data = data
        self.labels = labels
        self.is_hf = hasattr(data, "column_names") and hasattr(data, "select")
        if self.is_hf:
            if "input_ids" not in data.column_names:
                raise ValueError("the datasets.Dataset needs an 'input_ids' column")
            self.has_labels = "labels" in data.column_names
        else:
            first = data[0] if len(data) > 0 else None
            self.has_labels = labels is not None or (isinstance(first, Mapping) and "labels" in first)
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"{len(labels)} label sequences for {len(data)} input sequences")

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> np.ndarray:
        if self.is_hf:
            return np.fromiter((len(x) for x in self.data["input_ids"]), dtype=np.int64, count=len(self.data))
        return np.fromiter((len(self._ids(x)) for x in self.data), dtype=np.int64, count=len(self.data))

    @staticmethod
    def _ids(item: Any) -> Any:
        return item["input_ids"] if isinstance(item, Mapping) else item

    def get(self, i: int) -> tuple[list[int], list[int] | None]:
        item = self.data[i]
        ids = _to_list(self._ids(item))
        if self.labels is not None:
            lab = _to_list(self.labels[i])
        elif isinstance(item, Mapping) and item.get("labels") is not None:
            lab = _to_list(item["labels"])
        else:
            lab = None
        if lab is not None and len(lab) != len(ids):
            raise ValueError(f"sequence {i}: {len(ids)} input_ids but {len(lab)} labels")
        return ids, lab


class PackedDataset(torch.utils.data.Dataset):
    """Documents packed into rows of at most ``capacity`` tokens by Best-Fit-Decreasing.

    ``data`` is a sequence of token-id sequences (lists, tensors, arrays), a
    sequence of ``{"input_ids", "labels"?}`` mappings, or a ``datasets.Dataset``
    with an ``input_ids`` column and optionally ``labels``. Item ``i`` is
    ``{"input_ids": [[...], ...], "labels": [[...], ...]}``, one inner list per
    document piece (``labels`` absent when the data has none; the collator then
    uses the input ids). ``bins`` and ``pieces`` expose the packing for
    inspection; ``report()`` its efficiency.
    """

    def __init__(
        self,
        data: Any,
        capacity: int,
        *,
        labels: Sequence[Any] | None = None,
        overflow: Overflow = "split",
    ) -> None:
        self._source = _Source(data, labels)
        self.capacity = capacity
        self.overflow = overflow
        self.lengths = self._source.lengths()
        self.pieces: list[Piece] = split_into_pieces(self.lengths, capacity, overflow)
        self.bins: list[list[int]] = pack_bfd(self.lengths, capacity, overflow=overflow)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, list[list[int]]]:
        ids_out: list[list[int]] = []
        labels_out: list[list[int]] = []
        cache: dict[int, tuple[list[int], list[int] | None]] = {}
        for piece_id in self.bins[index]:
            piece = self.pieces[piece_id]
            if piece.length == 0:
                continue
            if piece.seq not in cache:
                cache[piece.seq] = self._source.get(piece.seq)
            ids, lab = cache[piece.seq]
            ids_out.append(ids[piece.start : piece.end])
            if self._source.has_labels:  # a document without labels trains on all its tokens
                labels_out.append((ids if lab is None else lab)[piece.start : piece.end])
        item = {"input_ids": ids_out}
        if self._source.has_labels:
            item["labels"] = labels_out
        return item

    def report(self, bucket_multiple: int | None = None) -> PackingReport:
        """Efficiency of the packing; with ``bucket_multiple``, also of rows padded one per batch."""
        padded = None
        if bucket_multiple:
            piece_len = np.fromiter((p.length for p in self.pieces), dtype=np.int64, count=len(self.pieces))
            padded = sum(round_up(int(piece_len[b].sum()), bucket_multiple) for b in self.bins)
        return packing_report(self.lengths, self.bins, self.capacity, overflow=self.overflow, padded_tokens=padded)


class PackingCollator:
    """Collate packs (or plain documents) into flattened, document-aware batches.

    A feature whose ``input_ids`` is a list of sequences is one pack -> one row.
    A feature whose ``input_ids`` is a flat sequence is one document; a batch of
    documents is concatenated into a single row (like HF's flattening collator).
    Rows longer than ``max_length`` raise rather than truncate silently.
    """

    def __init__(
        self,
        *,
        pad_token_id: int = 0,
        bucket_multiple: int = 128,
        max_length: int | None = None,
        return_num_items_in_batch: bool = True,
    ) -> None:
        if bucket_multiple < 1:
            raise ValueError("bucket_multiple must be >= 1")
        self.pad_token_id = pad_token_id
        self.bucket_multiple = bucket_multiple
        self.max_length = max_length
        self.return_num_items_in_batch = return_num_items_in_batch

    @staticmethod
    def _is_pack(ids: Any) -> bool:
        if isinstance(ids, torch.Tensor):
            return ids.dim() > 1
        if isinstance(ids, np.ndarray):
            return ids.ndim > 1
        return len(ids) > 0 and not isinstance(ids[0], (int, np.integer)) and not (
            isinstance(ids[0], torch.Tensor) and ids[0].dim() == 0
        )

    def _rows(self, features: Sequence[Any]) -> list[list[tuple[list[int], list[int] | None]]]:
        def doc(ids: Any, lab: Any) -> tuple[list[int], list[int] | None]:
            ids, lab = _to_list(ids), (None if lab is None else _to_list(lab))
            if lab is not None and len(lab) != len(ids):
                raise ValueError(f"document has {len(ids)} input_ids but {len(lab)} labels")
            return ids, lab

        feats = [f if isinstance(f, Mapping) else {"input_ids": f} for f in features]
        if not feats:
            raise ValueError("PackingCollator received an empty batch")
        if all(self._is_pack(f["input_ids"]) for f in feats):
            rows = []
            for f in feats:
                labs = f.get("labels")
                labs = [None] * len(f["input_ids"]) if labs is None else labs
                if len(labs) != len(f["input_ids"]):
                    raise ValueError(f"a pack has {len(f['input_ids'])} documents but {len(labs)} label lists")
                rows.append([doc(i, l) for i, l in zip(f["input_ids"], labs)])
            return rows
        if any(self._is_pack(f["input_ids"]) for f in feats):
            raise ValueError("a batch must be all packs or all single documents")
        return [[doc(f["input_ids"], f.get("labels")) for f in feats]]

    def __call__(self, features: Sequence[Any]) -> dict[str, Any]:
        rows = [[(ids, lab) for ids, lab in row if len(ids) > 0] for row in self._rows(features)]
        longest = max(sum(len(ids) for ids, _ in row) for row in rows)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(
                f"a row holds {longest} tokens, more than max_length={self.max_length}; pack with "
                "PackedDataset(capacity=max_length) or raise max_length"
            )
        width = max(1, round_up(longest, self.bucket_multiple))
        if self.max_length is not None:
            width = min(width, max(self.max_length, longest))

        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((len(rows), width), dtype=np.int64)
        cu = [0]
        for r, row in enumerate(rows):
            offset = 0
            for ids, lab in row:
                n = len(ids)
                input_ids[r, offset : offset + n] = ids
                labels[r, offset : offset + n] = ids if lab is None else lab
                labels[r, offset] = IGNORE_INDEX
                position_ids[r, offset : offset + n] = np.arange(n)
                offset += n
                cu.append(r * width + offset)
            if offset < width:  # padding tail: its own segment
                position_ids[r, offset:] = np.arange(width - offset)
                cu.append((r + 1) * width)
        seg = np.diff(cu)
        max_len = int(seg.max())
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32),
            "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
        if self.return_num_items_in_batch:
            batch["num_items_in_batch"] = torch.tensor(int((labels[:, 1:] != IGNORE_INDEX).sum()))
        return batch
