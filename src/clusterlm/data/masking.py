"""Masked-language-model inputs and labels by BERT's rule, as a function of (seed, sample).

Per sequence of T tokens, exactly ``k = max(1, round(probability * T))`` positions are chosen
uniformly without replacement (as BERT's data generator picks a fixed number of predictions per
sequence); each chosen position becomes ``[MASK]`` with probability 0.8, a uniformly random token
with 0.1, and stays itself with 0.1. The label is the original token at chosen positions and
``IGNORE_INDEX`` elsewhere, so the cross-entropy averages over the chosen positions only.

Every sequence draws from its own generator, seeded by (seed, namespace, sample index): the global
sample index of training (itself a function of the step, the data-parallel rank and the
micro-step) or the position in the evaluation set. The mask therefore does not depend on the
layout, on the global RNG or on how far a run got before it was resumed. A window read again in
a later epoch has another sample index, hence a fresh mask (dynamic masking, as in RoBERTa).

With a fixed k, every micro-batch of a step holds the same number of masked tokens, so the mean of
per-micro-batch, per-rank means equals the mean over the masked tokens of the global batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100  # torch's cross_entropy default: these positions count for nothing
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # and the remaining 0.1 keep their token


@dataclass(frozen=True)
class MaskingRule:
    seed: int
    probability: float
    mask_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size): ordinary tokens only

    def masked_per_sequence(self, seq_len: int) -> int:
        return max(1, round(self.probability * seq_len))

    def _generator(self, namespace: str, sample: int) -> torch.Generator:
        digest = hashlib.blake2b(
            f"{self.seed}/{namespace}/{sample}".encode(), digest_size=8
        ).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def apply(
        self, tokens: torch.Tensor, samples: Iterable[int], namespace: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for ``tokens`` [B, T], row b being sample ``samples[b]``."""
        cpu = tokens.cpu()
        inputs, labels = cpu.clone(), torch.full_like(cpu, IGNORE_INDEX)
        k = self.masked_per_sequence(cpu.size(1))
        for row, sample in enumerate(samples):
            generator = self._generator(namespace, sample)
            positions = torch.randperm(cpu.size(1), generator=generator)[:k]
            action = torch.rand(k, generator=generator)
            random_tokens = torch.randint(self.vocab_size, (k,), generator=generator)
            original = cpu[row, positions]
            labels[row, positions] = original
            replaced = torch.where(action < MASK_SHARE + RANDOM_SHARE, random_tokens, original)
            inputs[row, positions] = torch.where(action < MASK_SHARE, self.mask_id, replaced)
        return inputs.to(tokens.device), labels.to(tokens.device)


class MaskedLoader:
    """A ``TokenLoader`` whose micro-batches are (masked inputs, masked-LM labels); the state is the
    wrapped loader's, since the mask is a function of the sample index."""

    def __init__(self, loader: Any, rule: MaskingRule):
        self.loader, self.rule = loader, rule

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        samples = [self.loader.sample_indices(m) for m in range(self.loader.micro_batches)]
        batches = self.loader.next_step()
        return [self.rule.apply(x, ids) for (x, _), ids in zip(batches, samples, strict=True)]

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        # The rest (assignment, timings, position) is the wrapped loader's.
        return getattr(self.loader, name)
