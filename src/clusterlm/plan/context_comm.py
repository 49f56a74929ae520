"""The attention traffic of context parallelism (``clusterlm.parallel.ring_attention``), per
layer and micro-batch on one rank, as the trainer runs it.

Each rank holds ``s/cp`` of the micro-batch's tokens; a K/V block is its k and v,
``2 * b * s/cp * kv_heads/tp * head_dim`` elements in the activation dtype, and the K/V gradients
travel in fp32 (the merge's precision).

- Ring: forward passes the K/V blocks ``cp - 1`` hops around the ring, each sent while the rank
  computes with the block it holds, so a hop's bytes cost ``max(0, bytes - overlap * compute)``
  with ``compute`` a ``1/cp`` share of the layer's attention forward. Backward passes the K/V
  blocks round again the same way (behind the backward's twice as long share), and after each of
  its ``cp`` steps sends the accumulated K/V gradients on one hop and waits for them: ``cp`` hops
  of the gradient block with nothing to hide behind. A rank sends ``2(cp-1)`` K/V blocks and
  ``cp`` gradient blocks per layer and micro-batch. Every exchange (``exchanges_per_layer``) also
  waits for the neighbour to arrive (``Link.exchange_waits``): a K/V hop what is left of it after
  the block's work it was posted before (at least the probe's wait for a hop posted before its
  block of work); a gradient hop, posted right after the step's K/V hop was waited on, the
  probe's wait for such a chained hop, and the last one, after the last block's work, the
  whole wait.
- All-to-all (Ulysses): q, k, v and the output each go through one all-to-all forward (k and v
  repeated to every query head first when their heads do not split over cp), their gradients
  through one each backward, nothing overlapped; each sends ``(cp-1)/cp`` of its tensor
  (``collectives.all_to_all``).

The ring's own work beyond the attention FLOPs (``merge_kernels``): per step it merges the
block's output and log-sum-exp into the running ones (forward) or adds the block's gradients into
the running ones (backward), element-wise kernels counted here in calls and bytes from the code.
The flash kernel's calls on the diagonal and half blocks are timed by the kernel-rate probe at the
ring's own block shapes (``clusterlm.bench.kernels``).
"""

from __future__ import annotations

from clusterlm.plan import collectives
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.layout import Layout
from clusterlm.plan.workload import Workload

GRADIENT_BYTES = 4  # the K/V gradients accumulate and travel in fp32
WIDE_BYTES = 4  # the ring merges and accumulates in fp32 (``attention_blocks.wide``)


def local_tokens(work: Workload, layout: Layout) -> float:
    """Tokens of one micro-batch on one rank: its share of each sequence."""
    return work.seq_len / layout.cp * layout.micro_batch_size


def _head_elements(work: Workload, layout: Layout, heads: int) -> float:
    """Elements of one q-, k- or v-shaped tensor with ``heads`` heads on one rank."""
    return local_tokens(work, layout) * heads / layout.tp * work.model.head_dim


