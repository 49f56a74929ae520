"""Validation loss: the trainer's periodic evaluation and `clusterlm eval`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from clusterlm.config import Config, grad_accum_steps
from clusterlm.data.loader import eval_batches
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel import ParallelModel
from clusterlm.train.objective import masking_rule
from clusterlm.train.runtime import Runtime


def eval_windows(cfg: Config, dp_size: int) -> int:
    """Windows in one evaluation: ``training.eval_batches`` global batches of the training step.
    ``dp_size`` is the training job's, so `clusterlm eval` scores the windows the trainer did."""
    global_batch = cfg.training.micro_batch_size * dp_size * grad_accum_steps(cfg, dp_size)
    return global_batch * cfg.training.eval_batches


def evaluate_loss(model: ParallelModel, cfg: Config, runtime: Runtime, num_windows: int, split: str = "val") -> float:
    """Mean cross-entropy over ``num_windows`` fixed windows, the same for every layout: each
    data-parallel rank scores a disjoint share and the sums are all-reduced."""
    was_training = [part.training for part in model.parts]
    for part in model.parts:
        part.eval()
    total = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count, rule = 0, masking_rule(cfg)
    batch_size, first = cfg.training.micro_batch_size, runtime.dp_rank * (num_windows // runtime.dp_size)
    for i, (x, y) in enumerate(eval_batches(
        cfg.data.dir, split, cfg.seq_len, num_windows, batch_size, dp_rank=runtime.dp_rank, dp_size=runtime.dp_size,
    )):
        if rule is not None:  # masked by position in the evaluation set: the same in every layout
            x, y = rule.apply(x, range(first + i * batch_size, first + i * batch_size + len(x)), namespace=split)
        x, y = x.to(runtime.device), y.to(runtime.device)
        with attention_kernel(cfg.training.attention):
            total += model.eval_loss_sum(x, y).double()
        count += (y != IGNORE_INDEX).sum()  # a tensor: no device sync per batch
    for part, mode in zip(model.parts, was_training, strict=True):
        part.train(mode)
    totals = torch.stack([total, torch.as_tensor(count, dtype=torch.float64, device=runtime.device)])
    if runtime.world_size > 1:  # tensor-parallel copies scale sum and count alike: the mean holds
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()
