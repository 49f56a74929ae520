"""Validation loss: the trainer's periodic evaluation and `clusterlm eval`."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from clusterlm.config import Config, grad_accum_steps
from clusterlm.data.loader import eval_batches
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.mixture import mix_labels
from clusterlm.data.shard_cache import CacheSettings
from clusterlm.distributed.runtime import Runtime
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel import ParallelModel
from clusterlm.train.objective import masking_rule


def eval_windows(cfg: Config, dp_size: int) -> int:
    """Windows in one evaluation: ``training.eval_batches`` global batches of the training step.
    ``dp_size`` is the training job's, so `clusterlm eval` scores the windows the trainer did."""
    global_batch = cfg.training.micro_batch_size * dp_size * grad_accum_steps(cfg, dp_size)
    return global_batch * cfg.training.eval_batches


def evaluate(
    model: ParallelModel, cfg: Config, runtime: Runtime, num_windows: int, split: str = "val"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``split`` of the data trained on: of ``data.dir``, or
    the weighted mean of those of every dataset of ``data.mix`` (``evaluate_sources``)."""
    return weighted_mean(cfg, evaluate_sources(model, cfg, runtime, num_windows, split))


def weighted_mean(cfg: Config, scores: list[tuple[float, float]]) -> tuple[float, float]:
    """The scores of the datasets trained on, weighted as ``data.mix`` weighs them."""
    sources, total = cfg.data.sources, sum(source.weight for source in cfg.data.sources)
    loss, accuracy = (
        sum(source.weight * score[k] for source, score in zip(sources, scores, strict=True)) / total
        for k in (0, 1)
    )
    return loss, accuracy


def evaluate_sources(
    model: ParallelModel, cfg: Config, runtime: Runtime, num_windows: int, split: str = "val"
) -> list[tuple[float, float]]:
    """``evaluate_dir`` of each dataset trained on (``data.dir``, or those of ``data.mix``)."""
    return [
        evaluate_dir(model, cfg, runtime, num_windows, split, source.dir)
        for source in cfg.data.sources
    ]


def evaluate_dir(
    model: ParallelModel,
    cfg: Config,
    runtime: Runtime,
    num_windows: int,
    split: str,
    data_dir: str,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the predicted tokens (next tokens, or the masked ones of
    a masked LM) over ``num_windows`` fixed windows, the same for every layout: each data-parallel
    rank scores a disjoint share and the sums are all-reduced. Accuracy is NaN where the logits
    are split across pipeline stages."""
    was_training = [part.training for part in model.parts]
    for part in model.parts:
        part.eval()
    total = torch.zeros(
        2, dtype=torch.float64, device=runtime.device
    )  # loss sum, right predictions
    count: int | torch.Tensor = 0
    rule = masking_rule(cfg)
    # Lockstep ranks score disjoint shares; a parameter server's rank 0 scores every window alone.
    dp_rank, dp_size = (runtime.dp_rank, runtime.dp_size) if runtime.lockstep else (0, 1)
    batch_size, first = cfg.training.micro_batch_size, dp_rank * (num_windows // dp_size)
    for i, (x, y) in enumerate(
        eval_batches(
            data_dir,
            split,
            cfg.seq_len,
            num_windows,
            batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
            cache=CacheSettings.of(cfg.data),
        )
    ):
        if rule is not None:  # masked by position in the evaluation set: the same in every layout
            x, y = rule.apply(
                x, range(first + i * batch_size, first + i * batch_size + len(x)), namespace=split
            )
        x, y = x.to(runtime.device), y.to(runtime.device)
        with attention_kernel(cfg.training.attention):
            total += model.eval_sums(x, y).double()
        count += (y != IGNORE_INDEX).sum()  # a tensor: no device sync per batch
    for part, mode in zip(model.parts, was_training, strict=True):
        part.train(mode)
    totals = torch.cat(
        [total, torch.as_tensor(count, dtype=torch.float64, device=runtime.device).view(1)]
    )
    if (
        runtime.world_size > 1 and runtime.lockstep
    ):  # tensor-parallel copies scale sums and count alike
        dist.all_reduce(totals)
    loss, accuracy = (totals[:2] / totals[2].clamp(min=1)).tolist()
    return loss, accuracy


def language_model_metrics(
    model: ParallelModel, cfg: Config, runtime: Runtime, split: str = "val"
) -> dict[str, float | None]:
    """The trainer's periodic evaluation of a language model: loss, perplexity and the accuracy of
    the predicted tokens (None where the logits are split across pipeline stages); with
    ``data.mix``, the weighted mean of the datasets' and each one's loss."""
    scores = evaluate_sources(model, cfg, runtime, eval_windows(cfg, runtime.dp_size), split)
    loss, accuracy = weighted_mean(cfg, scores)
    per_source = mix_labels(cfg.data.sources) if cfg.data.mix else []
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        "accuracy": accuracy if math.isfinite(accuracy) else None,
        **{f"loss_{label}": score[0] for label, score in zip(per_source, scores, strict=False)},
    }
