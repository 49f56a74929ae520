"""The language-modelling objective, shared by training, pipeline stages and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

IGNORED = -100  # cross_entropy's ignore_index


def next_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the next tokens: ``logits`` [B, T, V], ``targets`` [B, T]. The log-softmax
    is taken in fp32 whatever the compute precision: in 16-bit it loses the small probabilities.
    Targets equal to -100 (cross_entropy's ``ignore_index``) are left out of the sum and the mean:
    the masked-LM labels of unmasked positions, so the same function is the masked-LM loss.

    ``label_smoothing`` gives that share of each target's probability to the whole vocabulary
    evenly, as ``F.cross_entropy``'s own argument does. Logits split over the vocabulary (a
    DTensor under ``loss_parallel``, whose cross-entropy refuses smoothing) get the same sum,
    computed without gathering the vocabulary (``_vocab_parallel_smoothing``)."""
    flat, labels = logits.flatten(0, 1).float(), targets.flatten()
    if label_smoothing == 0.0 or not isinstance(flat, DTensor):
        return F.cross_entropy(flat, labels, reduction=reduction, label_smoothing=label_smoothing)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"vocabulary-parallel smoothing reduces by mean or sum, not {reduction}")
    plain = F.cross_entropy(flat, labels, reduction="sum")
    kept = labels != IGNORED
    uniform = _vocab_parallel_smoothing(flat, kept)
    total = plain * (1 - label_smoothing) + uniform * label_smoothing
    return total if reduction == "sum" else total / max(int(kept.sum()), 1)


def _vocab_parallel_smoothing(logits: DTensor, kept: torch.Tensor) -> torch.Tensor:
    """The sum, over the positions ``kept``, of the mean over the vocabulary of -log p: per
    position logsumexp(z) - mean(z), from per-shard maxima, sums and means. DTensor reduces
    [N]-sized partial results across the shards and carries the gradient back to each."""
    mesh, placements = logits.device_mesh, [Replicate()] * logits.device_mesh.ndim

    def replicated(partial: torch.Tensor) -> torch.Tensor:  # a DTensor reduced over the shards
        assert isinstance(partial, DTensor)
        return partial.redistribute(mesh, placements)

    peak = replicated(logits.detach().amax(-1, keepdim=True))
    log_sum_exp = replicated((logits - peak).exp().sum(-1)).log() + peak.squeeze(-1)
    mean = replicated(logits.mean(-1))
    weights = DTensor.from_local(kept.to(log_sum_exp.dtype), mesh, placements, run_check=False)
    return ((log_sum_exp - mean) * weights).sum()
