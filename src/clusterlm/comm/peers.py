"""The ranks taking part in one collective, and the point-to-point primitives the algorithms share.

Every algorithm works on ``Peers``: an ordered tuple of global ranks plus this process's position
in it. Point-to-point ops address global ranks even inside a subgroup, and composite algorithms
(hierarchical, 2-D mesh) run their phases on subsets of the peers without creating new groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

Transfer = tuple[torch.Tensor, int]  # (tensor, global rank of the peer)

# Sums of these dtypes are accumulated in float32 wherever one rank adds several contributions
# before passing the result on.
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Peers:
    group: dist.ProcessGroup
    ranks: tuple[int, ...]  # global ranks, in the order the algorithm arranges them
    index: int  # this process's position in ``ranks``

    @classmethod
    def of_group(cls, group: dist.ProcessGroup | None) -> Peers:
        # WORLD is None only before init_process_group, where get_rank below raises.
        group = cast(dist.ProcessGroup, group or dist.group.WORLD)
        index = dist.get_rank(group)
        if index < 0:
            raise ValueError("this process is not a member of the process group it reduces over")
        size = dist.get_world_size(group)
        return cls(group, tuple(dist.get_global_rank(group, i) for i in range(size)), index)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def rank_at(self, position: int) -> int:
        """Global rank of the peer at ``position``, wrapping around like a ring."""
        return self.ranks[position % self.size]

    def subset(self, positions: Sequence[int]) -> Peers:
        """The peers at ``positions`` (which must include this process), in that order."""
        return Peers(
            self.group, tuple(self.ranks[p] for p in positions), list(positions).index(self.index)
        )


def start_transfers(
    group: dist.ProcessGroup, sends: Sequence[Transfer] = (), recvs: Sequence[Transfer] = ()
) -> list[dist.Work]:
    """Post sends and receives as one batch (so their order cannot deadlock); empty tensors are
    skipped, which is consistent because both ends always know the size."""
    ops = [dist.P2POp(dist.isend, t, peer, group) for t, peer in sends if t.numel()]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs if t.numel()]
    return dist.batch_isend_irecv(ops) if ops else []


def finish(works: Sequence[dist.Work]) -> None:
    for work in works:
        work.wait()


def transfer(
    group: dist.ProcessGroup, sends: Sequence[Transfer] = (), recvs: Sequence[Transfer] = ()
) -> None:
    finish(start_transfers(group, sends, recvs))


def accumulate(target: torch.Tensor, *received: torch.Tensor) -> None:
    """target += sum(received), rounding once at the end for half-precision dtypes."""
    if target.dtype in LOW_PRECISION and len(received) > 1:
        total = target.float()
        for part in received:
            total += part
        target.copy_(total)
    else:
        for part in received:
            target += part
