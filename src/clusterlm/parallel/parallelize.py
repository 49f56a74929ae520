"""Apply the parallelisms to a plain Transformer and return what the training loop needs.

``parallelize`` splits the model into pipeline stages (when ``parallel.pp > 1``), then applies to
each part, in torchtitan's order, tensor parallel, activation checkpointing, compile and data
parallel (outermost, so FSDP units wrap compiled, checkpointed blocks). What it returns, a
``ParallelModel``, does the strategy-specific parts of a step: forward and backward of the
micro-batches, the evaluation loss, gradient clipping, building the optimizers and the
checkpoint state. The loop therefore never asks which strategy it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from clusterlm.comm.hooks import CommHookState
from clusterlm.config import Config
from clusterlm.models.init import ParamSource
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel.activation_checkpointing import apply_activation_checkpointing
from clusterlm.parallel.data_parallel import (
    SHARDED,
    apply_data_parallel,
    build_optimizer,
    gradient_sync,
)
from clusterlm.parallel.materialize import canonical_name, materialize
from clusterlm.parallel.mesh import pipeline_microbatches
from clusterlm.parallel.pipeline import (
    build_schedule,
    clip_grad_norm_across_stages,
    pipeline_eval_loss,
    pipeline_step,
    split_into_stages,
    sync_tied_gradients,
)
from clusterlm.parallel.precision import Precision
from clusterlm.parallel.state_dict import load_training_state, training_state
from clusterlm.parallel.tensor_parallel import apply_tensor_parallel, full_value, loss_context

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Pipeline:
    """This rank's pipeline stages and the schedule that runs them."""

    schedule: Any
    stages: list[PipelineStage]
    n_microbatches: int


class ParallelModel:
    """This rank's share of the model, parallelized; one process is the degree-1 case."""

    pipeline: Pipeline | None = None

    def __init__(self, parts: list[nn.Module], precision: Precision, tp_size: int, shard_optimizer: bool,
                 comm: list[CommHookState]):
        self.parts, self.precision, self.tp_size = parts, precision, tp_size
        self.shard_optimizer, self.comm = shard_optimizer, comm

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches, gradients reduced across
        data-parallel ranks; the step's mean loss, the same on every rank."""
        raise NotImplementedError

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[summed loss, targets predicted right] of a batch, without gradients, the same on every
        rank of its tensor- and pipeline-parallel group; the count is NaN where the logits are
        split across ranks (tensor or pipeline parallel)."""
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        raise NotImplementedError

    def build_optimizers(self, recipe: Callable[[nn.Module], Any]) -> list[torch.optim.Optimizer]:
        """One optimizer per part from ``recipe(part)`` (see ``clusterlm.train.optim``)."""
        return [build_optimizer(recipe(part), self.shard_optimizer) for part in self.parts]

    def state_dict(self, optimizers: list[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
        """This rank's tensors under the full model's names (``clusterlm.parallel.state_dict``)."""
        return training_state(self.parts, optimizers)

    def load_state_dict(self, reader: Any, optimizers: list[torch.optim.Optimizer] | None = None) -> None:
        """Fill the parts (and optimizers) from a checkpoint ``reader`` (``.keys``, ``.read(state)``)."""
        load_training_state(self.parts, optimizers, reader.read, reader.keys)

    def comm_metrics(self) -> dict[str, float]:
        """Bytes this rank's gradient hooks sent so far, and their compression ratio."""
        if not self.comm:
            return {}
        sent = sum(state.stats.bytes_sent for state in self.comm)
        whole = sum(state.stats.bytes_uncompressed for state in self.comm)
        return {"comm_bytes_sent": float(sent), "comm_compression_ratio": whole / sent if sent else 1.0}


