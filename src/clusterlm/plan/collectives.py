"""Alpha-beta cost of the collectives a layout runs, on the links its ranks actually use.

A link moves n bytes in ``latency + n / (bandwidth * comm_efficiency)``. For a group of n ranks:

    ring all-reduce:             2(n-1)/n * bytes / bw + 2(n-1) * latency
    reduce-scatter, all-gather:   (n-1)/n * bytes / bw +  (n-1) * latency

(Patarasuk and Yuan 2009; Thakur et al. 2005), ``bytes`` being the full, unsharded buffer. An
all-to-all (expert parallelism) sends (n-1)/n of a rank's bytes, each slice straight to its peer.
A group that spans k nodes with g ranks in each runs hierarchically: the intra-node ring over g
ranks on the fast link, then the inter-node ring over k ranks on a 1/g slice, each of the g ranks
using its own NIC, so the slow link carries bytes/g per rank. Where ranks sit follows
``Layout.stride``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clusterlm.plan.cluster import Cluster, Link
from clusterlm.plan.layout import Layout


@dataclass(frozen=True)
class Group:
    """``size`` ranks, ``per_node`` of them inside each node they span."""

    size: int
    per_node: int

    @property
    def nodes(self) -> int:
        return math.ceil(self.size / self.per_node)


def mesh_group(layout: Layout, dim: str, cluster: Cluster) -> Group:
    """The group of mesh dimension ``dim`` (tp, dp_shard, dp_replicate, pp) under the placement."""
    size = getattr(layout, dim)
    per_node = max(1, min(size, cluster.devices_per_node // layout.stride[dim]))
    return Group(size, per_node)


def expert_data_group(layout: Layout, cluster: Cluster) -> Group:
    """The expert-data-parallel group: the dp_shard ranks outside the innermost ep ranks, which
    hold the same routed experts."""
    size = max(1, layout.dp_shard // layout.ep)
    stride = layout.stride["dp_shard"] * layout.ep
    return Group(size, max(1, min(size, cluster.devices_per_node // stride)))


def _ring(nbytes: float, ranks: int, link: Link, efficiency: float, passes: int) -> float:
    """``passes`` = 1 for reduce-scatter or all-gather, 2 for all-reduce."""
    if ranks <= 1:
        return 0.0
    steps = passes * (ranks - 1)
    return steps / ranks * nbytes / (link.bandwidth * efficiency) + steps * link.latency


def _collective(nbytes: float, group: Group, cluster: Cluster, passes: int) -> float:
    efficiency = cluster.calibration.comm_efficiency
    intra = _ring(nbytes, group.per_node, cluster.intra_node, efficiency, passes)
    inter = _ring(nbytes / group.per_node, group.nodes, cluster.inter_node, efficiency, passes)
    return intra + inter


def all_reduce(nbytes: float, group: Group, cluster: Cluster) -> float:
    return _collective(nbytes, group, cluster, passes=2)


def reduce_scatter(nbytes: float, group: Group, cluster: Cluster) -> float:
    return _collective(nbytes, group, cluster, passes=1)


all_gather = reduce_scatter  # the same steps and volume, run in reverse


def broadcast_from_each(nbytes: float, group: Group, cluster: Cluster) -> float:
    """Each rank broadcasts its 1/n of ``nbytes`` in turn (torch's ZeroRedundancyOptimizer after its
    step): n pipelined broadcasts, each n - 1 hops of latency and its slice's bytes over the slowest
    link the group spans."""
    if group.size <= 1:
        return 0.0
    link = cluster.inter_node if group.nodes > 1 else cluster.intra_node
    hops = group.size * (group.size - 1)
    return hops * link.latency + nbytes / (link.bandwidth * cluster.calibration.comm_efficiency)


def point_to_point(nbytes: float, inter_node: bool, cluster: Cluster) -> float:
    link = cluster.inter_node if inter_node else cluster.intra_node
    return link.latency + nbytes / (link.bandwidth * cluster.calibration.comm_efficiency)


def all_to_all(nbytes: float, group: Group, cluster: Cluster) -> float:
    """Each rank sends 1/n of its ``nbytes`` to each of the n - 1 others and receives as much:
    to the peers in its node over the fast link, to the others over its own NIC, both at once;
    n - 1 messages of latency on the slowest link the group spans, or its measured all-to-all
    time (processes sharing cores)."""
    if group.size <= 1:
        return 0.0
    efficiency = cluster.calibration.comm_efficiency
    intra = (group.per_node - 1) / group.size * nbytes / cluster.intra_node.bandwidth
    inter = (group.size - group.per_node) / group.size * nbytes / cluster.inter_node.bandwidth
    link = cluster.inter_node if group.nodes > 1 else cluster.intra_node
    return max(intra, inter) / efficiency + link.exchange_waits(group.size).all_to_all