def _kv_heads(work: Workload, layout: Layout) -> int:
    """K/V heads as the attention sends them: repeated to the query heads where Ulysses cannot
    split them over cp."""
    args = work.model
    split = layout.cp_attention == "all_to_all" and (args.n_kv_head // layout.tp) % layout.cp
    return args.n_head if split else args.n_kv_head


def kv_block_bytes(work: Workload, layout: Layout) -> tuple[float, float]:
    """(bytes of one rank's K/V block, of its K/V gradients) per layer and micro-batch."""
    elements = 2 * _head_elements(work, layout, _kv_heads(work, layout))
    return elements * work.activation_bytes, elements * GRADIENT_BYTES


def sent_bytes_per_layer(work: Workload, layout: Layout) -> float:
    """Bytes one rank sends per layer and micro-batch, forward and backward together."""
    cp = layout.cp
    if cp == 1:
        return 0.0
    if layout.cp_attention == "ring":
        kv, grads = kv_block_bytes(work, layout)
        return 2 * (cp - 1) * kv + cp * grads
    q, kv = _all_to_all_tensors(work, layout)
    return 2 * (2 * q + 2 * kv) * (cp - 1) / cp


def _all_to_all_tensors(work: Workload, layout: Layout) -> tuple[float, float]:
    """Bytes of q (and of the output, shaped alike) and of k (and of v) that Ulysses trades."""
    q = _head_elements(work, layout, work.model.n_head)
    kv = _head_elements(work, layout, _kv_heads(work, layout))
    return q * work.activation_bytes, kv * work.activation_bytes


def attention_forward_flops(work: Workload, layout: Layout) -> float:
    """One layer's attention core forward (QK^T and AV over the whole sequence, the convention of
    ``training_flops_per_token``) for one rank's tokens of a micro-batch."""
    args = work.model
    return 4.0 * args.n_head * args.head_dim / layout.tp * work.seq_len * local_tokens(work, layout)


def exposed_seconds_per_layer(
    work: Workload, layout: Layout, cluster: Cluster, attention_forward: float
) -> tuple[float, float]:
    """(forward, backward) seconds of attention communication per layer and micro-batch on the
    critical path, ``attention_forward`` the seconds of the layer's attention forward on a rank."""
    cp = layout.cp
    if cp == 1:
        return 0.0, 0.0
    group = collectives.mesh_group(layout, "cp", cluster)
    if layout.cp_attention == "all_to_all":
        q, kv = _all_to_all_tensors(work, layout)
        one_way = 2 * collectives.all_to_all(q, group, cluster)
        one_way += 2 * collectives.all_to_all(kv, group, cluster)
        return one_way, one_way
    link = cluster.inter_node if group.nodes > 1 else cluster.intra_node
    efficiency = cluster.calibration.comm_efficiency
    kv, grads = (size / (link.bandwidth * efficiency) for size in kv_block_bytes(work, layout))
    overlap, step = cluster.calibration.overlap, attention_forward / cp
    waits = link.exchange_waits(cp)

    def kv_hop(work: float) -> float:
        """A K/V hop posted before ``work`` seconds: bytes and wait hide behind that work only."""
        return max(0.0, kv - overlap * work) + max(waits.posted, waits.after - work)

    # Every gradient hop but the last follows a K/V hop's wait at once: the neighbours just met.
    gradient_hops = cp * grads + (cp - 1) * waits.chained + waits.after
    backward = (cp - 1) * kv_hop(2 * step) + gradient_hops
    return (cp - 1) * kv_hop(step), backward


def exposed_seconds(work: Workload, layout: Layout, cluster: Cluster, rate: float) -> float:
    """Attention communication per layer and micro-batch on the critical path at ``rate`` FLOP/s
    of compute; full activation checkpointing reruns the forward's."""
    attention = attention_forward_flops(work, layout) / rate
    forward, backward = exposed_seconds_per_layer(work, layout, cluster, attention)
    return forward * (2 if layout.activation_checkpointing == "full" else 1) + backward


def exchanges_per_layer(layout: Layout) -> int:
    """Exchanges one ring rank posts and waits on per layer and micro-batch: forward's ``cp - 1``
    K/V hops, backward's ``cp - 1`` and its ``cp`` gradient hops (forward's again where full
    checkpointing reruns it)."""
    if layout.cp == 1 or layout.cp_attention != "ring":
        return 0
    forward = (layout.cp - 1) * (2 if layout.activation_checkpointing == "full" else 1)
    return forward + 2 * layout.cp - 1


def merge_kernels(work: Workload, layout: Layout) -> tuple[float, float]:
    """(kernel calls, bytes touched) of the ring's element-wise work per layer and micro-batch on
    the busiest rank, the last, whose queries all read every block
    (``ring_attention.visible_block``):
    with ``o`` and ``l`` the fp32 bytes of its output and log-sum-exp, and ``kv`` of a K/V
    block's k and v in the activation dtype,

    - forward, per step: logaddexp, two subtractions and two exps on the log-sum-exp (17 l read
      and written), the two weighted outputs, their sum and the copies into the running output and
      log-sum-exp (9 o), and 3 small kernels for the block's positions: 13 calls; once, the zeroed
      output and log-sum-exp, the stacked K/V and the query positions: 6 calls;
    - backward, per step: the positions (3 calls), the query gradient added (3 o), the K/V
      gradients summed over their heads and added (2 calls and 2 kv_g, 3 calls and 3 kv_g, with
      ``kv_g`` the fp32 gradient bytes of the block's visible columns: all on the diagonal, half
      elsewhere): 8 calls; once, the zeroed gradients, the stacked K/V and the positions: 6 calls.

    In fp32, as ``plan --validate`` runs it; 16-bit blocks add conversions to fp32, not counted."""
    cp = layout.cp
    if cp == 1 or layout.cp_attention != "ring":
        return 0.0, 0.0
    o = _head_elements(work, layout, work.model.n_head) * WIDE_BYTES
    lse = o / work.model.head_dim
    kv, kv_grads = kv_block_bytes(work, layout)
    visible_columns = 1 + (cp - 1) / 2  # blocks' worth of columns over the cp steps
    forward_calls = 13 * cp + 6
    forward_bytes = cp * (17 * lse + 9 * o) + o + lse + 2 * kv
    backward_calls = 8 * cp + 6
    backward_bytes = 3 * o * cp + 5 * kv_grads * visible_columns + o + kv_grads + 2 * kv
    reruns = 2 if layout.activation_checkpointing == "full" else 1
    return (
        reruns * forward_calls + backward_calls,
        reruns * forward_bytes + backward_bytes,
    )
