"""The training loop: step, log, evaluate and checkpoint a session built from the config.

Everything a rank does is a function of (seed, step, rank): the data window of each sample, the
dropout masks (the RNG is re-seeded every step) and the initialization. That is what makes a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from clusterlm.config import Config, resolve_model_args
from clusterlm.distributed.runtime import describe_layout
from clusterlm.errors import UserError
from clusterlm.models import param_count
from clusterlm.models.gpt import attention_kernel
from clusterlm.observe import watchdog
from clusterlm.observe.monitor import Monitor
from clusterlm.observe.sinks import MetricsSinks, ProgressDisplay
from clusterlm.train.finetune import build_finetune_session
from clusterlm.train.injected_slowdown import slowed
from clusterlm.train.nonfinite import step_is_finite
from clusterlm.train.optim import lr_at
from clusterlm.train.out_dir import claim_out_dir, release, untouched
from clusterlm.train.preemption import Preemption
from clusterlm.train.session import Session, build_session, save


def train_step(s: Session) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches (or one pipelined batch); returns the
    mean loss (a tensor, so the device is not synchronized unless the caller reads it)."""
    torch.manual_seed(_dropout_seed(s))
    lr = lr_at(s.step, s.cfg.optim, s.cfg.training.steps)
    for optimizer in s.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a fine-tuning head may run at its own rate
    watchdog.phase("data", s.step)
    if s.sample_log:
        s.sample_log.record(s.step + 1, s.loader)
    micro_batches = s.loader.next_step()
    watchdog.phase("forward_backward", s.step)
    with attention_kernel(s.cfg.training.attention), slowed(s.slowdown, s.model.clock):
        loss = s.model.forward_backward(micro_batches)
    precision = s.model.precision
    watchdog.phase("optimizer", s.step)
    for optimizer in s.optimizers:
        precision.unscale(optimizer)
    grad_norm = s.model.clip_grad_norm(s.cfg.training.grad_clip or math.inf)  # inf: measured, not clipped
    if step_is_finite(s, loss, grad_norm):  # else stopped, or skipped (training.skip_nonfinite)
        precision.step(s.optimizers)
    else:
        precision.skip()
    for optimizer in s.optimizers:
        optimizer.zero_grad(set_to_none=True)
    advanced = s.model.after_step(s.step + 1) - s.step  # a parameter server's workers advance it together
    s.step += advanced
    s.tokens += advanced * s.tokens_per_step
    return loss


def _dropout_seed(s: Session) -> int:
    """Dropout masks are a function of (seed, step, rank). Tensor-parallel ranks hold the same
    residual stream unless it is split along the sequence, so they share a seed then."""
    tp_rank = s.runtime.tp_rank if s.cfg.parallel.sequence_parallel else 0
    return hash((s.cfg.training.seed, s.step, s.runtime.dp_rank, tp_rank)) % 2**63


