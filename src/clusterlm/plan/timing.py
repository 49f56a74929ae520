"""Predicted time of one optimizer step, and what it is made of.

Compute: training FLOPs per token from ``training_flops_per_token`` (6N + 12*L*d*s, the model
FLOPs MFU is quoted in), split into the blocks' share and the output head's, on the pipeline rank
that holds the most (the trainer balances stages by parameter count; ``stages.rank_share``), at
``peak[precision]`` times the efficiency of the step's matrix-multiply shapes
(``clusterlm.plan.efficiency``). Each device does 1/tp of its rank's FLOPs; forward is a third of
them, backward the rest. Recomputation is its own component: full activation checkpointing reruns
each block's forward (a third of its FLOPs) in backward; selective recomputation (Korthikanti et
al. 2022) reruns the attention core, QK^T and AV: 4*d*s per token and layer.

Communication (``collectives``), per step:
- tensor parallel (Megatron, Shoeybi et al. 2019): 2 all-reduces of s*b*h activations per layer in
  forward and 2 in backward (2 more when full checkpointing reruns the forward); 3 for a decoder
  block of the encoder-decoder, with its cross-attention, whose layers are its encoder blocks;
  with sequence parallelism each becomes an all-gather plus a reduce-scatter, the same time. The
  calibration's ``tp_exposed`` share of it is on the critical path (1 here: DTensor waits for each
  collective).
  Sequence parallelism adds one all-reduce a step of the norm weights' and biases' and the
  row-parallel biases' gradients, flat: these see a slice of the sequence, so their gradients are
  partial sums (26 tensors on the nano model, which DTensor would reduce one by one, twice).
- data parallel, on gradients in the weight dtype (2 bytes under mixed precision, as ZeRO counts):
  ddp all-reduces its buckets (1 MiB, then ``parallel.bucket_mb``) while backward runs, hidden
  behind up to ``overlap`` of it, all but the last, which backward fills as it ends
  (``_bucketed_all_reduce``). zero1 (torch's ZeroRedundancyOptimizer under DDP) all-reduces like
  ddp, then each rank broadcasts the parameters it updated, one rank after the other, with nothing
  to hide behind. zero2 and zero3 / hsdp (FSDP) gather and reduce-scatter unit by unit
  (``clusterlm.plan.fsdp``: the trainer's units, the first gather and the last reduce-scatter of
  each micro-batch exposed, the rest behind up to ``overlap`` of the pass); hsdp then all-reduces
  the gradient shard across replicas once per step.
- context parallel: attention traffic (``context_comm``), each ring exchange at the link's
  measured exchange time; each rank computes its share of the tokens; gradients reduce over
  ``dp x cp`` or shard over ``dp_shard x cp``.
- pipeline: activations forward and gradients backward at every stage boundary. The 2*(p - 1)*v
  messages of the fill and the drain are on the critical path; the 2*m*v of the steady state are
  sent while the next micro-batch computes, hidden up to ``overlap`` of that compute.
- expert parallelism: all-to-alls of counts and tokens to their experts and back (``moe_cost``).
- CPU offload (ZeRO-Offload): gradients to the host and weights back over the host link, plus the
  CPU optimizer at the node's ``adam_params_per_s``, not overlapped.
Pipeline bubble, as a fraction of the ideal m micro-batches, for the trainer's schedules: GPipe and
1F1B (p-1)/m (Huang et al. 2019; Narayanan et al. 2021), interleaved 1F1B and looped BFS with v
stages per rank (p-1)/(v*m) (Narayanan et al. 2021; Lamy-Poirier 2023), and the zero-bubble
family (interleaved zero bubble, ZBV, DualPipeV) a third of that, (p-1)/(3*v*m): ZB-H1 of Qi et al.
2023 with equal forward, input-gradient and weight-gradient times. The bubble is paid at the pace
of the ranks a micro-batch fills and drains through (``fill_and_drain_share``), the steady state at
the busiest rank's. The optimizer step is priced where its rate was measured
(``elementwise.optimizer_seconds``), and otherwise only through ``host``.

Host: work of the CPU that drives the device, counted in calls (``host_calls``): the calibration's
fixed seconds per step, plus seconds per parameter tensor FSDP's collectives pass through their
flat buffers (copied in and out, viewed and wrapped per tensor), per tensor-parallel module pass
(each DTensor-sharded linear, norm and embedding, forward and backward) and per pipeline action
(one stage's forward or backward of one micro-batch: the schedule's bookkeeping and its
point-to-point posts and waits).
Element-wise work whose cost per FLOP differs by model and layout (norms and rotary positions,
ring merges, MoE routing) is priced apart, at measured rates (``elementwise``). A process with
``host_share`` of a core (more processes than cores) takes 1/share as long over the per-step
work, but over the per-collective costs only in the part it spends on the core:
``collective_wait`` of them is waiting for peers, which a shared core does not slow. Their
defaults are 0; ``plan --validate`` fits them on a CPU, where the host is the device and nothing
hides them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch.distributed as dist

from clusterlm.models.seq2seq import decoder_depth, is_seq2seq
from clusterlm.plan import collectives, context_comm, elementwise, fsdp
from clusterlm.plan.calibration import HOST_SECONDS
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.efficiency import compute_rate, head_flops_per_token, layer_flops_per_token
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import rank_for, stage_params, state_bytes_per_param
from clusterlm.plan.moe_cost import all_to_all_seconds, extra_moe_flops_per_token, most_moe_blocks
from clusterlm.plan.stages import rank_share
from clusterlm.plan.workload import Workload


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on the critical path, by cause."""

    compute: float
    tensor_parallel: float
    bubble: float
    pipeline_p2p: float
    data_parallel: float
    offload: float
    host: float = 0.0
    recompute: float = 0.0
    expert_parallel: float = 0.0  # the all-to-alls of expert parallelism (``moe_cost``)
    context_parallel: float = 0.0
    element_wise: float = 0.0  # norms, ring merges, MoE routing (``clusterlm.plan.elementwise``)
    optimizer: float = 0.0  # clipping and AdamW where their rate was measured (same module)

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def items(self) -> list[tuple[str, float]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def recompute_flops_per_token(work: Workload, layout: Layout) -> float:
    args = work.model
    if layout.activation_checkpointing == "full":
        return layer_flops_per_token(work) * args.n_layer / 3
    if layout.activation_checkpointing == "selective":
        return 4.0 * args.n_layer * args.n_head * args.head_dim * work.seq_len
    return 0.0


# Each of the trainer's schedules (``clusterlm.parallel.pipeline.SCHEDULES``; a test keeps the two
# in step) by how much it divides the bubble (p-1)/(v*m): the zero-bubble family by 3 (ZB-H1).
BUBBLE_DIVISOR = {
    "gpipe": 1,
    "1f1b": 1,
    "interleaved_1f1b": 1,
    "looped_bfs": 1,
    "interleaved_zero_bubble": 3,
    "zbv_zero_bubble": 3,
    "dualpipev": 3,
}


def bubble_fraction(layout: Layout) -> float:
    p, m, v = layout.pp, layout.micro_batches, layout.pp_stages_per_rank
    return (p - 1) / (BUBBLE_DIVISOR[layout.pp_schedule] * v * m)


def rank_flops(work: Workload, layout: Layout) -> list[tuple[float, int]]:
    """(training FLOPs per token, layers) of each pipeline rank, busiest first."""
    layer, head = layer_flops_per_token(work), head_flops_per_token(work)
    shares = [rank_share(work.model, layout, r) for r in range(layout.pp)]
    return sorted(((s.layers * layer + s.head * head, s.layers) for s in shares), reverse=True)


def busiest_rank_flops(work: Workload, layout: Layout) -> tuple[float, int]:
    """(training FLOPs per token, layers) of the pipeline rank with the most to compute."""
    return rank_flops(work, layout)[0]


def fill_and_drain_share(work: Workload, layout: Layout) -> float:
    """The pace of the pipeline's fill and drain against the busiest rank's: the steady state runs
    at the busiest rank's pace, but a micro-batch entering or leaving the pipeline passes every
    other rank at that rank's own pace (Megatron's last stage, which also runs the output head,
    is the busiest; the rest hold layers only). The ratio of the other ranks' mean to the
    busiest."""
    ranks = rank_flops(work, layout)
    if len(ranks) == 1:
        return 1.0
    others = [flops for flops, _ in ranks[1:]]
    return sum(others) / len(others) / ranks[0][0]


def step_time(work: Workload, layout: Layout, cluster: Cluster) -> StepTime:
    args, cal = work.model, cluster.calibration
    tokens = context_comm.local_tokens(work, layout)  # per micro-batch, on one rank
    rate = compute_rate(work, layout, cluster.device, cal)
    flops, layers = busiest_rank_flops(work, layout)
    moe_blocks = most_moe_blocks(args, layout)
    model_flops = flops * tokens / layout.tp
    model_flops += extra_moe_flops_per_token(work, layout, moe_blocks) * tokens
    forward, backward = model_flops / 3 / rate, 2 * model_flops / 3 / rate
    recompute = (
        recompute_flops_per_token(work, layout) * layers / args.n_layer * tokens / layout.tp / rate
    )

    tp_group = collectives.mesh_group(layout, "tp", cluster)
    per_collective = collectives.all_reduce(
        tokens * args.n_embd * work.activation_bytes, tp_group, cluster
    )
    # forward, per layer, an encoder-decoder's with its share of the decoder's (module docstring)
    reductions = 2.0 + (3.0 * decoder_depth(args) / args.n_layer if is_seq2seq(args) else 0.0)
    passes = 3 if layout.activation_checkpointing == "full" else 2
    tp_per_layer = passes * reductions * per_collective
    tensor_parallel = cal.tp_exposed * tp_per_layer * layers
    all_to_all = all_to_all_seconds(work, layout, cluster, tokens, moe_blocks)
    context = context_comm.exposed_seconds(work, layout, cluster, rate) * layers
    kernels = elementwise.micro_batch_seconds(work, layout, cluster.device, layers, moe_blocks)
    micro_batch = forward + backward + recompute + tensor_parallel + all_to_all + context + kernels
    m = layout.micro_batches

    data_parallel, offload = _data_parallel_and_offload(
        work, layout, cluster, forward, backward + recompute
    )
    return StepTime(
        compute=m * (forward + backward),
        tensor_parallel=m * tensor_parallel
        + _sequence_slice_gradient_reduction(work, layout, cluster, layers),
        bubble=bubble_fraction(layout) * m * micro_batch * fill_and_drain_share(work, layout),
        pipeline_p2p=_pipeline_p2p(work, layout, cluster, forward + backward + recompute),
        data_parallel=data_parallel,
        offload=offload,
        host=host_seconds(work, layout, cluster),
        recompute=m * recompute,
        expert_parallel=m * all_to_all,
        context_parallel=m * context,
        element_wise=m * kernels + elementwise.fsdp_buffer_seconds(work, layout, cluster.device),
        optimizer=elementwise.optimizer_seconds(work, layout, cluster.device),
    )


def _sequence_slice_gradient_reduction(
    work: Workload, layout: Layout, cluster: Cluster, layers: int
) -> float:
    """Under sequence parallelism each norm, and the bias of each row-parallel linear (added after
    the reduce-scatter), sees a slice of the sequence, so the gradients of these replicated
    tensors are partial sums, all-reduced over the tensor-parallel group together, flat, once a
    step (``clusterlm.parallel.clipping.reduce_partial_grads``)."""
    if not layout.sequence_parallel:
        return 0.0
    llama = work.model.is_llama
    per_norm = 1 if llama else 2  # RMSNorm has a weight; LayerNorm a weight and a bias
    tensors = per_norm * (2 * layers + 1) + (0 if llama else 2 * layers)  # norms; wo and w2 biases
    group = collectives.mesh_group(layout, "tp", cluster)
    return collectives.all_reduce(tensors * work.model.n_embd * 4, group, cluster)


@dataclass(frozen=True)
class HostCalls:
    """Host-side work per step that costs time beyond the FLOPs and the links' bytes."""

    fsdp_tensor_passes: int
    tp_module_passes: int
    pp_actions: int = 0

    def counts(self) -> tuple[float, float, float, float]:
        """How many times each calibration host cost (``calibration.HOST_SECONDS``) is paid."""
        return 1.0, self.fsdp_tensor_passes, self.tp_module_passes, self.pp_actions


def host_calls(work: Workload, layout: Layout) -> HostCalls:
    """FSDP's tensor passes (``fsdp.tensor_passes``); a tensor-parallel block shards 6 linears (7
    with SwiGLU) and its 2 norms, plus under sequence parallelism the 2 inputs it gathers along
    the sequence, and the model adds the token and position embeddings, the final norm and the
    head; a pipeline rank runs each micro-batch's forward and backward on each of its stages, the
    backward in two parts (input and weight gradients) under the zero-bubble schedules."""
    args, m = work.model, layout.micro_batches
    layers = busiest_rank_flops(work, layout)[1]
    tp = 0
    if layout.tp > 1:
        per_block = 2 + (7 if args.is_llama else 6)
        if layout.sequence_parallel:  # the attention and MLP inputs are gathered along the sequence
            per_block += 2
        top = 3 if args.is_llama else 4
        tp = 2 * (layers * per_block + top) * m  # forward and backward
    pp = 0
    if layout.pp > 1:
        passes = 2 + (BUBBLE_DIVISOR[layout.pp_schedule] == 3)  # zero bubble: B split into I and W
        pp = passes * m * layout.pp_stages_per_rank
    tensors = fsdp.tensor_passes(work, layout, fsdp.parameter_tensors(args))
    return HostCalls(tensors, tp, pp)


def host_seconds(work: Workload, layout: Layout, cluster: Cluster) -> float:
    scales = host_share_scales(cluster.device.host_share, cluster.calibration.collective_wait)
    counts = host_calls(work, layout).counts()
    return sum(
        n * scale * getattr(cluster.calibration, name)
        for name, n, scale in zip(HOST_SECONDS, counts, scales, strict=True)
    )


def host_share_scales(share: float, collective_wait: float) -> tuple[float, ...]:
    """How much each host cost (``HOST_SECONDS``) grows on a process with ``share`` of a core: the
    per-step work by 1/share, the per-collective costs only in their part on the core."""
    collective = (1 - collective_wait) / share + collective_wait
    return (1 / share, *(collective,) * (len(HOST_SECONDS) - 1))


def _pipeline_p2p(
    work: Workload, layout: Layout, cluster: Cluster, micro_batch_compute: float
) -> float:
    """Fill and drain messages in full; steady-state ones behind ``overlap`` of the compute."""
    if layout.pp == 1:
        return 0.0
    split = layout.tp if layout.sequence_parallel else 1
    message = (
        context_comm.local_tokens(work, layout) * work.model.n_embd * work.activation_bytes / split
    )
    inter_node = layout.stride["pp"] >= cluster.devices_per_node
    one = collectives.point_to_point(message, inter_node, cluster)
    v, m = layout.pp_stages_per_rank, layout.micro_batches
    steady = max(0.0, 2 * v * one - cluster.calibration.overlap * micro_batch_compute)
    return 2 * (layout.pp - 1) * v * one + m * steady


def _bucketed_all_reduce(
    grads: float, group: collectives.Group, cluster: Cluster, bucket_mb: float, behind: float
) -> float:
    """DDP's exposed all-reduce: its buckets (1 MiB, then ``bucket_mb`` each, in the order backward
    produces the gradients) reduce while backward runs, hidden behind up to ``behind`` seconds of
    it, except the last, the first layers' gradients, ready when backward ends."""
    first = min(grads, dist._DEFAULT_FIRST_BUCKET_BYTES)
    full, last = divmod(grads - first, bucket_mb * 2**20)
    sizes = [first] + [bucket_mb * 2**20] * int(full) + ([last] if last else [])
    early = sum(collectives.all_reduce(size, group, cluster) for size in sizes[:-1])
    return collectives.all_reduce(sizes[-1], group, cluster) + max(0.0, early - behind)


def _data_parallel_and_offload(
    work: Workload, layout: Layout, cluster: Cluster, forward: float, backward: float
) -> tuple[float, float]:
    """Exposed data-parallel communication and offload time per step (see the module docstring)."""
    overlap = cluster.calibration.overlap
    params = stage_params(work, layout, "first")
    weight_bytes, grad_bytes, _ = state_bytes_per_param(0, 1, work.mixed_precision)
    weights, grads = params * weight_bytes, params * grad_bytes
    shard = collectives.mesh_group(layout, "dp_shard_cp", cluster)
    replicas = collectives.mesh_group(layout, "dp_replicate", cluster)

    def hidden(comm: float, compute: float) -> float:
        return max(0.0, comm - overlap * compute)

    stage = layout.zero_stage if layout.dp_shard_cp > 1 else 0
    if stage == 0:  # every copy: dp_replicate, and the cp ranks
        copies = collectives.mesh_group(layout, "dp_cp", cluster)
        exposed = _bucketed_all_reduce(grads, copies, cluster, layout.bucket_mb, overlap * backward)
    elif stage == 1:
        # torch's ZeroRedundancyOptimizer under DDP: gradients are all-reduced in backward, then
        # each rank steps the parameters it owns and broadcasts them in step(), nothing to hide
        # behind.
        exposed = _bucketed_all_reduce(grads, shard, cluster, layout.bucket_mb, overlap * backward)
        exposed += collectives.broadcast_from_each(weights, shard, cluster)
    else:
        units = fsdp.stage_units(
            work, layout, rank_for(layout, "first"), fsdp.parameter_tensors(work.model)
        )
        exposed = fsdp.exposed_seconds(
            units, layout, cluster, weight_bytes, grad_bytes, forward, backward
        )
        if stage == 3:  # hsdp: the gradient shards all-reduced across replicas
            exposed += hidden(
                collectives.all_reduce(grads / layout.dp_shard_cp, replicas, cluster), backward
            )

    offload = 0.0
    if layout.cpu_offload and cluster.host is not None:
        optimizer_shard = params / (layout.dp_shard_cp if layout.zero_stage >= 1 else 1)
        transfer = optimizer_shard * (weight_bytes + grad_bytes) / cluster.host.link.bandwidth
        update = optimizer_shard * cluster.devices_per_node / cluster.host.adam_params_per_s
        offload = transfer + update
    return exposed, offload
