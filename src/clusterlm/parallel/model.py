"""What the training loop needs of a parallelized model: ``ParallelModel``; ``WholeModel``, the
whole model on each rank (one process, data parallel, and the strategies built on it); and
``PipelinedModel``, this rank's pipeline stages.

``parallelize`` (``clusterlm.parallel.parallelize``) builds them; the strategies that add to a
step what happens outside backward (local SGD, DiLoCo, the parameter server) subclass
``WholeModel`` in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor

from clusterlm.comm.hooks import CommHookState
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel.clipping import clip_grad_norm, reduce_partial_grads
from clusterlm.parallel.data_parallel import (
    build_optimizer,
    gathered_for_accumulation,
    gradient_sync,
)
from clusterlm.parallel.load_balance import RankClock
from clusterlm.parallel.packed_inputs import ModelInputs
from clusterlm.parallel.pipeline import (
    clip_grad_norm_across_stages,
    pipeline_eval_loss,
    pipeline_step,
    sync_tied_gradients,
)
from clusterlm.parallel.precision import Precision
from clusterlm.parallel.stage_inputs import StageInputs
from clusterlm.parallel.state_dict import load_training_state, training_state
from clusterlm.parallel.tensor_parallel import full_value, loss_context, vocab_parallel_argmax

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Pipeline:
    """This rank's pipeline stages, the schedule that runs them, and what each stage reads of
    its micro-batches besides the hidden state."""

    schedule: Any
    stages: list[PipelineStage]
    n_microbatches: int
    inputs: StageInputs


class ParallelModel:
    """This rank's share of the model, parallelized; one process is the degree-1 case."""

    pipeline: Pipeline | None = None
    clock: RankClock | None = None  # times each rank's own share of a step (several processes)
    # Under load balancing ranks hold different numbers of micro-batches; each micro-batch's loss
    # is divided by the nominal count per rank, so that the gradient averaged over the ranks is
    # the mean over all of the step's micro-batches.
    balanced_micro_batches: int | None = None
    serves = False  # a parameter server's server rank: ``serve`` instead of the training loop
    # What the model reads of a batch besides its tokens (positions, document masks), and this
    # rank's share of a context-parallel sequence.
    inputs = ModelInputs()

    def __init__(
        self,
        parts: list[nn.Module],
        precision: Precision,
        tp_size: int,
        shard_optimizer: bool,
        comm: list[CommHookState],
    ):
        self.parts, self.precision, self.tp_size = parts, precision, tp_size
        self.shard_optimizer, self.comm = shard_optimizer, comm

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Forward and backward of one optimizer step's micro-batches, gradients reduced across
        data-parallel ranks; the step's mean loss, the same on every rank."""
        raise NotImplementedError

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[summed loss, targets predicted right] of a batch, without gradients, the same on every
        rank of its tensor- and pipeline-parallel group; the count is NaN where the logits are
        split across pipeline stages."""
        raise NotImplementedError

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        raise NotImplementedError

    def build_optimizers(self, recipe: Callable[[nn.Module], Any]) -> list[torch.optim.Optimizer]:
        """One optimizer per part from ``recipe(part)`` (see ``clusterlm.train.optim``)."""
        return [build_optimizer(recipe(part), self.shard_optimizer) for part in self.parts]

    def state_dict(self, optimizers: list[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
        """This rank's tensors under the full model's names (``clusterlm.parallel.state_dict``)."""
        return training_state(self.parts, optimizers)

    def load_state_dict(
        self, reader: Any, optimizers: list[torch.optim.Optimizer] | None = None
    ) -> None:
        """Fill the parts (and optimizers) from a checkpoint ``reader`` (``.keys``,
        ``.read(state)``)."""
        load_training_state(self.parts, optimizers, reader.read, reader.keys)

    def serve(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int, start_step: int
    ) -> dict[str, Any]:
        """A server rank's part of the job (where ``serves``): answer the workers until the servers
        applied ``total_steps``; returns what it did (``clusterlm.parallel.ps``)."""
        raise NotImplementedError

    def after_step(self, step: int) -> int:
        """Called after every optimizer step with the step reached; returns the job's step. The
        strategies that synchronize outside backward do it here (local SGD, DiLoCo), and a
        parameter server's worker returns the servers' step, which the other workers advance too."""
        return step

    def comm_metrics(self) -> dict[str, float]:
        """Bytes this rank's gradient hooks sent so far, and their compression ratio."""
        if not self.comm:
            return {}
        sent = sum(state.stats.bytes_sent for state in self.comm)
        whole = sum(state.stats.bytes_uncompressed for state in self.comm)
        return {
            "comm_bytes_sent": float(sent),
            "comm_compression_ratio": whole / sent if sent else 1.0,
        }