def _due(before: int, step: int, interval: int, last: int) -> bool:
    """Whether a step from ``before`` to ``step`` reached ``last`` or crossed a multiple of
    ``interval`` (a parameter server's workers advance by the other workers' steps too)."""
    return step == last or (interval > 0 and before // interval < step // interval)


def train(cfg: Config) -> dict[str, Any]:
    fresh = untouched(cfg.training.out_dir)
    lock = claim_out_dir(cfg)  # one run per out_dir: taken, or refused, before anything is written
    preemption = Preemption(cfg.checkpoint.preempt_grace_s)  # SIGTERM / SIGUSR1: save and stop at a step boundary
    watchdog.start(cfg.training.out_dir, cfg.parallel.hang_timeout_s)
    try:
        return _train(cfg, preemption)
    except UserError:
        watchdog.stop()
        release(lock)
        if fresh:  # bad input leaves the disk as it was: only the heartbeats (and the lock) were written
            watchdog.remove_heartbeats(cfg.training.out_dir)
        raise
    finally:
        watchdog.stop()
        preemption.close()
        release(lock)


def _train(cfg: Config, preemption: Preemption) -> dict[str, Any]:
    s = build_finetune_session(cfg) if cfg.finetune.task else build_session(cfg)
    if s.model.serves:  # a parameter server: it answers the workers instead of training
        return s.model.serve(s.optimizers, cfg.training.steps, s.step)
    t = cfg.training
    out_dir = Path(t.out_dir)
    main_rank = s.runtime.is_main
    progress = ProgressDisplay(cfg.metrics.progress if main_rank else "none", t.steps, s.step)
    monitor = Monitor(s, progress)  # before anything is written: a busy exporter port fails first
    sinks = MetricsSinks(cfg.metrics, out_dir, s.step) if main_rank else None
    if main_rank:
        _describe(s, progress)
    summary: dict[str, Any] = {"resumed_from": str(s.resumed_from) if s.resumed_from else None}
    window_seconds, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
    while s.step < t.steps:
        start, before = time.perf_counter(), s.step
        loss = train_step(s)
        logging = _due(before, s.step, t.log_interval, t.steps)
        # Reading the loss waits for the device, so only when it is logged.
        loss_value = monitor.mean_loss(s, loss) if logging else None
        window_seconds += time.perf_counter() - start
        window_steps += s.step - before  # 1, or for a parameter server's worker the job's steps meanwhile
        if logging and math.isfinite(loss_value):  # not finite: a skipped step, logged with the next window
            record = _train_record(s, loss_value, window_seconds / window_steps)
            monitor.observe(s, record, sinks)
            summary["train_loss"] = loss_value
            progress.update(s.step - 1, record)
            if sinks:
                sinks.log(record)
            window_seconds, window_steps = 0.0, 0
        if _due(before, s.step, t.eval_interval, t.steps) and s.runtime.reports:
            watchdog.phase("eval", s.step)
            summary["val_loss"] = _evaluate(s, progress, sinks)["loss"]
        watchdog.phase("checkpoint", s.step)
        saved = save(s) if _due(before, s.step, cfg.checkpoint.interval, t.steps) and s.runtime.reports else None
        if saved:
            progress.message(f"step {s.step}: saved {saved}")
        if preemption.requested(s.runtime, time.perf_counter() - start) and s.step < t.steps:
            summary["preempted"] = str(saved or save(s))
            break
    _finish(s, summary, preemption, progress, monitor, sinks)
    return summary


def _finish(s: Session, summary: dict[str, Any], preemption: Preemption, progress: ProgressDisplay,
            monitor: Monitor, sinks: MetricsSinks | None) -> None:
    """Score the held-out splits of a finished run, wait for a save still writing, report and close."""
    if "preempted" not in summary and s.step >= s.cfg.training.steps and s.runtime.reports:
        for split in s.final_splits:  # a fine-tuning task's test split: scored once, at the end
            summary[split] = _evaluate(s, progress, sinks, split)
    s.writer.close()  # a save still writing in the background finishes first
    if "preempted" in summary and s.runtime.is_main:
        print(preemption.report(s.step, summary["preempted"]), flush=True)
    progress.close()
    monitor.close()
    if sinks:
        plot = sinks.close()
        if plot:
            print(f"loss plot: {plot}")
    summary.update(step=s.step, tokens=s.tokens, rank=s.runtime.rank)


def _evaluate(s: Session, progress: ProgressDisplay, sinks: MetricsSinks | None, split: str = "val"
              ) -> dict[str, float | None]:
    """Score ``split`` (the session's own metrics: loss first), show it and log it."""
    result = s.evaluator(split)
    shown = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in result.items() if value is not None)
    progress.message(f"step {s.step}: {split} {shown}")
    if sinks:
        sinks.log({"kind": "eval" if split == "val" else split, "step": s.step, "tokens": s.tokens,
                   **{f"{split}_{name}": value for name, value in result.items()}})
    return result


def _train_record(s: Session, loss: float, seconds_per_step: float) -> dict[str, Any]:
    tokens_per_s = s.tokens_per_step / seconds_per_step
    per_device = tokens_per_s * s.flops_per_token / s.runtime.world_size
    return {
        "kind": "train", "step": s.step, "tokens": s.tokens, "loss": loss,
        "lr": s.optimizers[0].param_groups[0]["lr"], "ms_per_step": 1000 * seconds_per_step,
        "tokens_per_s": tokens_per_s, "mfu": per_device / s.peak_flops if s.peak_flops else None,
        **s.model.comm_metrics(), **({"skipped_steps": s.skipped_steps} if s.cfg.training.skip_nonfinite else {}),
    }


def _describe(s: Session, progress: ProgressDisplay) -> None:
    params = param_count(resolve_model_args(s.cfg, s.cfg.model.vocab_size))
    peak = f"{s.peak_flops / 1e12:.2f} TFLOP/s" if s.peak_flops else "unknown"
    r = s.runtime
    layout = describe_layout(s.cfg, r)
    progress.message(
        f"model {s.cfg.model.flavour}: {params / 1e6:.2f}M parameters, {s.flops_per_token / 1e6:.1f} "
        f"MFLOP/token | {s.tokens_per_step:,} tokens/step ({s.grad_accum} micro-steps) | {layout} | "
        f"{r.device}, {s.cfg.training.precision}, peak {peak}"
    )
    if s.resumed_from:
        progress.message(f"resumed from {s.resumed_from} at step {s.step}")
