"""Recursive halving then doubling (Rabenseifner's all-reduce), and recursive doubling for small
messages.

With n a power of two, log2(n) reduce-scatter steps exchange half of the current range with the
partner at distance n/2, n/4, ..., 1, keeping and reducing the other half; log2(n) all-gather
steps undo this in reverse. That is 2*log2(n) latency terms (like a tree) and about 2(n-1)/n of
the buffer sent (like a ring). Under ``small_bytes`` the buffer is small enough that latency is
all that counts, and recursive doubling halves it: log2(n) steps, each exchanging the whole
buffer with the partner at distance 1, 2, 4, ... (every rank ends with the same bits, since
a + b == b + a in floating point).

Other n are folded to the largest power of two p below them: of the first 2(n-p) positions each
even one hands its buffer to the odd one after it, sits out the core exchange, and gets the
result back at the end (two extra full-buffer hops for those ranks).
"""

from __future__ import annotations

import torch

from clusterlm.comm.peers import Peers, accumulate, transfer

# Under this many bytes latency dominates on any fabric (alpha/beta is ~100 KiB or more on
# InfiniBand and NVLink, and far more on loopback), so fewer steps beat fewer bytes.
SMALL_BYTES = 64 * 2**10


def halving_doubling(buf: torch.Tensor, peers: Peers, small_bytes: int = SMALL_BYTES) -> None:
    """Sum ``buf`` (flat, contiguous) over ``peers`` in place: recursive doubling for buffers
    under ``small_bytes``, halving then doubling from there."""
    n, me = peers.size, peers.index
    if n == 1 or buf.numel() == 0:
        return
    extra = n - (1 << (n.bit_length() - 1))
    folded = me < 2 * extra
    if folded and me % 2 == 0:
        partner = peers.ranks[me + 1]
        transfer(peers.group, sends=[(buf, partner)])
        transfer(peers.group, recvs=[(buf, partner)])
        return
    if folded:
        incoming = torch.empty_like(buf)
        transfer(peers.group, recvs=[(incoming, peers.ranks[me - 1])])
        accumulate(buf, incoming)
    core = [2 * i + 1 for i in range(extra)] + list(range(2 * extra, n))
    small = buf.numel() * buf.element_size() < small_bytes
    (_recursive_doubling if small else _halving_doubling_power_of_two)(buf, peers.subset(core))
    if folded:
        transfer(peers.group, sends=[(buf, peers.ranks[me - 1])])


def _recursive_doubling(buf: torch.Tensor, peers: Peers) -> None:
    incoming = torch.empty_like(buf)
    distance = 1
    while distance < peers.size:
        partner = peers.ranks[peers.index ^ distance]
        transfer(peers.group, sends=[(buf, partner)], recvs=[(incoming, partner)])
        accumulate(buf, incoming)
        distance *= 2


def _halving_doubling_power_of_two(buf: torch.Tensor, peers: Peers) -> None:
    me = peers.index
    staging = buf.new_empty((buf.numel() + 1) // 2)
    lo, hi = 0, buf.numel()
    exchanges = []  # (partner, range before the split, kept its lower half); replayed backwards
    distance = peers.size // 2
    while distance:
        partner = peers.ranks[me ^ distance]
        mid = (lo + hi) // 2
        keep_lower = me & distance == 0
        (keep_lo, keep_hi), (give_lo, give_hi) = (
            ((lo, mid), (mid, hi)) if keep_lower else ((mid, hi), (lo, mid))
        )
        incoming = staging[: keep_hi - keep_lo]
        transfer(peers.group, sends=[(buf[give_lo:give_hi], partner)], recvs=[(incoming, partner)])
        accumulate(buf[keep_lo:keep_hi], incoming)
        exchanges.append((partner, (lo, hi), keep_lower))
        lo, hi = keep_lo, keep_hi
        distance //= 2
    for partner, (outer_lo, outer_hi), kept_lower in reversed(exchanges):
        missing = buf[hi:outer_hi] if kept_lower else buf[outer_lo:lo]
        transfer(peers.group, sends=[(buf[lo:hi], partner)], recvs=[(missing, partner)])
        lo, hi = outer_lo, outer_hi
