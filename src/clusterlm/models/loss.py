"""The language-modelling objective, shared by training, pipeline stages and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the next tokens: ``logits`` [B, T, V], ``targets`` [B, T]. The log-softmax
    is taken in fp32 whatever the compute precision: in 16-bit it loses the small probabilities.
    Targets equal to -100 (cross_entropy's ``ignore_index``) are left out of the sum and the mean:
    the masked-LM labels of unmasked positions, so the same function is the masked-LM loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
