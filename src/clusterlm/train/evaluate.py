"""Validation loss: the trainer's periodic evaluation and `clusterlm eval`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from clusterlm.config import Config, grad_accum_steps
from clusterlm.data.loader import eval_batches
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel import ParallelModel
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
    count = 0
    # Lockstep ranks score disjoint shares; a parameter server's rank 0 scores every window alone.
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime.lockstep else (0, 1)
    for x, y in eval_batches(
        cfg.data.dir, split, cfg.seq_len, num_windows, cfg.training.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
    ):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with attention_kernel(cfg.training.attention):
            total += model.eval_loss_sum(x, y).double()
        count += y.numel()
    for part, mode in zip(model.parts, was_training, strict=True):
        part.train(mode)
    totals = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=runtime.device)])
    if runtime.world_size > 1 and runtime.lockstep:  # tensor-parallel copies scale sum and count alike: the mean holds
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()
