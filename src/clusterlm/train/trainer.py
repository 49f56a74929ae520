"""The training loop: step, log, evaluate and checkpoint a session built from the config.

Everything a rank does is a function of (seed, step, rank): the data window of each sample, the
dropout masks (the RNG is re-seeded every step) and the initialization. That is what makes a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clusterlm.config import Config
from clusterlm.data.mixture import describe_mix
from clusterlm.data.translation import is_translation_dir
from clusterlm.distributed.launch_variables import launch_position
from clusterlm.distributed.runtime import describe_layout
from clusterlm.errors import UserError
from clusterlm.files import check_output_path
from clusterlm.models import param_count
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.gpt import attention_kernel
from clusterlm.observe import watchdog
from clusterlm.observe.monitor import Monitor
from clusterlm.observe.sinks import MetricsSinks, ProgressDisplay
from clusterlm.train.finetune import finetune_task
from clusterlm.train.injected_slowdown import slowed
from clusterlm.train.nonfinite import step_is_finite
from clusterlm.train.optim import lr_at
from clusterlm.train.out_dir import claim_out_dir, release, untouched
from clusterlm.train.preemption import Preemption
from clusterlm.train.session import Metrics, Session, build_session, save
from clusterlm.train.translation_task import translation_task


@dataclass
class TrainSummary:
    """What a run reports when it ends.

    It finished, was preempted, or a parameter server's service is done.
    """

    rank: int = 0
    step: int = 0
    tokens: int = 0
    resumed_from: str | None = None  # the checkpoint the run resumed from
    train_loss: float | None = None  # the last logged
    val_loss: float | None = None  # the last evaluated
    preempted: str | None = None  # the checkpoint a preempted run saved before it stopped
    final: dict[str, Metrics] = field(
        default_factory=dict
    )  # split -> scores at the end (a task's test)
    served: dict[str, Any] | None = None  # a parameter server's counts (pushes, staleness)


def train_step(session: Session) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches (or one pipelined batch); returns the
    mean loss (a tensor, so the device is not synchronized unless the caller reads it)."""
    torch.manual_seed(_dropout_seed(session))
    lr = lr_at(session.step, session.cfg.optim, session.cfg.training.steps)
    for optimizer in session.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get(
                "lr_scale", 1.0
            )  # a fine-tuning head may run at its own rate
    watchdog.phase("data", session.step)
    if session.sample_log:
        session.sample_log.record(session.step + 1, session.loader)
    tokens, flops = session.step_work()  # before the loader moves on
    micro_batches = session.loader.next_step()
    watchdog.phase("forward_backward", session.step)
    with (
        attention_kernel(session.cfg.training.attention),
        slowed(session.slowdown, session.model.clock),
    ):
        loss = session.model.forward_backward(micro_batches)
    precision = session.model.precision
    watchdog.phase("optimizer", session.step)
    for optimizer in session.optimizers:
        precision.unscale(optimizer)
    grad_norm = session.model.clip_grad_norm(
        session.cfg.training.grad_clip or math.inf
    )  # inf: measured, not clipped
    applied = step_is_finite(session, loss, grad_norm)  # else stopped, or skipped
    if applied:
        precision.step(session.optimizers)
    else:
        precision.skip()
    if session.experts is not None:  # aux-free balancing: routing biases moved by the loads
        session.experts.after_step(applied)
    for optimizer in session.optimizers:
        optimizer.zero_grad(set_to_none=True)
    advanced = (
        session.model.after_step(session.step + 1) - session.step
    )  # a parameter server's workers advance it together
    session.step += advanced
    session.tokens += advanced * tokens
    session.window_tokens += advanced * tokens
    session.window_flops += advanced * flops
    return loss


def _dropout_seed(session: Session) -> int:
    """Dropout masks are a function of (seed, step, rank). Tensor-parallel ranks hold the same
    residual stream unless it is split along the sequence, so they share a seed then."""
    tp_rank = session.runtime.tp_rank if session.cfg.parallel.sequence_parallel else 0
    return hash((session.cfg.training.seed, session.step, session.runtime.dp_rank, tp_rank)) % 2**63


