"""Batches of a labelled task's examples: what fine-tuning trains and evaluates on.

An example becomes one row of ``seq_len`` token ids: ``[CLS]`` first when the model is an encoder
(``cls_id``), then the example's tokens, cut to fit, then ``PAD`` (-1) to the end of the row. Its
label is the target [B, 1]. Training draws examples like windows (``TokenLoader`` over an
``ExampleStream``: seeded order per epoch, one sample counter); evaluation scores every example
of a split once, each data-parallel rank a contiguous share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any, Protocol

import numpy as np
import torch

from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.special_tokens import PAD
from clusterlm.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class ExampleStream:
    """The examples of one task split (``clusterlm.data.task.TaskSplit``) as rows and labels."""

    def __init__(self, split: Any, cls_id: int | None):
        self.split, self.cls_id = split, cls_id

    def num_windows(self, block_size: int) -> int:
        """Examples in the split (each is one sample, whatever ``block_size``)."""
        if len(self.split) == 0:
            raise UserError(
                "the task's training split has no examples; prepare the task again with more data"
            )
        return len(self.split)

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        """(rows [B, block_size], labels [B, 1]) of examples ``indices``; an index of -1 is a
        filler row that counts for nothing (label ``IGNORE_INDEX``)."""
        rows = np.full((len(indices), block_size), PAD, dtype=np.int64)
        labels = np.full((len(indices), 1), IGNORE_INDEX, dtype=np.int64)
        prefix = [] if self.cls_id is None else [self.cls_id]
        for row, index in enumerate(indices):
            index = int(index)
            if index < 0:
                rows[row, 0] = prefix[0] if prefix else 0
                continue
            tokens = np.concatenate([prefix, self.split.example(index)[: block_size - len(prefix)]])
            rows[row, : len(tokens)] = tokens
            labels[row, 0] = self.split.labels[index]
        return torch.from_numpy(rows).to(device), torch.from_numpy(labels).to(device)


class SplitStream(Protocol):
    """What evaluation reads: a split's examples (``ExampleStream``) or translation pairs
    (``clusterlm.data.pair_batches.PairStream``), by index, -1 a filler row."""

    @property
    def split(self) -> Sized: ...

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch: ...


def evaluation_batches(
    stream: SplitStream,
    block_size: int,
    batch_size: int,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Rank ``dp_rank``'s contiguous share of the split's examples (every one, or ``limit`` evenly
    spaced ones), in batches. Shares are made equal with filler rows, so every rank runs the same
    number of forward passes (sharded layouts gather parameters in each)."""
    total = len(stream.split)
    chosen = (
        np.arange(total) if limit is None or limit >= total else np.arange(limit) * total // limit
    )
    share = -(-len(chosen) // dp_size)
    mine = [
        int(chosen[i]) if i < len(chosen) else -1
        for i in range(dp_rank * share, (dp_rank + 1) * share)
    ]
    for start in range(0, share, batch_size):
        yield stream.batch(mine[start : start + batch_size], block_size, device)
