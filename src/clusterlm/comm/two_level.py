"""Two-level all-reduces: hierarchical (nodes) and 2-D mesh (rows x columns).

Both split the peers into equal local groups (a node, or a mesh row) and run three ring phases:

1. reduce-scatter inside each local group: local position j now holds segment j' of the buffer
   summed over its group;
2. all-reduce of that segment across groups, among the peers holding the same local position
   (a mesh column);
3. all-gather inside each local group.

Only 1/g of the buffer crosses groups (g = local group size), which is the point when the links
between nodes are slower than those inside one. A 2-D mesh all-reduce is exactly this schedule
with the rows as the local groups, so it shares the code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from clusterlm.comm import ring as ring_phases
from clusterlm.comm.peers import Peers
from clusterlm.comm.ring import DEFAULT_CHUNK_BYTES, DEFAULT_PIPELINE_DEPTH


def hierarchical(
    buf: torch.Tensor,
    peers: Peers,
    *,
    local_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
) -> None:
    """Sum ``buf`` over ``peers`` in place, one local group per node.

    Local groups are runs of ``local_size`` consecutive peers when given; otherwise the launch
    topology decides: global rank r lives on node r // LOCAL_WORLD_SIZE. Without either, all
    peers form one group and this is a plain ring.
    """
    if local_size is not None:
        if local_size < 1:
            raise ValueError(f"local_size must be >= 1, got {local_size}")
        nodes = [position // local_size for position in range(peers.size)]
    elif "LOCAL_WORLD_SIZE" in os.environ:
        ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        nodes = [rank // ranks_per_node for rank in peers.ranks]
    else:
        nodes = [0] * peers.size
    _two_level(buf, peers, nodes, chunk_bytes, pipeline_depth)


def mesh2d(
    buf: torch.Tensor,
    peers: Peers,
    *,
    rows: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
) -> None:
    """Sum ``buf`` over ``peers`` arranged row-major as ``rows`` x (size / rows) in place.

    The default is the squarest mesh: the largest divisor of the size not above its square root.
    """
    n = peers.size
    if rows is None:
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    if rows < 1 or n % rows:
        raise ValueError(f"rows={rows} does not divide the {n} ranks into a mesh")
    cols = n // rows
    _two_level(buf, peers, [position // cols for position in range(n)], chunk_bytes, pipeline_depth)


def _two_level(
    buf: torch.Tensor, peers: Peers, group_of: Sequence[int], chunk_bytes: int, pipeline_depth: int
) -> None:
    members: dict[int, list[int]] = {}
    for position, group_id in enumerate(group_of):
        members.setdefault(group_id, []).append(position)
    sizes = {len(positions) for positions in members.values()}
    if len(sizes) > 1:
        raise ValueError(f"local groups must be equal in size, got sizes {sorted(sizes)}")
    local = peers.subset(members[group_of[peers.index]])
    across = peers.subset([positions[local.index] for positions in members.values()])

    segment = ring_phases.reduce_scatter(buf, local, chunk_bytes, pipeline_depth)
    ring_phases.ring(segment, across, chunk_bytes=chunk_bytes, pipeline_depth=pipeline_depth)
    ring_phases.all_gather(buf, local, chunk_bytes, pipeline_depth)