def _due(before: int, step: int, interval: int, last: int) -> bool:
    """Whether a step from ``before`` to ``step`` reached ``last`` or crossed a multiple of
    ``interval`` (a parameter server's workers advance by the other workers' steps too)."""
    return step == last or (interval > 0 and before // interval < step // interval)


def train(cfg: Config) -> TrainSummary:
    check_output_path(cfg.training.out_dir, "training.out_dir")
    launch_position()  # a bad launch environment is one line before the out_dir is claimed
    fresh = untouched(cfg.training.out_dir)
    lock = claim_out_dir(cfg)  # one run per out_dir: taken, or refused, before anything is written
    preemption = Preemption(
        cfg.checkpoint.preempt_grace_s
    )  # SIGTERM / SIGUSR1: save and stop at a step boundary
    watchdog.start(cfg.training.out_dir, cfg.parallel.hang_timeout_s)
    try:
        return _train(cfg, preemption)
    except BaseException as err:
        stopped = isinstance(err, UserError | KeyboardInterrupt)
        if not (stopped or preemption.interrupted):
            raise
        watchdog.stop()
        release(lock)
        # Bad input (or an interrupt before any output) leaves the disk as it was, so the
        # heartbeats go too.
        if fresh:
            watchdog.remove_heartbeats(cfg.training.out_dir)
        if stopped:
            raise
        raise KeyboardInterrupt from err  # the interrupt broke whatever torch was doing
    finally:
        watchdog.stop()
        preemption.close()
        release(lock)


def _train(cfg: Config, preemption: Preemption) -> TrainSummary:
    task = (
        finetune_task(cfg)
        if cfg.finetune.task
        else translation_task(cfg)
        if is_translation_dir(cfg.data.dir)
        else None
    )
    s = build_session(cfg, task)
    cfg = s.cfg  # settled
    if s.model.serves:  # a parameter server: it answers the workers instead of training
        served = s.model.serve(s.optimizers, cfg.training.steps, s.step)
        return TrainSummary(rank=s.runtime.rank, step=served["step"], served=served)
    t = cfg.training
    out_dir = Path(t.out_dir)
    main_rank = s.runtime.is_main
    progress = ProgressDisplay(cfg.metrics.progress if main_rank else "none", t.steps, s.step)
    monitor = Monitor(s, progress)  # before anything is written: a busy exporter port fails first
    sinks = MetricsSinks(cfg.metrics, out_dir, s.step) if main_rank else None
    if main_rank:
        _describe(s, progress)
    summary = TrainSummary(resumed_from=str(s.resumed_from) if s.resumed_from else None)
    window_seconds, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
    while s.step < t.steps:
        start, before = time.perf_counter(), s.step
        loss = train_step(s)
        logging = _due(before, s.step, t.log_interval, t.steps)
        # Reading the loss waits for the device, so only when it is logged.
        loss_value = monitor.mean_loss(s, loss) if logging else math.nan
        window_seconds += time.perf_counter() - start
        window_steps += (
            s.step - before
        )  # 1, or for a parameter server's worker the job's steps meanwhile
        if logging and math.isfinite(
            loss_value
        ):  # not finite: a skipped step, logged with the next window
            record = _train_record(s, loss_value, window_seconds, window_steps)
            monitor.observe(s, record, sinks)
            summary.train_loss = loss_value
            progress.update(s.step - 1, record)
            if sinks:
                sinks.log(record)
            window_seconds, window_steps = 0.0, 0
            s.window_tokens, s.window_flops = 0, 0.0
        if _due(before, s.step, t.eval_interval, t.steps) and s.runtime.reports:
            watchdog.phase("eval", s.step)
            summary.val_loss = _evaluate(s, progress, sinks)["loss"]
        watchdog.phase("checkpoint", s.step)
        saved = (
            save(s)
            if _due(before, s.step, cfg.checkpoint.interval, t.steps) and s.runtime.reports
            else None
        )
        if saved:
            progress.message(f"step {s.step}: saved {saved}")
        if preemption.requested(s.runtime, time.perf_counter() - start) and s.step < t.steps:
            summary.preempted = str(saved or save(s))
            break
    _finish(s, summary, preemption, progress, monitor, sinks)
    return summary


def _finish(
    session: Session,
    summary: TrainSummary,
    preemption: Preemption,
    progress: ProgressDisplay,
    monitor: Monitor,
    sinks: MetricsSinks | None,
) -> None:
    """Score the held-out splits of a finished run, wait for a save still writing, report and
    close."""
    if (
        summary.preempted is None
        and session.step >= session.cfg.training.steps
        and session.runtime.reports
    ):
        for (
            split
        ) in session.task.final_splits:  # a fine-tuning task's test split: scored once, at the end
            summary.final[split] = _evaluate(session, progress, sinks, split)
    session.writer.close()  # a save still writing in the background finishes first
    if summary.preempted is not None and session.runtime.is_main:
        print(preemption.report(session.step, summary.preempted), flush=True)
    progress.close()
    monitor.close()
    if sinks:
        plot = sinks.close()
        if plot:
            print(f"loss plot: {plot}")
    summary.step, summary.tokens, summary.rank = session.step, session.tokens, session.runtime.rank


def _evaluate(
    session: Session, progress: ProgressDisplay, sinks: MetricsSinks | None, split: str = "val"
) -> Metrics:
    """Score ``split`` (the session's own metrics: loss first), show it and log it."""
    result = session.evaluate(split)
    shown = ", ".join(
        f"{name.replace('_', ' ')} {value:.4f}"
        for name, value in result.items()
        if value is not None
    )
    progress.message(f"step {session.step}: {split} {shown}")
    if sinks:
        sinks.log(
            {
                "kind": "eval" if split == "val" else split,
                "step": session.step,
                "tokens": session.tokens,
                **{f"{split}_{name}": value for name, value in result.items()},
            }
        )
    return result


def _train_record(session: Session, loss: float, seconds: float, steps: int) -> dict[str, Any]:
    """The logged window's figures: ``steps`` steps in ``seconds``, computing the session's
    window positions and FLOPs (trimmed batches count the positions they compute)."""
    tokens_per_s = session.window_tokens / seconds
    per_device = session.window_flops / seconds / session.runtime.world_size
    return {
        "kind": "train",
        "step": session.step,
        "tokens": session.tokens,
        **session.mix_tokens(),
        "loss": loss,
        "lr": session.optimizers[0].param_groups[0]["lr"],
        "ms_per_step": 1000 * seconds / steps,
        "tokens_per_s": tokens_per_s,
        "mfu": per_device / session.peak_flops if session.peak_flops else None,
        **session.model.comm_metrics(),
        **(session.experts.metrics() if session.experts is not None else {}),
        **({"skipped_steps": session.skipped_steps} if session.cfg.training.skip_nonfinite else {}),
    }


def _describe(session: Session, progress: ProgressDisplay) -> None:
    args = resolve_model_args(session.cfg, session.cfg.model.vocab_size)  # the settled sizes
    params, active = param_count(args), param_count(args, active=True)
    active_part = f" ({active / 1e6:.2f}M active per token)" if active != params else ""
    peak = f"{session.peak_flops / 1e12:.2f} TFLOP/s" if session.peak_flops else "unknown"
    r = session.runtime
    layout = describe_layout(session.cfg, r)
    progress.message(
        f"model {session.cfg.model.flavour}: {params / 1e6:.2f}M parameters{active_part}, "
        f"{session.flops_per_token / 1e6:.1f} MFLOP/token | "
        f"{session.tokens_per_step:,} tokens/step ({session.grad_accum} micro-steps) | {layout} | "
        f"{r.device}, {session.cfg.training.precision}, peak {peak}"
    )
    if session.cfg.data.mix:
        progress.message(f"data mix: {describe_mix(session.cfg.data.sources)}")
    if session.resumed_from:
        progress.message(f"resumed from {session.resumed_from} at step {session.step}")
