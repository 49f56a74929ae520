"""Batches of a translation task's pairs (``clusterlm.data.translation``): what a translation
model trains and is scored on, in one of two layouts.

The encoder–decoder's (``PairStream``): a pair becomes one row of ``2 * L`` token ids: the source,
cut to ``seq_len`` and padded with ``PAD`` (-1), then the decoder's input, the end-of-text token
followed by the target, cut and padded alike. Its targets [L] are the target's tokens then the
end-of-text token, and ``IGNORE_INDEX`` where padded: teacher forcing, each decoder position
predicting the next target token.

A decoder-only model's (``JoinedPairStream``): a pair is one sequence, the source cut to half of
``seq_len``, the end-of-text token as separator, then the target cut to the other half, ending
with the end-of-text token; the loss is on the target's tokens only (the source's positions are
``IGNORE_INDEX``), and a translation is the continuation of the prompt ``source <eot>``.

Training draws pairs like windows (``TokenLoader``): in shuffled epochs, or with ``pool`` > 0
sorted by length within consecutive pools of ``pool`` shuffled pairs (``SortishOrder``), and
with ``trim`` each batch is as long as its longest pair, rounded up to a multiple of 8, instead
of ``seq_len``: padding is masked and causal, so a trimmed batch computes the same loss. Evaluation
scores every pair of a split once, untrimmed
(``clusterlm.data.classification.evaluation_batches``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from clusterlm.data.loader import EpochOrder
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.special_tokens import PAD
from clusterlm.data.translation import PairSplit
from clusterlm.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]
TRIM_MULTIPLE = 8  # trimmed lengths are multiples of this (friendlier matmul shapes)


class SortishOrder:
    """Sample i of epoch e reads a pair of the epoch's shuffled order (``EpochOrder``), but each
    consecutive pool of ``pool`` of them is sorted by length, longest first (the "sortish"
    sampling of Hugging Face's seq2seq examples): a batch holds pairs of similar length, so
    trimming drops most of its padding. A function of the seed and the index alone, so resuming
    needs only the sample counter."""

    def __init__(self, lengths: np.ndarray, pool: int, seed: int) -> None:
        self.lengths, self.pool = lengths, pool
        self._shuffled = EpochOrder(len(lengths), seed)
        self._key: tuple[int, int] = (-1, -1)
        self._sorted = np.empty(0, dtype=np.int64)

    def __call__(self, sample: int) -> int:
        items = len(self.lengths)
        epoch, position = divmod(sample, items)
        key = (epoch, position // self.pool)
        if key != self._key:
            start = epoch * items + key[1] * self.pool
            end = epoch * items + min(items, (key[1] + 1) * self.pool)
            chosen = np.array([self._shuffled(i) for i in range(start, end)], dtype=np.int64)
            self._sorted = chosen[np.argsort(-self.lengths[chosen], kind="stable")]
            self._key = key
        return int(self._sorted[position % self.pool])


def trimmed_length(needed: int, block_size: int) -> int:
    """``needed`` positions rounded up to a multiple of ``TRIM_MULTIPLE``, at most
    ``block_size``."""
    return min(block_size, -(-max(needed, 1) // TRIM_MULTIPLE) * TRIM_MULTIPLE)


class PairStream:
    """The pairs of one translation split as the encoder–decoder's rows and targets.
    ``target_offset``: where the target tokenizer's ids start in the model's
    (``TranslationManifest.target_offset``); ``trim`` and ``pool`` as the module says."""

    def __init__(
        self,
        split: PairSplit,
        eot_id: int,
        target_offset: int = 0,
        trim: bool = False,
        pool: int = 0,
    ):
        self.split, self.eot_id, self.target_offset = split, eot_id, target_offset
        self.trim, self.pool = trim, pool

    def num_windows(self, block_size: int) -> int:
        """Pairs in the split (each is one sample, whatever ``block_size``)."""
        if len(self.split) == 0:
            raise UserError(
                "the translation task's training split has no pairs; prepare it again with more"
            )
        return len(self.split)

    def sample_order(self, seed: int, block_size: int) -> Callable[[int], int]:
        """Which pair each training sample reads: shuffled epochs, sorted within pools."""
        if self.pool == 0:
            return EpochOrder(len(self.split), seed)
        return SortishOrder(self.pair_lengths(block_size), self.pool, seed)

    def pair_lengths(self, block_size: int) -> np.ndarray:
        """Positions each pair's row needs (its longer side, cut)."""
        return np.minimum(
            np.maximum(np.diff(self.split.src.offsets), np.diff(self.split.tgt.offsets)),
            block_size,
        )

    def batch_length(self, indices: Sequence[int], block_size: int) -> int:
        """The length L of the batch of pairs ``indices``: ``block_size``, or trimmed."""
        if not self.trim:
            return block_size
        real = [i for i in indices if i >= 0]
        longest = int(self.pair_lengths(block_size)[real].max()) if real else 1
        return trimmed_length(longest, block_size)

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        """(rows [B, 2 * L], targets [B, L]) of pairs ``indices``, L = ``block_size`` or trimmed;
        an index of -1 is a filler row that counts for nothing (a one-token source, every target
        ignored)."""
        indices = [int(i) for i in indices]
        length = self.batch_length(indices, block_size)
        rows = np.full((len(indices), 2 * length), PAD, dtype=np.int64)
        targets = np.full((len(indices), length), IGNORE_INDEX, dtype=np.int64)
        for row, index in enumerate(indices):
            if index < 0:
                rows[row, [0, length]] = self.eot_id
                continue
            source = self.split.src[index][:block_size]
            target = self.split.tgt[index][:block_size]  # ends with the end-of-text token
            rows[row, : len(source)] = source
            rows[row, length] = self.eot_id
            rows[row, length + 1 : length + len(target)] = target[:-1]
            targets[row, : len(target)] = target
        return torch.from_numpy(rows).to(device), torch.from_numpy(targets).to(device)


class JoinedPairStream(PairStream):
    """The pairs of one translation split as a decoder-only model's sequences
    ``source <eot> target <eot>`` of at most ``block_size`` positions, each side cut to half."""

    def pair_lengths(self, block_size: int) -> np.ndarray:
        half = block_size // 2
        return np.minimum(np.diff(self.split.src.offsets), half) + np.minimum(
            np.diff(self.split.tgt.offsets), half
        )

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        """(inputs [B, L], targets [B, L]), L = ``block_size`` or trimmed: the joined sequence,
        padded with the end-of-text token (causal attention: padding after a row's end changes
        nothing it predicts), and its next tokens where they are the target's."""
        indices, half = [int(i) for i in indices], block_size // 2
        length = self.batch_length(indices, block_size)
        inputs = np.full((len(indices), length), self.eot_id, dtype=np.int64)
        targets = np.full((len(indices), length), IGNORE_INDEX, dtype=np.int64)
        for row, index in enumerate(indices):
            if index < 0:
                continue
            source = self.split.src[index][:half]
            target = self.split.tgt[index][:half]
            inputs[row, : len(source)] = source
            inputs[row, len(source) + 1 : len(source) + len(target)] = target[:-1]
            targets[row, len(source) : len(source) + len(target)] = target
        return torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)


def prompt_lengths(targets: torch.Tensor) -> torch.Tensor:
    """Of ``JoinedPairStream`` targets [B, L]: each row's prompt length, its source and the
    separator (1 for a filler row, all of whose targets are ignored)."""
    scored = targets != IGNORE_INDEX
    return torch.where(scored.any(1), scored.int().argmax(1) + 1, 1)
