"""FSDP (zero2, zero3, hsdp) as the trainer applies it (``clusterlm.parallel.data_parallel``),
counted for the planner: the units of a pipeline rank's stage, how often each gathers its weights
in a step, the parameter tensors its collectives pass, and the communication left exposed.

The units follow the trainer's rules: consecutive blocks of at least ``parallel.bucket_mb`` form a
unit (``fsdp_units``), the embeddings, final norm and head (and the blocks of a model too small for
units) the root; the routed experts of the MoE blocks form units of their own over the
expert-data-parallel group (``expert_units``), freed after forward unless under zero2; zero3 frees
a unit's gathered weights after forward except for the last unit's and the root's, where backward
starts (``reshards_after_forward``); the units that keep them keep them through all of a step's
micro-batches (``gradient_sync``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from clusterlm.models import ModelArgs, create_model
from clusterlm.models.counting import layer_params
from clusterlm.parallel.data_parallel import expert_units, fsdp_units, reshards_after_forward
from clusterlm.plan import collectives
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import rank_params, state_bytes_per_param
from clusterlm.plan.moe_cost import (
    expert_shard_degree,
    moe_block_params_on_device,
    moe_blocks_held,
    routed_params,
)
from clusterlm.plan.stages import rank_share
from clusterlm.plan.workload import Workload


@dataclass(frozen=True)
class Unit:
    params: float  # on one device: 1/tp of the whole
    tensors: int  # parameter tensors, each copied, viewed and wrapped on its own by FSDP
    resharded: bool  # frees its gathered weights after forward and gathers them again for backward
    experts: bool = False  # routed experts, sharded over the expert-data-parallel group


def stage_units(
    work: Workload, layout: Layout, pp_rank: int, tensors: tuple[int, int]
) -> list[Unit]:
    """The FSDP units of pipeline rank ``pp_rank``'s stage (its stages as one, under a virtual
    pipeline), the root last; ``tensors``: parameter tensors per block and outside the blocks."""
    args = work.model
    share = rank_share(args, layout, pp_rank)
    n_moe, block = moe_blocks_held(args, share.blocks), layer_params(args)
    routed = routed_params(args) / layout.ep  # one MoE block's experts on one device
    on_device = (share.layers - n_moe) * block / layout.tp
    on_device += n_moe * (moe_block_params_on_device(args, layout) - routed)
    if n_moe:  # the mean block without its routed experts, as a whole-model count
        block = round(on_device * layout.tp / share.layers)
    outside = (rank_params(work, layout, pp_rank) - on_device - n_moe * routed) * layout.tp
    grouped = fsdp_units(
        [4 * block] * share.layers, 4 * (share.layers * block + outside), layout.bucket_mb * 2**20
    )
    per_block = tensors[0] - (3 if n_moe else 0)  # an MoE block's stacked experts: units apart
    units = [
        Unit(
            len(unit) * block / layout.tp,
            len(unit) * per_block,
            reshards_after_forward(layout.data_parallel, index, len(grouped)),
        )
        for index, unit in enumerate(grouped)
    ]
    holders = expert_shard_degree(layout)  # the trainer's expert-data-parallel mesh
    holders *= layout.dp_replicate if layout.data_parallel == "hsdp" else 1
    experts = expert_units([round(4 * routed)] * n_moe, holders, layout.bucket_mb * 2**20)
    # Over one rank FSDP moves no bytes, but still passes the experts through its buffers.
    if n_moe:
        units += [
            Unit(len(unit) * routed, 3 * len(unit), layout.data_parallel != "zero2", experts=True)
            for unit in experts
        ]
    in_root = share.layers - sum(map(len, grouped))
    return [
        *units,
        Unit((in_root * block + outside) / layout.tp, in_root * per_block + tensors[1], False),
    ]


def gathers(unit: Unit, layout: Layout) -> tuple[int, int]:
    """(forward, backward) all-gathers of ``unit``'s weights per step. A unit that keeps its weights
    from forward to backward keeps them from one micro-batch to the next as well: it gathers once
    a step. A resharded unit gathers before each micro-batch's forward and again before its
    backward; in a pipeline only before the first backward, since torch's pipeline stage keeps the
    weights a backward gathered until the step's last backward (m + 1 a step, counted with the
    profiler on pp2 x zero3)."""
    if not unit.resharded:
        return 1, 0
    m = layout.micro_batches
    return (m, 1) if layout.pp > 1 else (m, m)


def tensor_passes(work: Workload, layout: Layout, tensors: tuple[int, int]) -> int:
    """Parameter tensors FSDP's collectives pass through their flat buffers per step on the pipeline
    rank with the most: every gather, and every reduce-scatter of gradients, one per micro-batch
    (once a step in a pipeline, whose stage turns the reduction off until its last backward)."""
    return int(_per_step(work, layout, tensors, lambda unit, g, r: unit.tensors * (g + r)))


def buffer_bytes(work: Workload, layout: Layout, tensors: tuple[int, int]) -> float:
    """Bytes of weights and gradients FSDP's flat buffers pass per step on the pipeline rank with
    the most, counted as ``tensor_passes`` counts tensors: each gather copies a unit's weight
    shards in and the gathered weights out to its parameters, each reduce-scatter copies its
    gradients in and divides them, over one rank too (``clusterlm.plan.elementwise`` prices
    them)."""
    weight, grad, _ = state_bytes_per_param(0, 1, work.mixed_precision)

    def per_unit(unit: Unit, gathered: int, reduced: int) -> float:
        return unit.params * (gathered * weight + reduced * grad)

    return _per_step(work, layout, tensors, per_unit)


def _per_step(
    work: Workload,
    layout: Layout,
    tensors: tuple[int, int],
    per_unit: Callable[[Unit, int, int], float],
) -> float:
    """The most, over the pipeline ranks, of ``per_unit(unit, gathers, reductions)`` summed over
    the rank's units, with each unit's gathers a step and its gradients' reduce-scatters (one per
    micro-batch, once a step in a pipeline); 0 without FSDP."""
    if not layout.uses_fsdp:
        return 0.0
    reductions = 1 if layout.pp > 1 else layout.micro_batches
    return max(
        sum(
            per_unit(unit, sum(gathers(unit, layout)), reductions)
            for unit in stage_units(work, layout, rank, tensors)
        )
        for rank in range(layout.pp)
    )


def exposed_seconds(
    units: list[Unit],
    layout: Layout,
    cluster: Cluster,
    weight_bytes: float,
    grad_bytes: float,
    forward: float,
    backward: float,
) -> float:
    """FSDP's communication on the critical path per step. A forward gathers the root first, with
    nothing computed before it to hide behind, and the first unit next, behind the embeddings
    only; then each unit while the one before computes: hidden up to ``overlap`` of the forward. A
    backward gathers the resharded units again and reduce-scatters each unit's gradients once its
    backward is done, the first unit's and the root's last, with nothing computed after them; the
    rest hide behind up to ``overlap`` of the backward. torch's pipeline stage reduces once, after
    the step's last backward; its reductions are charged as if each micro-batch's backward
    reduced, hidden behind it, as ZeRO-2 implementations that keep gradients sharded do (Llama 3
    405B's published throughput matches that, once-a-step not:
    benchmarks/planner-published-runs-2026-12-01.md)."""
    overlap, m = cluster.calibration.overlap, layout.micro_batches
    shard = collectives.mesh_group(layout, "dp_shard_cp", cluster)
    expert_group = collectives.expert_data_group(layout, cluster)
    *blocks, root = units

    def gathered(unit: Unit) -> float:
        group = expert_group if unit.experts else shard
        return collectives.all_gather(unit.params * weight_bytes, group, cluster)

    def reduced(unit: Unit) -> float:
        group = expert_group if unit.experts else shard
        return collectives.reduce_scatter(unit.params * grad_bytes, group, cluster)

    # The first unit is gathered right after the root and its gradients are reduced just before
    # the root's: only the root's little work (the embeddings) lies beside either.
    first, rest = blocks[:1], blocks[1:]
    exposed = sum(gathers(u, layout)[0] * gathered(u) for u in [root, *first])
    forward_gathers = sum(gathers(u, layout)[0] * gathered(u) for u in rest)
    backward_gathers = sum(gathers(u, layout)[1] * gathered(u) for u in blocks)
    exposed += m * max(0.0, forward_gathers / m - overlap * forward)
    if layout.pp > 1:  # charged per micro-batch, behind its backward: an upper bound (see above)
        return exposed + m * max(
            0.0, backward_gathers / m + sum(map(reduced, units)) - overlap * backward
        )
    behind_backward = backward_gathers / m + sum(map(reduced, rest))
    last_reduced = sum(map(reduced, [*first, root]))
    return exposed + m * (last_reduced + max(0.0, behind_backward - overlap * backward))


def parameter_tensors(args: ModelArgs) -> tuple[int, int]:
    """(parameter tensors per block, tensors outside the blocks) of the model the trainer builds."""
    return _parameter_tensors(dataclasses.astuple(args))


@lru_cache(maxsize=64)
def _parameter_tensors(values: tuple) -> tuple[int, int]:
    args = dataclasses.replace(ModelArgs(*values), n_layer=1, moe_layers="all")  # an MoE block
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = create_model(args)
    block = len(list(next(iter(model.layers.values())).parameters()))
    return block, len(list(model.parameters())) - block
