"""Everything one rank trains with, built once from the config: runtime, parallelized model,
optimizers, data loader, and the state resumed from a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import fsspec
import torch

from clusterlm import checkpoint
from clusterlm.checkpoint.async_writer import CheckpointWriter
from clusterlm.config import Config, grad_accum_steps, resolve_model_args
from clusterlm.config.slow_ranks import rank_factor
from clusterlm.data.loader import TokenLoader
from clusterlm.data.manifest import load_manifest, verify_shards
from clusterlm.data.masking import MaskedLoader
from clusterlm.distributed import restarts
from clusterlm.distributed.runtime import Runtime, setup_runtime
from clusterlm.errors import UserError
from clusterlm.hardware import peak_flops
from clusterlm.models import create_model, training_flops_per_token
from clusterlm.models.init import ParamSource, seeded_source
from clusterlm.observe.sample_log import SampleLog, open_sample_log
from clusterlm.parallel import ParallelModel, parallelize
from clusterlm.parallel.load_balance import LoadBalancer, attach_rank_timing, restore_counts
from clusterlm.parallel.precision import settle_attention, settle_precision
from clusterlm.train.evaluate import language_model_metrics
from clusterlm.train.objective import masking_rule
from clusterlm.train.optim import optimizer_recipe
from clusterlm.train.pretrained_weights import check_pretrained_tokenizer, pretrained_source


@dataclass(frozen=True)
class TokenizerFile:
    """The tokenizer the data was prepared with: saved in every checkpoint, checked on resume."""

    sha256: str
    payload: bytes


@dataclass
class Session:
    cfg: Config
    runtime: Runtime
    model: ParallelModel  # this rank's share: the whole model, a shard, or pipeline stages
    optimizers: list[torch.optim.Optimizer]  # one per part of the model
    loader: TokenLoader | MaskedLoader
    grad_accum: int
    flops_per_token: float
    peak_flops: float | None
    tokenizer: TokenizerFile
    step: int = 0
    tokens: int = 0
    resumed_from: Path | None = None
    slowdown: float = 1.0  # this rank's factor from training.slow_ranks (experiments)
    sample_log: SampleLog | None = None  # metrics.sample_log: the samples read per step
    balancer: LoadBalancer | None = None  # micro-batches per rank (parallel.load_balance)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)  # in line, or async (checkpoint.async_save)
    # split -> metrics, loss first: the periodic evaluation (language-model or task metrics)
    evaluator: Callable[[str], dict[str, float | None]] | None = None
    final_splits: tuple[str, ...] = ()  # scored once when the run completes (a task's test split)
    skipped_steps: int = 0  # steps not applied: their loss or gradient norm was not finite (training.skip_nonfinite)

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.cfg.training.micro_batch_size * self.cfg.seq_len * self.runtime.dp_size

    @property
    def checkpoints(self) -> Path:
        return Path(self.cfg.training.out_dir) / "checkpoints"


def build_model(cfg: Config, vocab_size: int) -> tuple[torch.nn.Module, ParamSource]:
    """The plain model on the meta device, and where its initial values come from: drawn per
    (seed, parameter name), so every rank and layout starts from the same weights."""
    with torch.device("meta"):
        model = create_model(resolve_model_args(cfg, vocab_size))
    return model, seeded_source(model.init_rule, cfg.training.seed)


def build_session(cfg: Config) -> Session:
    """The session of a language-model run: pretraining on ``data.dir`` (next-token or masked)."""
    runtime = setup_runtime(cfg)
    cfg.training.precision = settle_precision(cfg.training.precision, runtime.device, runtime.is_main)
    manifest = load_manifest(cfg.data.dir)
    if cfg.data.verify:
        verify_shards(cfg.data.dir)
    check_pretrained_tokenizer(cfg, manifest)
    plain, source = build_model(cfg, manifest.vocab_size)
    if not plain.args.is_encoder:  # the kernels are timed on causal attention
        shape = (cfg.training.micro_batch_size, plain.args.n_head // cfg.parallel.tp, cfg.seq_len, plain.args.head_dim)
        cfg.training.attention = settle_attention(cfg.training.attention, cfg.training.precision, runtime.device, shape)
    source = pretrained_source(cfg) or source  # model.init_from: pretrained weights, read shard by shard
    model = parallelize(plain, cfg, runtime.mesh, runtime.device, source, runtime.ps)
    grad_accum = grad_accum_steps(cfg, runtime.dp_size)
    loader = TokenLoader(
        cfg.data.dir, "train", cfg.seq_len, cfg.training.micro_batch_size, grad_accum,
        dp_rank=runtime.dp_rank, dp_size=runtime.dp_size, seed=cfg.training.seed, device=runtime.device,
    )
    if cfg.training.objective == "mlm":
        loader = MaskedLoader(loader, masking_rule(cfg))
    session = Session(
        cfg, runtime, model, model.build_optimizers(partial(optimizer_recipe, cfg=cfg.optim)), loader, grad_accum,
        training_flops_per_token(plain.args, cfg.seq_len),
        peak_flops(runtime.device, model.precision.compute_dtype, cfg.metrics.peak_flops),
        read_tokenizer(cfg.data.dir, manifest.tokenizer.sha256),
        evaluator=partial(language_model_metrics, model, cfg, runtime),
    )
    return start_session(session)


def read_tokenizer(data_dir: str, sha256: str) -> TokenizerFile:
    """The tokenizer of a prepared directory, as the manifest recorded it."""
    with fsspec.open(f"{data_dir.rstrip('/')}/tokenizer.json", "rb") as f:
        return TokenizerFile(sha256, f.read())


def start_session(session: Session) -> Session:
    """What every run adds to its model, loader and optimizers: the experiments' rank slowdown, rank
    timing and load balancing, the checkpoint writer, the resumed state and the sample log."""
    cfg, runtime = session.cfg, session.runtime
    session.slowdown = rank_factor(cfg.training.slow_ranks, runtime.rank, runtime.world_size)
    session.balancer = attach_rank_timing(session.model, session.loader, cfg, runtime.world_size, runtime.device)
    session.writer = CheckpointWriter(background=cfg.checkpoint.async_save)
    _resume(session)
    session.sample_log = open_sample_log(cfg.metrics.sample_log, cfg.training.out_dir, runtime, session.step)
    return session


def _resume(session: Session) -> None:
    cfg = session.cfg
    found = checkpoint.resolve_resume_once(cfg.checkpoint.resume, session.checkpoints, restarts.own_run())
    if found is None:
        return
    checkpoint.check_compatible(found.state["config"], cfg.to_dict(), found.path)
    if found.state.get("tokenizer_sha256") != session.tokenizer.sha256:
        raise UserError(f"checkpoint {found.path} was trained on data with a different tokenizer than {cfg.data.dir}")
    session.model.load_state_dict(checkpoint.CheckpointReader(found.path), session.optimizers)
    session.loader.load_state_dict(found.state["loader"])
    restore_counts(session.balancer, found.state.get("micro_batches_per_rank"))
    session.step, session.tokens, session.resumed_from = found.state["step"], found.state["tokens"], found.path


def save(s: Session) -> Path:
    state = {
        "step": s.step, "tokens": s.tokens, "loader": s.loader.state_dict(), "dp_size": s.runtime.dp_size,
        "config": s.cfg.to_dict(), "tokenizer_sha256": s.tokenizer.sha256, "run_id": restarts.run_id(),
        "micro_batches_per_rank": s.balancer.counts if s.balancer else None,
    }
    return s.writer.save(
        s.checkpoints, s.step, s.model.state_dict(s.optimizers), state, s.cfg.checkpoint.keep_last,
        files={"tokenizer.json": s.tokenizer.payload},
    )
