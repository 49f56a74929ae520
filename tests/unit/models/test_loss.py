"""The training loss against torch's: ``next_token_loss`` with label smoothing is
``F.cross_entropy(label_smoothing=...)`` over the flattened positions, ignored targets left out of
the sum and the mean; without it, the plain cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.models.loss import next_token_loss


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=generator, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    targets[0, 3:] = IGNORE_INDEX  # padding
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothed_loss_is_torchs(reduction, smoothing):
    logits, targets = _batch()
    loss = next_token_loss(logits, targets, reduction, label_smoothing=smoothing)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               reduction=reduction, label_smoothing=smoothing)  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_smoothing_raises_the_loss_of_a_confident_model_and_ignores_padding():
    logits, targets = _batch()
    confident = torch.full_like(logits, -20.0).scatter(-1, targets.clamp(min=0)[..., None], 20.0)
    plain = next_token_loss(confident, targets)
    smoothed = next_token_loss(confident, targets, label_smoothing=0.1)
    assert plain < 1e-6 < smoothed
    padded = targets.clone()
    padded[1, 4] = IGNORE_INDEX
    fewer = next_token_loss(confident, padded, reduction="sum", label_smoothing=0.1)
    summed = next_token_loss(confident, targets, reduction="sum", label_smoothing=0.1)
    per_position = next_token_loss(confident, targets, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(summed - fewer, per_position.view(2, 5)[1, 4])
