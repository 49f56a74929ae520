"""Pipeline parallelism: the plain ``Transformer`` cut into stages by layers, run by the schedules
of ``torch.distributed.pipelining``.

Each batch is split into micro-batches that flow through the stages, so ranks holding different
layers work at the same time. The schedules differ in the order of forwards and backwards:

- ``gpipe``: all forwards, then all backwards (GPipe, Huang et al. 2019).
- ``1f1b``: one forward, one backward in steady state, so at most ``pp`` micro-batches of
  activations are alive (PipeDream-Flush, Narayanan et al. 2019/2021).
- ``interleaved_1f1b``, ``looped_bfs``: several stages per rank, assigned round-robin (stage
  ``i`` on rank ``i % pp``), which shrinks the bubble by that factor (Narayanan et al. 2021;
  breadth-first: Lamy-Poirier 2023).
- ``interleaved_zero_bubble``, ``zbv_zero_bubble``, ``dualpipev``: the backward split into input
  and weight gradients, the latter moved into the bubbles (Qi et al. 2023; DualPipe: DeepSeek-AI
  2024). The V schedules hold exactly two stages per rank in a V: rank ``r`` holds stages ``r``
  and ``2 pp - 1 - r``, so the first and the last stage share rank 0.

A stage module is a copy of the model with the other stages' layers, embeddings and head
removed; parameter names stay those of the full model, so stage checkpoints load into one process.
GPT-2's tied embedding is split like Megatron-LM does it: the last stage's output projection is
its own copy of the token table, initialized equal, and ``sync_tied_gradients`` sums the two
gradients every step so both copies take the same update.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from clusterlm.config.degrees import SCHEDULE_PLACEMENT, schedule_placement, stages_per_rank_for
from clusterlm.errors import UserError
from clusterlm.models.counting import embedding_params, head_params, layer_params
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel.clipping import scale_grads, squared_grad_norm
from clusterlm.parallel.expert_balance import forget_metadata_forward

# name -> schedule class; where each places its stages is ``SCHEDULE_PLACEMENT``
SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
assert set(SCHEDULES) == set(SCHEDULE_PLACEMENT)


def stage_indices_on_rank(
    schedule: str, pp_rank: int, pp_size: int, stages_per_rank: int
) -> list[int]:
    """Global indices of the stages rank ``pp_rank`` holds, in the order the schedule expects."""
    if schedule_placement(schedule) == "v":
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def stage_layer_ranges(args: ModelArgs, num_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, minimizing the largest stage's parameter count.

    Parameters set a stage's memory (weights, gradients, optimizer state) and, for the blocks,
    its compute. The first stage also holds the embedding tables, the last the final norm and the
    output projection (for gpt2 its own copy of the tied table), so they get fewer layers when
    those are large. Every stage gets at least one layer.
    """
    if args.n_layer < num_stages:
        raise UserError(
            f"a pipeline of {num_stages} stages needs at least {num_stages} layers but "
            f"model.n_layer = {args.n_layer}; use fewer stages or more layers"
        )
    per_layer = layer_params(args)
    extra = [0] * num_stages
    extra[0] += embedding_params(args)
    extra[-1] += head_params(args)
    if args.tie_embeddings and num_stages > 1:
        extra[-1] += args.vocab_size * args.n_embd

    @cache
    def best(stage: int, first_layer: int) -> tuple[int, tuple[int, ...]]:
        """(largest stage cost, layer counts) of the best split of layers ``first_layer..`` over
        stages ``stage..``."""
        layers_left, stages_left = args.n_layer - first_layer, num_stages - stage
        if stages_left == 1:
            return layers_left * per_layer + extra[stage], (layers_left,)
        options = []
        for count in range(1, layers_left - stages_left + 2):
            rest_cost, rest_counts = best(stage + 1, first_layer + count)
            options.append(
                (max(count * per_layer + extra[stage], rest_cost), (count, *rest_counts))
            )
        return min(options)

    ranges, start = [], 0
    for count in best(0, 0)[1]:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_module(model: Transformer, layers: range, is_first: bool, is_last: bool) -> Transformer:
    """A copy of ``model`` keeping only ``layers`` and, on the first stage, the embeddings, on the
    last the final norm and output projection. Removing the token table from a gpt2 last stage
    leaves its output projection as an independent copy of the tied matrix."""
    module = copy.deepcopy(model)
    for name in list(module.layers.keys()):
        if int(name) not in layers:
            del module.layers[name]
    if not is_first:
        module.tok_embeddings = None
        module.pos_embeddings = None
    if not is_last:
        module.norm = None
        module.output = None
    return module


