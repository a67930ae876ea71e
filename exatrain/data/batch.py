"""The batch the loaders produce and the engines consume, and how a step splits it into micro-batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of a position that is not trained on (cross-entropy's ignore_index)


@dataclass
class Batch:
    """One rank's rows; all torch.long of shape (rows, seq_len). positions/doc_ids may be None (one
    document per row, positions 0..T-1)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else
                        getattr(self, f.name).to(device, non_blocking=non_blocking) for f in dataclasses.fields(self)})

    @property
    def n_labels(self) -> int:
        """Trained positions in these rows."""
        return int((self.labels != IGNORE_INDEX).sum())


def split_micro(batch: Batch, micro_batch: int) -> list[Batch]:
    """Consecutive micro-batches of `micro_batch` rows each."""
    rows = batch.tokens.shape[0]
    if rows % micro_batch:
        raise ValueError(f"rank batch of {rows} rows is not a multiple of train.micro_batch={micro_batch}")
    fields = [f.name for f in dataclasses.fields(Batch)]
    chunks = {f: None if getattr(batch, f) is None else getattr(batch, f).split(micro_batch) for f in fields}
    return [Batch(**{f: None if c is None else c[i] for f, c in chunks.items()}) for i in range(rows // micro_batch)]