class WholeModel(ParallelModel):
    """The whole model on each rank of its tensor-parallel group (data parallel or one process)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **kwargs: Any):
        super().__init__(**kwargs)
        self.loss_fn = loss_fn

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Gradient accumulation: gradients are reduced across data-parallel ranks once, in the
        last micro-batch's backward."""
        model, count = self.parts[0], len(micro_batches)
        total = torch.zeros((), device=micro_batches[0][0].device)
        for i, (x, y) in enumerate(micro_batches):
            with gradient_sync(model, enabled=i == count - 1), loss_context(self.tp_size):
                loss = self.loss_fn(x, y)
                self.precision.scale(loss / count).backward()
            total += full_value(loss.detach())
        return total / count

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.precision.autocast(), loss_context(self.tp_size):
            logits = self.parts[0](x)
            loss = full_value(next_token_loss(logits, y, reduction="sum"))
        # Ignored targets (-100) never equal an argmax, so they never count as right.
        right = torch.tensor(float("nan")) if isinstance(logits, DTensor) else (logits.argmax(-1) == y).sum()
        return torch.stack([loss.float(), right.to(loss.device, torch.float32)])

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.parts[0].parameters(), max_norm)


class PipelinedModel(ParallelModel):
    """This rank's pipeline stages; a step is one batch, split into micro-batches by the schedule."""

    def __init__(self, pipeline: Pipeline, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        (x, y), = micro_batches  # the configuration check allows no accumulation with a pipeline
        p = self.pipeline
        with self.precision.autocast(), loss_context(self.tp_size):
            loss = pipeline_step(p.schedule, p.stages, p.n_microbatches, x, y)
        sync_tied_gradients(p.stages)
        return loss

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(), loss_context(self.tp_size):
            loss = full_value(pipeline_eval_loss(self.pipeline.stages, x, y) * y.numel()).float()
        return torch.stack([loss, torch.tensor(float("nan"), device=loss.device)])

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_across_stages(self.pipeline.stages, max_norm)


def _model_loss(model: nn.Module, precision: Precision, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with precision.autocast():
        logits = model(x)
    return next_token_loss(logits, y)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: every block has the same graph, so it compiles once and
    is reused, and the blocks stay separate modules for wrapping and checkpoint names."""
    for block in model.layers.children():
        block.compile()


def parallelize(model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device,
                source: ParamSource | None = None) -> ParallelModel:
    """This rank's share of ``model``, parallelized for ``cfg`` on ``mesh`` (None in a single
    process). ``model`` is either on ``device`` and initialized, or on the meta device: then each
    part is materialized once it is cut (after FSDP, or before DDP, which needs whole tensors),
    so this rank only ever allocates its share, filled from ``source``."""
    p = cfg.parallel
    sharded = mesh is not None and p.data_parallel in SHARDED
    precision = Precision(cfg.training.precision, device, sharded=sharded)
    comm: list[CommHookState] = []
    init_device = torch.device("cpu") if sharded and p.cpu_offload else device
    canonical = partial(canonical_name, tied_embeddings=model.args.tie_embeddings)

    def parallelize_part(part: nn.Module) -> nn.Module:
        if mesh is not None and p.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel)
        if not sharded:
            materialize(part, source, init_device, canonical)
        if cfg.training.activation_checkpointing != "none":
            apply_activation_checkpointing(part, cfg.training.activation_checkpointing)
        if cfg.training.compile and mesh is not None:  # one process compiles forward and loss whole
            apply_compile(part)
        if mesh is not None:
            param_dtype = None if precision.compute_dtype == torch.float32 else precision.compute_dtype
            part, state = apply_data_parallel(part, mesh, p, cfg.comm, param_dtype)
            comm.extend(filter(None, [state]))
        materialize(part, source, init_device, canonical)
        return part

    common = {"precision": precision, "tp_size": p.tp if mesh is not None else 1, "comm": comm,
              "shard_optimizer": mesh is not None and p.data_parallel == "zero1"}
    if mesh is None or p.pp == 1:
        part = parallelize_part(model)
        loss_fn = partial(_model_loss, part, precision)
        if cfg.training.compile and mesh is None:
            # One graph from tokens to loss: the compiler fuses across blocks, the embeddings, the
            # head and the loss. Across processes each block is compiled instead.
            loss_fn = torch.compile(loss_fn)
        return WholeModel(loss_fn, parts=[part], **common)
    stages = split_into_stages(model, mesh["pp"].get_group(), p.pp_schedule, p.pp_stages_per_rank or None,
                               parallelize_stage=parallelize_part, device=device)
    micro_batches = pipeline_microbatches(p)
    schedule = build_schedule(stages, p.pp_schedule, micro_batches)
    pipeline = Pipeline(schedule, stages, micro_batches)
    return PipelinedModel(pipeline, parts=[stage.submod for stage in stages], **common)