def split_into_stages(
    model: Transformer,
    pp_group: dist.ProcessGroup,
    schedule: str,
    stages_per_rank: int | None = None,
    parallelize_stage: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | None = None,
) -> list[PipelineStage]:
    """This rank's pipeline stages of ``model``; ``stage.submod`` is each stage's module.

    ``model`` is the full model, either initialized or on the meta device, where copying it costs
    no memory and each stage is materialized by ``parallelize_stage`` (which also applies tensor
    parallel, activation checkpointing, compile and FSDP) with only its own layers. It is copied,
    not modified. ``device`` is where the stages run (default: where ``model`` is).
    """
    pp_rank, pp_size = dist.get_rank(pp_group), dist.get_world_size(pp_group)
    per_rank = stages_per_rank_for(schedule, stages_per_rank)
    num_stages = pp_size * per_rank
    ranges = stage_layer_ranges(model.args, num_stages)
    device = device or next(model.parameters()).device
    stages = []
    for index in stage_indices_on_rank(schedule, pp_rank, pp_size, per_rank):
        module: nn.Module = stage_module(model, ranges[index], index == 0, index == num_stages - 1)
        if parallelize_stage is not None:
            module = parallelize_stage(module)
        stage = PipelineStage(module, index, num_stages, device, group=pp_group)
        forget_metadata_forward(stage)
        stages.append(stage)
    return stages


def build_schedule(
    stages: list[PipelineStage],
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss,
):
    """The ``torch.distributed.pipelining`` schedule ``schedule`` over this rank's ``stages``.

    ``loss_fn(logits, targets)`` is a micro-batch's mean loss. It is divided by ``n_microbatches``
    and the schedule's own gradient scaling is off, so the micro-batch losses sum to the batch's
    mean loss and the accumulated gradients are those of the whole batch.
    """
    stages_per_rank_for(schedule, len(stages))
    schedule_class, placement = SCHEDULES[schedule], schedule_placement(schedule)

    def microbatch_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits, targets) / n_microbatches

    try:
        return schedule_class(
            stages[0] if placement == "single" else stages,
            n_microbatches,
            loss_fn=microbatch_loss,
            scale_grads=False,
        )
    except ValueError as err:
        raise UserError(
            f"pipeline schedule {schedule} with {n_microbatches} micro-batches: {err}"
        ) from None


def _loss_on_every_rank(loss: torch.Tensor | None, stages: list[PipelineStage]) -> torch.Tensor:
    # Only the last stage has the loss; zeros elsewhere make the sum exact on every rank.
    total = loss.detach() if loss is not None else torch.zeros((), device=stages[0].device)
    if isinstance(total, DTensor):  # the vocabulary-parallel loss is replicated over tp
        total = total.full_tensor()
    dist.all_reduce(total, group=stages[0].group)
    return total


