"""Batches of a translation task's pairs (``clusterlm.data.translation``): what the
encoder–decoder trains and is scored on.

A pair becomes one row of ``2 * seq_len`` token ids: the source, cut to ``seq_len`` and padded
with ``PAD`` (-1), then the decoder's input, the end-of-text token followed by the target, cut and
padded alike. Its targets [seq_len] are the target's tokens then the end-of-text token, and
``IGNORE_INDEX`` where padded: teacher forcing, each decoder position predicting the next target
token. Training draws pairs like windows (``TokenLoader`` over a ``PairStream``: seeded order per
epoch, one sample counter); evaluation scores every pair of a split once
(``clusterlm.data.classification.evaluation_batches``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.special_tokens import PAD
from clusterlm.data.translation import PairSplit
from clusterlm.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class PairStream:
    """The pairs of one translation split as rows and targets. ``target_offset``: where the
    target tokenizer's ids start in the model's (``TranslationManifest.target_offset``)."""

    def __init__(self, split: PairSplit, eot_id: int, target_offset: int = 0):
        self.split, self.eot_id, self.target_offset = split, eot_id, target_offset

    def num_windows(self, block_size: int) -> int:
        """Pairs in the split (each is one sample, whatever ``block_size``)."""
        if len(self.split) == 0:
            raise UserError(
                "the translation task's training split has no pairs; prepare it again with more"
            )
        return len(self.split)

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        """(rows [B, 2 * block_size], targets [B, block_size]) of pairs ``indices``; an index of -1
        is a filler row that counts for nothing (a one-token source, every target ignored)."""
        rows = np.full((len(indices), 2 * block_size), PAD, dtype=np.int64)
        targets = np.full((len(indices), block_size), IGNORE_INDEX, dtype=np.int64)
        for row, index in enumerate(int(i) for i in indices):
            if index < 0:
                rows[row, [0, block_size]] = self.eot_id
                continue
            source = self.split.src[index][:block_size]
            target = self.split.tgt[index][:block_size]  # ends with the end-of-text token
            rows[row, : len(source)] = source
            rows[row, block_size] = self.eot_id
            rows[row, block_size + 1 : block_size + len(target)] = target[:-1]
            targets[row, : len(target)] = target
        return torch.from_numpy(rows).to(device), torch.from_numpy(targets).to(device)
