"""Validation loss and perplexity: `clusterlm eval` and the trainer's periodic evaluation."""

from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clusterlm.config import Config, grad_accum_steps
from clusterlm.data.loader import eval_batches
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel.parallelize import Pipeline
from clusterlm.parallel.pipeline import pipeline_eval_loss
from clusterlm.parallel.tensor_parallel import full_value, loss_context
from clusterlm.train.precision import Precision
from clusterlm.train.runtime import Runtime


def eval_windows(cfg: Config, dp_size: int) -> int:
    """Windows in one evaluation: ``training.eval_batches`` global batches of the training step.
    ``dp_size`` is the training job's, so `clusterlm eval` scores the windows the trainer did."""
    global_batch = cfg.training.micro_batch_size * dp_size * grad_accum_steps(cfg, dp_size)
    return global_batch * cfg.training.eval_batches


@torch.no_grad()
def evaluate_loss(
    parts: list[nn.Module], pipeline: Pipeline | None, cfg: Config, runtime: Runtime, precision: Precision,
    num_windows: int, split: str = "val",
) -> float:
    """Mean cross-entropy over ``num_windows`` fixed windows, the same for every layout: each
    data-parallel rank scores a disjoint share (through the pipeline when there is one) and the
    sums are all-reduced."""
    was_training = [part.training for part in parts]
    for part in parts:
        part.eval()
    total = torch.zeros((), dtype=torch.float64, device=runtime.device)
    count = 0
    for x, y in eval_batches(
        cfg.data.dir, split, cfg.seq_len, num_windows, cfg.training.micro_batch_size,
        dp_rank=runtime.dp_rank, dp_size=runtime.dp_size,
    ):
        x, y = x.to(runtime.device), y.to(runtime.device)
        with precision.autocast(), loss_context(runtime.tp_size), attention_kernel(cfg.training.attention):
            if pipeline is not None:
                loss_sum = pipeline_eval_loss(pipeline.stages, x, y) * y.numel()
            else:
                loss_sum = F.cross_entropy(parts[0](x).flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += full_value(loss_sum).double()
        count += y.numel()
    for part, mode in zip(parts, was_training, strict=True):
        part.train(mode)
    totals = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=runtime.device)])
    if runtime.world_size > 1:  # tensor-parallel copies scale sum and count alike: the mean holds
        dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def main(argv: list[str]) -> int:
    from clusterlm.train.loading import add_checkpoint_arguments, load_for_inference

    parser = argparse.ArgumentParser(prog="clusterlm eval", description="Validation loss and perplexity of a checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--split", default="val", choices=("train", "val"), help="which split to score")
    parser.add_argument("--batches", type=int, default=0, help="batches to score (0 = training.eval_batches)")
    args = parser.parse_args(argv)
    loaded = load_for_inference(args)
    cfg = loaded.cfg
    if args.batches:
        cfg.training.eval_batches = args.batches
    windows = eval_windows(cfg, loaded.state.get("dp_size", 1))
    loss = evaluate_loss([loaded.model], None, cfg, loaded.runtime, loaded.precision, windows, args.split)
    print(f"{args.split} loss {loss:.4f} perplexity {math.exp(loss):.2f} "
          f"({windows} windows of {cfg.seq_len} tokens, checkpoint step {loaded.step})")
    return 0
