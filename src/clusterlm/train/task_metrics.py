"""A labelled task's evaluation: loss, accuracy and macro-F1 over every example of a split."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from clusterlm.config import Config
from clusterlm.data.classification import evaluation_batches
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.distributed.runtime import Runtime
from clusterlm.models.gpt import attention_kernel
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel import ParallelModel
from clusterlm.parallel.model import WholeModel


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the labels that occur as truth or prediction (rows: true, columns: predicted),
    as scikit-learn's ``f1_score(average="macro")`` defines it."""
    right = confusion.diag()
    occurring = confusion.sum(0) + confusion.sum(1)
    present = occurring > 0
    return float((2 * right[present] / occurring[present]).mean()) if present.any() else 0.0


def task_metrics(
    model: ParallelModel,
    cfg: Config,
    runtime: Runtime,
    streams: dict[str, Any],
    labels: int,
    split: str = "val",
    limit: int | None = None,
) -> dict[str, float | None]:
    """Loss, accuracy and macro-F1 of ``split`` (every example, or ``limit`` evenly spaced ones):
    each data-parallel rank scores a contiguous share, and the summed loss and confusion matrix are
    all-reduced."""
    assert isinstance(model, WholeModel)  # fine-tuning runs no pipeline
    was_training = [part.training for part in model.parts]
    for part in model.parts:
        part.eval()
    confusion = torch.zeros(labels * labels, dtype=torch.float64, device=runtime.device)
    loss = torch.zeros(1, dtype=torch.float64, device=runtime.device)
    # Lockstep ranks score disjoint shares; a parameter server's rank 0 scores every example alone.
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime.lockstep else (0, 1)
    for x, y in evaluation_batches(
        streams[split],
        cfg.seq_len,
        cfg.training.micro_batch_size,
        dp_rank,
        dp_size,
        runtime.device,
        limit,
    ):
        with attention_kernel(cfg.training.attention):
            logits = model.logits(x)
        loss += next_token_loss(logits, y, reduction="sum").double()
        truth, real = y[:, 0], y[:, 0] != IGNORE_INDEX
        pairs = truth[real] * labels + logits[:, 0].argmax(-1)[real]
        confusion += torch.bincount(pairs, minlength=labels * labels).double()
    for part, mode in zip(model.parts, was_training, strict=True):
        part.train(mode)
    totals = torch.cat([loss, confusion])
    if runtime.world_size > 1 and runtime.lockstep:
        dist.all_reduce(totals)
    matrix = totals[1:].view(labels, labels).cpu()
    count = float(matrix.sum())
    return {
        "loss": float(totals[0]) / max(count, 1.0),
        "accuracy": float(matrix.diag().sum()) / max(count, 1.0),
        "macro_f1": macro_f1(matrix),
    }