class WholeModel(ParallelModel):
    """The whole model on each rank of its tensor-parallel group (data parallel or one process)."""

    def __init__(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.loss_fn = loss_fn

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        """Gradient accumulation: gradients are reduced across data-parallel ranks once, in the
        last micro-batch's backward."""
        model, count = self.parts[0], len(micro_batches)
        divisor = self.balanced_micro_batches or count
        total = torch.zeros((), device=micro_batches[0][0].device)
        if self.clock is not None:
            self.clock.step_start()
        even = self.balanced_micro_batches is None
        with gathered_for_accumulation(model, enabled=not even):
            for i, (x, y) in enumerate(micro_batches):
                with (
                    gradient_sync(model, enabled=i == count - 1, even=even),
                    loss_context(self.tp_size),
                ):
                    loss = self.loss_fn(x, y)
                    self.precision.scale(loss / divisor).backward()
                total += full_value(loss.detach())
        reduce_partial_grads(model.parameters())
        if self.clock is not None:
            self.clock.gradients_reduced()
        return total / divisor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch, without gradients (a DTensor where split across
        ranks)."""
        x, _, kwargs = self.inputs(x, x)
        with torch.no_grad(), self.precision.autocast():
            return self.parts[0](x, **kwargs)

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y, kwargs = self.inputs(x, y)
        with torch.no_grad(), self.precision.autocast():
            logits = self.parts[0](x, **kwargs)
        with torch.no_grad(), loss_context(self.tp_size):
            loss = full_value(next_token_loss(logits, y, reduction="sum"))
        # Ignored targets (-100) never equal an argmax, so they never count as right.
        best = vocab_parallel_argmax(logits) if isinstance(logits, DTensor) else logits.argmax(-1)
        right = (best == y).sum()
        return self.inputs.combine(
            torch.stack([loss.float(), right.to(loss.device, torch.float32)])
        )

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(self.parts[0].parameters(), max_norm)


class PipelinedModel(ParallelModel):
    """This rank's pipeline stages; a step is one batch, split into micro-batches by the
    schedule."""

    pipeline: Pipeline

    def __init__(self, pipeline: Pipeline, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def forward_backward(self, micro_batches: list[Batch]) -> torch.Tensor:
        ((x, y),) = micro_batches  # the configuration check allows no accumulation with a pipeline
        p = self.pipeline
        x, y = self._fed(x, y, p.n_microbatches)
        with self.precision.autocast(), loss_context(self.tp_size):
            loss = pipeline_step(p.schedule, p.stages, p.n_microbatches, x, y)
        reduce_partial_grads(param for stage in p.stages for param in stage.submod.parameters())
        sync_tied_gradients(p.stages)
        return loss

    def eval_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self._fed(x, y, 1)
        with self.precision.autocast(), loss_context(self.tp_size):
            loss = full_value(pipeline_eval_loss(self.pipeline.stages, x, y) * y.numel()).float()
        return self.inputs.combine(
            torch.stack([loss, torch.tensor(float("nan"), device=loss.device)])
        )

    def _fed(self, x: torch.Tensor, y: torch.Tensor, pieces: int) -> Batch:
        """This rank's share of the batch (under context parallelism), with the positions and
        masks of its ``pieces`` equal micro-batches fed to the stages, which run them in order."""
        pieces_of = zip(x.chunk(pieces), y.chunk(pieces), strict=True)
        shares = [self.inputs(xs, ys) for xs, ys in pieces_of]
        self.pipeline.inputs.feed([inputs for _, _, inputs in shares])
        return torch.cat([xs for xs, _, _ in shares]), torch.cat([ys for _, ys, _ in shares])

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_across_stages(self.pipeline.stages, max_norm)
