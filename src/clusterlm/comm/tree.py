"""Binary-tree all-reduce: reduce towards the root, then broadcast back down.

Position 0 is the root and position i has children 2i+1 and 2i+2, so the whole operation takes
2*floor(log2 n) hops: few latency terms, which is what small messages need. Every hop
carries the whole buffer, so for large messages the ring is the better choice. A rank adds its
two children's contributions in one go (in float32 for half precision).
"""

from __future__ import annotations

import torch

from clusterlm.comm.peers import Peers, accumulate, transfer


def tree(buf: torch.Tensor, peers: Peers) -> None:
    """Sum ``buf`` (flat, contiguous) over ``peers`` in place."""
    me = peers.index
    children = [peers.ranks[c] for c in (2 * me + 1, 2 * me + 2) if c < peers.size]
    parent = [peers.ranks[(me - 1) // 2]] if me > 0 else []

    incoming = buf.new_empty((len(children), buf.numel()))
    transfer(peers.group, recvs=list(zip(incoming, children, strict=True)))
    accumulate(buf, *incoming)
    transfer(peers.group, sends=[(buf, p) for p in parent])

    transfer(peers.group, recvs=[(buf, p) for p in parent])
    transfer(peers.group, sends=[(buf, c) for c in children])
