"""The training loop: build a session from the config, then step, log, evaluate and checkpoint.

Everything a rank does is a function of (seed, step, rank): the data window of each sample, the
dropout masks (the RNG is re-seeded every step) and the initialization. That is what makes a
resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.config import (
    Config,
    build_config,
    grad_accum_steps,
    help_text,
    parse_dotted_args,
    resolve_model_args,
)
from clusterlm.data.loader import TokenLoader
from clusterlm.data.manifest import load_manifest, verify_shards
from clusterlm.errors import UserError
from clusterlm.launch import add_launch_arguments, run_torchrun
from clusterlm.models import Transformer, param_count, training_flops_per_token
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel import parallelize
from clusterlm.parallel.data_parallel import SHARDED, gradient_sync
from clusterlm.parallel.parallelize import Pipeline
from clusterlm.parallel.pipeline import (
    clip_grad_norm_across_stages,
    pipeline_step,
    sync_tied_gradients,
)
from clusterlm.parallel.tensor_parallel import full_value, loss_context
from clusterlm.train import checkpoint
from clusterlm.train.evaluate import eval_windows, evaluate_loss
from clusterlm.train.hardware import peak_flops
from clusterlm.train.metrics import MetricsSinks, ProgressDisplay
from clusterlm.train.optim import build_optimizer, lr_at
from clusterlm.train.precision import Precision
from clusterlm.train.runtime import Runtime, average_across_ranks, describe_layout, setup_runtime


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> Transformer:
    torch.manual_seed(cfg.training.seed)
    return Transformer(resolve_model_args(cfg, vocab_size)).to(device)


@dataclass
class Session:
    """Everything one rank trains with."""

    cfg: Config
    runtime: Runtime
    parts: list[nn.Module]  # this rank's model: the whole model, or its pipeline stages
    optimizers: list[torch.optim.Optimizer]  # one per part
    pipeline: Pipeline | None
    loader: TokenLoader
    precision: Precision
    grad_accum: int
    flops_per_token: float
    peak_flops: float | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # without a pipeline
    step: int = 0
    tokens: int = 0
    resumed_from: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.cfg.training.micro_batch_size * self.cfg.seq_len * self.runtime.dp_size


def build_session(cfg: Config) -> Session:
    runtime = setup_runtime(cfg)
    manifest = load_manifest(cfg.data.dir)
    if cfg.data.verify:
        verify_shards(cfg.data.dir)
    model = build_model(cfg, manifest.vocab_size, runtime.device)
    flops = training_flops_per_token(model.args, cfg.seq_len)
    sharded = runtime.mesh is not None and cfg.parallel.data_parallel in SHARDED
    precision = Precision(cfg.training.precision, runtime.device, sharded)
    parts, pipeline = parallelize(model, cfg, runtime.mesh, precision.compute_dtype)
    zero1 = runtime.mesh is not None and cfg.parallel.data_parallel == "zero1"
    grad_accum = grad_accum_steps(cfg, runtime.dp_size)
    if pipeline is not None and grad_accum > 1:
        raise UserError("with parallel.pp > 1 the pipeline splits each batch into parallel.pp_microbatches; "
                        "leave training.tokens_per_step at one micro-batch per data-parallel rank")
    loader = TokenLoader(
        cfg.data.dir, "train", cfg.seq_len, cfg.training.micro_batch_size, grad_accum,
        dp_rank=runtime.dp_rank, dp_size=runtime.dp_size, seed=cfg.training.seed, device=runtime.device,
    )
    optimizers = [build_optimizer(part, cfg.optim, shard_state=zero1) for part in parts]
    session = Session(
        cfg, runtime, parts, optimizers, pipeline, loader, precision, grad_accum,
        flops, peak_flops(runtime.device, precision.compute_dtype, cfg.metrics.peak_flops),
    )
    if pipeline is None:
        session.loss_fn = partial(model_loss, parts[0], precision)
        if cfg.training.compile and runtime.mesh is None:
            # One graph from tokens to loss: the compiler fuses across blocks, the embeddings, the
            # head and the loss. Across processes ``parallelize`` compiles each block instead.
            session.loss_fn = torch.compile(session.loss_fn)
    session.extra["tokenizer_sha256"] = manifest.tokenizer.sha256
    with fsspec.open(f"{cfg.data.dir.rstrip('/')}/tokenizer.json", "rb") as f:
        session.extra["tokenizer_json"] = f.read()
    _resume(session)
    return session


def _resume(session: Session) -> None:
    cfg = session.cfg
    root = Path(cfg.training.out_dir) / "checkpoints"
    path = checkpoint.resolve_resume(cfg.checkpoint.resume, root)
    if path is None:
        return
    saved = checkpoint.verify(path)
    checkpoint.check_compatible(saved["config"], cfg.to_dict(), path)
    if saved.get("tokenizer_sha256") != session.extra["tokenizer_sha256"]:
        raise UserError(f"checkpoint {path} was trained on data with a different tokenizer than {cfg.data.dir}")
    state = checkpoint.load_checkpoint(path, session.parts, session.optimizers)
    session.loader.load_state_dict(state["loader"])
    session.step, session.tokens, session.resumed_from = state["step"], state["tokens"], path


def train_step(s: Session) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches (or one pipelined batch); returns the
    mean loss (a tensor, so the device is not synchronized unless the caller reads it)."""
    torch.manual_seed(_dropout_seed(s))
    lr = lr_at(s.step, s.cfg.optim, s.cfg.training.steps)
    for optimizer in s.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr
    micro_batches = s.loader.next_step()
    with attention_kernel(s.cfg.training.attention):
        if s.pipeline is not None:
            loss = _pipeline_forward_backward(s, *micro_batches[0])
        else:
            loss = _forward_backward(s, micro_batches)
    for optimizer in s.optimizers:
        s.precision.unscale(optimizer)
    if s.cfg.training.grad_clip:
        if s.pipeline is not None:
            clip_grad_norm_across_stages(s.pipeline.stages, s.cfg.training.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(s.parts[0].parameters(), s.cfg.training.grad_clip)
    s.precision.step(s.optimizers)
    for optimizer in s.optimizers:
        optimizer.zero_grad(set_to_none=True)
    s.step += 1
    s.tokens += s.tokens_per_step
    return loss


def _forward_backward(s: Session, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Gradient accumulation: gradients are reduced across data-parallel ranks once, in the last
    micro-batch's backward."""
    model, total = s.parts[0], torch.zeros((), device=s.runtime.device)
    for i, (x, y) in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1), loss_context(s.runtime.tp_size):
            loss = s.loss_fn(x, y)
            s.precision.scale(loss / s.grad_accum).backward()
        total += full_value(loss.detach())
    return total / s.grad_accum


def model_loss(model: nn.Module, precision: Precision, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next tokens; the logits' log-softmax is taken in fp32."""
    with precision.autocast():
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def _pipeline_forward_backward(s: Session, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with s.precision.autocast(), loss_context(s.runtime.tp_size):
        loss = pipeline_step(s.pipeline.schedule, s.pipeline.stages, x, y)
    sync_tied_gradients(s.pipeline.stages)
    return loss


def _dropout_seed(s: Session) -> int:
    """Dropout masks are a function of (seed, step, rank). Tensor-parallel ranks hold the same
    residual stream unless it is split along the sequence, so they share a seed then."""
    tp_rank = s.runtime.tp_rank if s.cfg.parallel.sequence_parallel else 0
    return hash((s.cfg.training.seed, s.step, s.runtime.dp_rank, tp_rank)) % 2**63


def save(s: Session) -> Path:
    state = {
        "step": s.step, "tokens": s.tokens, "loader": s.loader.state_dict(), "dp_size": s.runtime.dp_size,
        "config": s.cfg.to_dict(), "tokenizer_sha256": s.extra["tokenizer_sha256"],
    }
    root = Path(s.cfg.training.out_dir) / "checkpoints"
    return checkpoint.save_checkpoint(
        root, s.step, s.parts, s.optimizers, state, s.cfg.checkpoint.keep_last,
        files={"tokenizer.json": s.extra["tokenizer_json"]},
    )


def _due(step: int, interval: int, last: int) -> bool:
    return step == last or (interval > 0 and step % interval == 0)


def train(cfg: Config) -> dict[str, Any]:
    s = build_session(cfg)
    t = cfg.training
    out_dir = Path(t.out_dir)
    main_rank = s.runtime.is_main
    progress = ProgressDisplay(cfg.metrics.progress if main_rank else "none", t.steps, s.step)
    sinks = MetricsSinks(cfg.metrics, out_dir, s.step) if main_rank else None
    if main_rank:
        _describe(s, progress)
    summary: dict[str, Any] = {"resumed_from": str(s.resumed_from) if s.resumed_from else None}
    window_seconds, window_steps = 0.0, 0  # training time only: evaluation and saving excluded
    while s.step < t.steps:
        start = time.perf_counter()
        loss = train_step(s)
        logging = _due(s.step, t.log_interval, t.steps)
        # Reading the loss waits for the device, so only when it is logged.
        loss_value = average_across_ranks(loss, s.runtime).item() if logging else None
        window_seconds += time.perf_counter() - start
        window_steps += 1
        if logging:
            if not math.isfinite(loss_value):
                raise UserError(f"loss became {loss_value} at step {s.step}; lower optim.lr and resume from the "
                                "last good checkpoint with --resume auto")
            record = _train_record(s, loss_value, window_seconds / window_steps)
            summary["train_loss"] = loss_value
            progress.update(s.step - 1, record)
            if sinks:
                sinks.log(record)
            window_seconds, window_steps = 0.0, 0
        if _due(s.step, t.eval_interval, t.steps):
            val = evaluate_loss(s.parts, s.pipeline, cfg, s.runtime, s.precision, eval_windows(cfg, s.runtime.dp_size))
            summary["val_loss"] = val
            progress.message(f"step {s.step}: val loss {val:.4f}, perplexity {math.exp(val):.2f}")
            if sinks:
                sinks.log({"kind": "eval", "step": s.step, "tokens": s.tokens, "val_loss": val,
                           "val_perplexity": math.exp(val)})
        if _due(s.step, cfg.checkpoint.interval, t.steps):
            progress.message(f"step {s.step}: saved {save(s)}")
    progress.close()
    if sinks:
        plot = sinks.close()
        if plot:
            print(f"loss plot: {plot}")
    summary.update(step=s.step, tokens=s.tokens, rank=s.runtime.rank)
    return summary


def _train_record(s: Session, loss: float, seconds_per_step: float) -> dict[str, Any]:
    tokens_per_s = s.tokens_per_step / seconds_per_step
    per_device = tokens_per_s * s.flops_per_token / s.runtime.world_size
    return {
        "kind": "train", "step": s.step, "tokens": s.tokens, "loss": loss,
        "lr": s.optimizers[0].param_groups[0]["lr"], "ms_per_step": 1000 * seconds_per_step,
        "tokens_per_s": tokens_per_s, "mfu": per_device / s.peak_flops if s.peak_flops else None,
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


def config_from_argv(
    argv: list[str], prog: str, description: str, launch: argparse.Namespace | None = None
) -> Config | None:
    """Shared by train and bench: --config FILE, --resume, then dotted overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, add_help=False,
        epilog="config keys (--section.key VALUE, defaults shown):\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key")
    parser.add_argument("--config", help="TOML file of settings (see configs/*.toml)")
    parser.add_argument("--resume", help="shorthand for --checkpoint.resume (none | auto | PATH)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if launch is not None:
        add_launch_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return None
    if launch is not None:
        vars(launch).update({k: v for k, v in vars(args).items()
                             if k in ("nproc", "nnodes", "rdzv_endpoint", "max_restarts")})
    overrides = parse_dotted_args(rest)
    if args.resume:
        overrides["checkpoint.resume"] = args.resume
    cfg = build_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_json())
        return None
    return cfg


def main(argv: list[str]) -> int:
    launch = argparse.Namespace()
    cfg = config_from_argv(argv, "clusterlm train", "Train a language model.", launch)
    if cfg is None:
        return 0
    if launch.nproc and "WORLD_SIZE" not in os.environ:
        return run_torchrun(launch, ["train", *argv])
    summary = train(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if "val_loss" in summary and summary["rank"] == 0:
        print(f"done: step {summary['step']}, val loss {summary['val_loss']:.4f} "
              f"(perplexity {math.exp(summary['val_loss']):.2f})")
    return 0