def pipeline_step(
    schedule, stages: list[PipelineStage], n_microbatches: int, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Forward and backward of the batch (tokens ``x``, targets ``y``, [B, T]) on this rank's
    stages, accumulating into the stage parameters' ``.grad``; returns the batch's mean loss on
    every rank. Every rank passes the same batch; only the first and last stage read it."""
    if x.size(0) % n_microbatches:  # unequal micro-batches would weight tokens unequally
        raise UserError(
            f"a batch of {x.size(0)} sequences does not split into {n_microbatches} equal "
            "micro-batches; make the batch a multiple of the micro-batch count"
        )
    holds_first = any(stage.is_first for stage in stages)
    holds_last = any(stage.is_last for stage in stages)
    losses: list[torch.Tensor] = []
    schedule.step(
        *((x,) if holds_first else ()),
        target=y if holds_last else None,
        losses=losses,
        return_outputs=False,
    )
    return _loss_on_every_rank(torch.stack(losses).sum() if holds_last else None, stages)


@torch.no_grad()
def pipeline_eval_loss(
    stages: list[PipelineStage],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = next_token_loss,
) -> torch.Tensor:
    """Forward only (dropout off) of the batch through the stages in order; its mean loss on
    every rank. Call after ``build_schedule``, which fixes the stage-to-rank placement.

    The schedules' own ``eval()`` replays the training action list, whose V-schedule backward
    steps fail without a backward, so the hidden state is passed stage to stage here, in fp32:
    the dtype of the residual stream between blocks, weights being fp32 (under autocast too).
    """
    group, rank = stages[0].group, stages[0].group_rank
    owner = stages[0].stage_index_to_group_rank
    local = {stage.stage_index: _stage_model(stage) for stage in stages}
    modes = {index: module.training for index, module in local.items()}
    hidden = x
    try:
        for index in range(stages[0].num_stages):
            if index > 0 and owner[index - 1] != owner[index]:
                if owner[index - 1] == rank:
                    dist.send(hidden.float().contiguous(), group=group, group_dst=owner[index])
                elif owner[index] == rank:
                    hidden = torch.empty(*x.shape, local[index].args.n_embd, device=x.device)
                    dist.recv(hidden, group=group, group_src=owner[index - 1])
            if owner[index] == rank:
                hidden = local[index].eval()(hidden)
    finally:
        for index, module in local.items():
            module.train(modes[index])
    holds_last = any(stage.is_last for stage in stages)
    return _loss_on_every_rank(loss_fn(hidden, y) if holds_last else None, stages)


def _stage_model(stage: PipelineStage) -> Transformer:
    """The module of ``stage``: a ``Transformer`` cut by ``stage_module`` (FSDP wraps it in
    place)."""
    module = stage.submod
    assert isinstance(module, Transformer)
    return module


def _tied_copy(module: Transformer) -> torch.Tensor | None:
    """A last stage's output projection where it copies the first stage's token table; else None."""
    if module.args.tie_embeddings and module.output is not None and module.tok_embeddings is None:
        return module.output.weight
    return None


def sync_tied_gradients(stages: list[PipelineStage]) -> None:
    """Sum the gradients of the tied token table and its output-projection copy across the pp
    group, so both copies take the update of the single tied matrix. Call on every pp rank after
    the backward and before clipping and the optimizer step; a no-op for untied models."""
    modules = [_stage_model(stage) for stage in stages]
    args = modules[0].args
    if not args.tie_embeddings or stages[0].num_stages == 1:
        return
    copies = [m.tok_embeddings.weight for m in modules if m.tok_embeddings is not None]
    copies += [tied for m in modules if (tied := _tied_copy(m)) is not None]
    total = torch.zeros(args.vocab_size, args.n_embd, device=stages[0].device)
    for weight in copies:
        if weight.grad is not None:
            # A sharded copy (tensor or fully sharded data parallel) is summed whole: ranks without
            # either copy cannot know a shard's shape, and the table is small where it is tied.
            total += weight.grad.full_tensor() if isinstance(weight.grad, DTensor) else weight.grad
    # Ranks without either copy add zeros: the sum of the two gradients is exact on every rank.
    dist.all_reduce(total, group=stages[0].group)
    for weight in copies:
        if isinstance(weight, DTensor):  # every rank holds the whole sum: each keeps its own shard
            weight.grad = distribute_tensor(
                total, weight.device_mesh, weight.placements, src_data_rank=None
            )
        else:
            weight.grad = total.clone()


def clip_grad_norm_across_stages(stages: list[PipelineStage], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole pipelined model: the global 2-norm of all stages'
    gradients (the tied copy counted once, as in one process), all-reduced over the pp group, and
    every local gradient scaled by ``max_norm / norm`` when that is below 1. Returns the norm."""
    grads, counted = [], []
    for stage in stages:
        tied_copy = _tied_copy(_stage_model(stage))
        for param in stage.submod.parameters():
            if param.grad is not None:
                grads.append(param.grad)
                if param is not tied_copy:
                    counted.append(param.grad)
    squared = squared_grad_norm(counted)  # over tensor-parallel and FSDP shards already
    dist.all_reduce(squared, group=stages[0].group)
    total_norm = squared.sqrt()
    scale_grads(grads, total_norm, max_norm)
    return total_norm
