"""Everything one rank trains with, built once by ``build_session``: the settled config, runtime,
parallelized model, optimizers, data loader, and the state resumed from a checkpoint.

What a run trains on comes as a ``TaskSpec``: language-model pretraining on ``data.dir``
(``language_model_task``) by default, or what a caller supplies (fine-tuning's classifier,
``clusterlm.train.finetune``). The config is settled once, before the model is built: precision,
attention kernel and the model's derived sizes are filled into a new frozen value, which every
later step reads and every checkpoint records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from clusterlm import checkpoint
from clusterlm.checkpoint.async_writer import CheckpointWriter
from clusterlm.config import Config, grad_accum_steps, settle_model
from clusterlm.config.data_mix import MixSource, parse_mix
from clusterlm.config.slow_ranks import rank_factor
from clusterlm.data.loader import SampleStream, TokenLoader, TokenStream
from clusterlm.data.manifest import check_files_present, verify_shards
from clusterlm.data.masking import MaskedLoader
from clusterlm.data.mixture import MixedStream, mix_labels, same_tokenizer
from clusterlm.data.packing import Packing, packing_for
from clusterlm.data.shard_cache import CacheSettings
from clusterlm.data.storage import is_local, url_to_fs
from clusterlm.distributed import restarts
from clusterlm.distributed.runtime import Runtime, setup_runtime
from clusterlm.errors import UserError
from clusterlm.hardware import peak_flops
from clusterlm.models import ModelArgs, create_model, training_flops_per_token
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.init import ParamSource, seeded_source
from clusterlm.observe.sample_log import SampleLog, open_sample_log
from clusterlm.parallel import ParallelModel, parallelize
from clusterlm.parallel.expert_balance import ExpertLoads, expert_loads
from clusterlm.parallel.load_balance import LoadBalancer, attach_rank_timing, restore_counts
from clusterlm.parallel.precision import settle_attention, settle_precision
from clusterlm.train.evaluate import language_model_metrics
from clusterlm.train.objective import masking_rule
from clusterlm.train.optim import OptimizerRecipe, optimizer_recipe
from clusterlm.train.pretrained_weights import check_pretrained_tokenizer, pretrained_source

Metrics = dict[str, float | None]  # name -> value, the loss first


@dataclass(frozen=True)
class TokenizerFile:
    """The tokenizer the data was prepared with: saved in every checkpoint, checked on resume."""

    sha256: str
    payload: bytes


@dataclass(frozen=True)
class TaskSpec:
    """What a run trains on.

    Everything of a session that is not built the same way for every run.
    """

    vocab_size: int
    tokenizer: TokenizerFile
    stream: SampleStream  # the training samples
    model: Callable[
        [Config], tuple[nn.Module, ParamSource]
    ]  # the plain model on meta, from the settled config
    flops_per_token: Callable[
        [ModelArgs, Config], float
    ]  # of the settled model, at the run's length
    recipe: Callable[[nn.Module, Config], OptimizerRecipe]
    evaluate: Callable[[Session, str], Metrics]  # the scores of a split
    masked: bool = False  # a masked language model: inputs masked and the loss scores those tokens
    final_splits: tuple[str, ...] = ()  # scored once when the run completes (a task's test split)
    packing: Packing = field(default_factory=Packing)  # where the documents of a window end
    # what a checkpoint carries besides the tokenizer for the run to be used alone (translate)
    saved_files: dict[str, bytes] = field(default_factory=dict)
    saved_state: dict[str, Any] = field(default_factory=dict)
    # positions and training FLOPs of the loader's next step over every rank, where batches are
    # trimmed (None: every micro-batch seq_len positions of flops_per_token)
    step_work: Callable[[ModelArgs, Config, TokenLoader], tuple[int, float]] | None = None


@dataclass
class Session:
    cfg: Config  # settled: what the run trains with, and what its checkpoints record
    runtime: Runtime
    model: ParallelModel  # this rank's share: the whole model, a shard, or pipeline stages
    optimizers: list[torch.optim.Optimizer]  # one per part of the model
    loader: TokenLoader | MaskedLoader
    grad_accum: int
    flops_per_token: float
    peak_flops: float | None
    task: TaskSpec
    step: int = 0
    tokens: int = 0
    resumed_from: Path | None = None
    slowdown: float = 1.0  # this rank's factor from training.slow_ranks (experiments)
    sample_log: SampleLog | None = None  # metrics.sample_log: the samples read per step
    balancer: LoadBalancer | None = None  # micro-batches per rank (parallel.load_balance)
    experts: ExpertLoads | None = None  # a mixture of experts' loads and routing-bias updates
    # in line, or async (checkpoint.async_save)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    # steps not applied: their loss or gradient norm was not finite (training.skip_nonfinite)
    skipped_steps: int = 0
    window_tokens: int = 0  # positions computed since the last logged window, over every rank
    window_flops: float = 0.0  # and their training FLOPs

    @property
    def tokens_per_step(self) -> int:
        return (
            self.grad_accum
            * self.cfg.training.micro_batch_size
            * self.cfg.seq_len
            * self.runtime.dp_size
        )

    @cached_property
    def model_args(self) -> ModelArgs:
        return resolve_model_args(self.cfg, self.task.vocab_size)

    def step_work(self) -> tuple[int, float]:
        """Positions the next step computes over every rank, and their training FLOPs."""
        if self.task.step_work is None:
            return self.tokens_per_step, self.tokens_per_step * self.flops_per_token
        assert isinstance(self.loader, TokenLoader)  # a translation task masks nothing
        return self.task.step_work(self.model_args, self.cfg, self.loader)

    @property
    def checkpoints(self) -> Path:
        return Path(self.cfg.training.out_dir) / "checkpoints"

    @property
    def tokenizer(self) -> TokenizerFile:
        return self.task.tokenizer

    def evaluate(self, split: str) -> Metrics:
        return self.task.evaluate(self, split)

    def mix_tokens(self) -> dict[str, int]:
        """Tokens trained on from each dataset of ``data.mix`` so far (none without a mix): a
        function of the loader's counter, so a resumed run recovers them."""
        stream = self.task.stream
        if not isinstance(stream, MixedStream):
            return {}
        served = stream.schedule(self.cfg.training.seed).counts(self.loader.samples_consumed)
        labels = mix_labels(stream.sources)
        return {f"tokens_{k}": n * self.cfg.seq_len for k, n in zip(labels, served, strict=True)}


