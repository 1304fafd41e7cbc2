"""Packing of tokenised documents into fixed-length rows.

Built on grain's `FirstFitPackIterDataset` (grain.experimental), which emits
`<feature>_segment_ids` (1, 2, ... per packed element, 0 = padding) and
`<feature>_positions` (restarting at 0 per element) and is checkpointable.

Targets and loss_mask are computed *per document before packing*: the packer
only ever moves whole (chunks of) documents, so a target can never leak into
the next document in the row, and a document split across rows keeps its true
next-token target at the chunk boundary.

Row format (all int32, shape [T] per row, [B, T] once batched):
  tokens       input ids; 0 (pad id) in padding
  targets      next token of the same document; 0 where there is none
  loss_mask    1 where targets is a real next token of the same document;
               0 on padding and on each document's final token (eos)
  segment_ids  1, 2, 3 ... per document chunk within the row; 0 = padding
  positions    0, 1, 2 ... restarting at every document chunk; 0 in padding
"""

from __future__ import annotations

from typing import Iterable, Sequence

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset, FlatMapIterDataset
from grain.experimental import FlatMapTransform

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_PACKED = ("tokens", "targets", "loss_mask")


def document_chunks(ids: Sequence[int] | np.ndarray,
                    seq_len: int) -> list[dict[str, np.ndarray]]:
    """One tokenised document -> chunks of <= seq_len with targets/loss_mask.

    Documents longer than seq_len are cut into consecutive chunks; each chunk
    becomes its own segment (positions restart at 0) because attention is
    blocked by segment and the previous chunk lives in another row.
    """
    ids = np.asarray(ids, np.int32)  # [L]
    if ids.size == 0:
        return []
    targets = np.zeros_like(ids)  # [L]
    targets[:-1] = ids[1:]
    loss_mask = np.ones_like(ids)  # [L]
    loss_mask[-1] = 0  # Last token's "next" would belong to another document.
    return [
        {"tokens": ids[s:s + seq_len], "targets": targets[s:s + seq_len],
         "loss_mask": loss_mask[s:s + seq_len]}
        for s in range(0, ids.size, seq_len)
    ]


class ChunkDocuments(FlatMapTransform):
    """grain FlatMap: token-id array -> list of chunk dicts (document_chunks)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        # Only consulted by MapDataset flat-maps; iterator flat-maps are unbounded.
        self.max_fan_out = 1 << 20

    def flat_map(self, element):
        return document_chunks(element, self.seq_len)


def _finalize_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: row[k].astype(np.int32) for k in _PACKED}  # [T] each
    out["segment_ids"] = row["tokens_segment_ids"].astype(np.int32)  # [T]
    out["positions"] = row["tokens_positions"].astype(np.int32)  # [T]
    return out


def pack_dataset(ds: grain.IterDataset, seq_len: int, *,
                 num_packing_bins: int = 1, seed: int = 0
                 ) -> grain.IterDataset:
    """IterDataset of token-id arrays [L] -> IterDataset of packed rows [T].

    num_packing_bins=1 is plain greedy packing (a row is emitted as soon as the
    next document does not fit). More bins means less padding: the packer
    keeps that many rows open and places each document into the first row
    with room (first-fit). Either way the output is deterministic.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if num_packing_bins < 1:
        raise ValueError(f"num_packing_bins must be >= 1, got {num_packing_bins}")
    chunks = FlatMapIterDataset(ds, ChunkDocuments(seq_len))
    packed = FirstFitPackIterDataset(
        chunks,
        length_struct={k: seq_len for k in _PACKED},
        num_packing_bins=num_packing_bins,
        seed=seed,
        # Documents are shuffled upstream; keeping bin order makes packing a
        # pure function of the document stream (easy to test and reason about).
        shuffle_bins=False,
    )
    return packed.map(_finalize_row)


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, *,
                   num_packing_bins: int = 1) -> list[dict[str, np.ndarray]]:
    """Eagerly packs in-memory documents (same algorithm as pack_dataset)."""
    arrays = [np.asarray(d, np.int32) for d in docs]
    ds = grain.MapDataset.source(arrays).to_iter_dataset(
        grain.ReadOptions(num_threads=0))
    return list(pack_dataset(ds, seq_len, num_packing_bins=num_packing_bins))


def stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
               seq_len: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch [batch_size, T], zero-padding missing rows.

    Zero rows have segment_ids == 0 and loss_mask == 0, so they are inert.
    """
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit batch_size={batch_size}")
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ROW_KEYS}
    for i, row in enumerate(rows):
        for k in ROW_KEYS:
            batch[k][i] = row[k]  # [T]
    return batch