def build_model(cfg: Config, vocab_size: int) -> tuple[torch.nn.Module, ParamSource]:
    """The plain model on the meta device, and where its initial values come from: drawn per
    (seed, parameter name), so every rank and layout starts from the same weights."""
    with torch.device("meta"):
        model = create_model(resolve_model_args(cfg, vocab_size))
    return model, seeded_source(model.init_rule, cfg.training.seed)


def build_session(cfg: Config, task: TaskSpec | None = None) -> Session:
    """The session of a run.

    Language-model pretraining on ``data.dir`` unless ``task`` says otherwise.
    """
    runtime = setup_runtime(cfg)
    task = task or language_model_task(cfg)
    cfg = settle_config(cfg, runtime, task.vocab_size)
    plain, source = task.model(cfg)
    model = parallelize(
        plain, cfg, runtime.mesh, runtime.device, source, runtime.ps, packing=task.packing
    )
    grad_accum = grad_accum_steps(cfg, runtime.dp_size)
    loader: TokenLoader | MaskedLoader = TokenLoader(
        task.stream,
        cfg.seq_len,
        cfg.training.micro_batch_size,
        grad_accum,
        dp_rank=runtime.dp_rank,
        dp_size=runtime.dp_size,
        seed=cfg.training.seed,
        device=runtime.device,
    )
    rule = masking_rule(cfg) if task.masked else None
    if rule is not None:
        loader = MaskedLoader(loader, rule)
    session = Session(
        cfg=cfg,
        runtime=runtime,
        model=model,
        loader=loader,
        grad_accum=grad_accum,
        task=task,
        optimizers=model.build_optimizers(lambda part: task.recipe(part, cfg)),
        flops_per_token=task.flops_per_token(resolve_model_args(cfg, task.vocab_size), cfg),
        peak_flops=peak_flops(
            runtime.device, model.precision.compute_dtype, cfg.metrics.peak_flops
        ),
        experts=expert_loads(model.parts, cfg.model, runtime.mesh, runtime.device),
    )
    return _start_session(session)


def settle_config(cfg: Config, runtime: Runtime, vocab_size: int) -> Config:
    """The run's config with every 'auto' and 'derive it' value decided: the precision, the
    model's derived sizes, and the attention kernel (timed on causal attention, so decoders
    only)."""
    precision = settle_precision(cfg.training.precision, runtime.device, runtime.is_main)
    cfg = settle_model(cfg, vocab_size)
    m, attention = cfg.model, cfg.training.attention
    if m.flavour != "bert":
        shape = (
            cfg.training.micro_batch_size,
            m.n_head // cfg.parallel.tp,
            cfg.seq_len,
            m.n_embd // m.n_head,
        )
        attention = settle_attention(attention, precision, runtime.device, shape, m.dropout)
    return dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, precision=precision, attention=attention)
    )


def language_model_task(cfg: Config) -> TaskSpec:
    """Pretraining on the prepared corpus of ``data.dir``: next-token, or masked for an encoder;
    from seeded weights, or the pretrained ones ``model.init_from`` names."""
    if cfg.model.flavour == "mbart":
        raise UserError(
            f"model.flavour = mbart trains on a translation task, and {cfg.data.dir} is not one; "
            "prepare one with `clusterlm prepare --task translation:bible-en-es --out DIR` "
            "and pass data.dir DIR"
        )
    dirs = [source.dir for source in cfg.data.sources]
    manifest = same_tokenizer(dirs)[0]
    if cfg.data.verify:  # a remote store's shards are verified as they arrive in the cache
        for directory in dirs:
            (verify_shards if is_local(url_to_fs(directory)[0]) else check_files_present)(directory)
    check_pretrained_tokenizer(cfg, manifest)

    def model(settled: Config) -> tuple[nn.Module, ParamSource]:
        plain, seeded = build_model(settled, manifest.vocab_size)
        return plain, pretrained_source(
            settled
        ) or seeded  # pretrained weights are read shard by shard

    return TaskSpec(
        vocab_size=manifest.vocab_size,
        tokenizer=read_tokenizer(dirs[0], manifest.tokenizer.sha256),
        stream=MixedStream(cfg.data.sources, "train", CacheSettings.of(cfg.data))
        if cfg.data.mix
        else TokenStream(cfg.data.dir, "train", CacheSettings.of(cfg.data)),
        model=model,
        flops_per_token=lambda args, settled: training_flops_per_token(args, settled.seq_len),
        recipe=lambda part, cfg: optimizer_recipe(part, cfg.optim),
        evaluate=lambda s, split: language_model_metrics(s.model, s.cfg, s.runtime, split),
        masked=cfg.training.objective == "mlm",
        packing=packing_for(manifest.eot_id, cfg.data.document_masking, cfg.model.position_reset),
    )


def read_tokenizer(data_dir: str, sha256: str, name: str = "tokenizer.json") -> TokenizerFile:
    """The tokenizer ``name`` of a prepared directory, as the manifest recorded it."""
    try:
        with fsspec.open(f"{data_dir.rstrip('/')}/{name}", "rb") as f:
            return TokenizerFile(sha256, f.read())
    except FileNotFoundError:
        raise UserError(
            f"{name} is missing from {data_dir}; "
            f"run `clusterlm prepare --out {data_dir} --force` to rebuild it"
        ) from None


def _start_session(session: Session) -> Session:
    """What every run adds to its model, loader and optimizers: the experiments' rank slowdown, rank
    timing and load balancing, the checkpoint writer, the resumed state and the sample log."""
    cfg, runtime = session.cfg, session.runtime
    session.slowdown = rank_factor(cfg.training.slow_ranks, runtime.rank, runtime.world_size)
    session.balancer = attach_rank_timing(
        session.model, session.loader, cfg, runtime.world_size, runtime.device
    )
    session.writer = CheckpointWriter(background=cfg.checkpoint.async_save)
    _resume(session)
    session.sample_log = open_sample_log(
        cfg.metrics.sample_log, cfg.training.out_dir, runtime, session.step
    )
    return session


def _resume(session: Session) -> None:
    cfg = session.cfg
    found = checkpoint.resolve_resume_once(
        cfg.checkpoint.resume, session.checkpoints, restarts.own_run()
    )
    if found is None:
        return
    checkpoint.check_compatible(found.state["config"], cfg.to_dict(), found.path)
    if found.state.get("tokenizer_sha256") != session.tokenizer.sha256:
        raise UserError(
            f"checkpoint {found.path} was trained on data with a different tokenizer "
            f"than {cfg.data.dir}"
        )
    session.model.load_state_dict(checkpoint.CheckpointReader(found.path), session.optimizers)
    session.loader.load_state_dict(found.state["loader"])
    saved_mix = parse_mix(found.state["config"].get("data", {}).get("mix", ""))
    if _shares(saved_mix) != _shares(parse_mix(cfg.data.mix)):
        raise UserError(
            f"checkpoint {found.path} was trained on another data.mix (other datasets or "
            "weights); resume with the mix it was saved with, or start a new training.out_dir"
        )
    restore_counts(session.balancer, found.state.get("micro_batches_per_rank"))
    session.step, session.tokens, session.resumed_from = (
        found.state["step"],
        found.state["tokens"],
        found.path,
    )


def _shares(sources: tuple[MixSource, ...]) -> list[float]:
    """The share of the samples each dataset of a mix serves (a mix's datasets may move)."""
    return [source.weight / sum(s.weight for s in sources) for source in sources]


def save(session: Session) -> Path:
    state = {
        "step": session.step,
        "tokens": session.tokens,
        "loader": session.loader.state_dict(),
        "dp_size": session.runtime.dp_size,
        "config": session.cfg.to_dict(),
        "tokenizer_sha256": session.tokenizer.sha256,
        "run_id": restarts.run_id(),
        "micro_batches_per_rank": session.balancer.counts if session.balancer else None,
        "mix_tokens": session.mix_tokens(),
        **session.task.saved_state,
    }
    return session.writer.save(
        session.checkpoints,
        session.step,
        session.model.state_dict(session.optimizers),
        state,
        session.cfg.checkpoint.keep_last,
        files={"tokenizer.json": session.tokenizer.payload, **session.task.saved_files},
    )
