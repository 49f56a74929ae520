"""The ring reduce-scatter (``clusterlm.comm.ring``) as FSDP2's gradient reduce-scatter.

gloo's own ``reduce_scatter`` is slower than its all-reduce, which moves twice the data, and
slower than the ring's first half (benchmarks/collectives-cpu-epyc-zen4-2026-12-01.md). FSDP
reduce-scatters every unit's gradients each step, so on gloo the sharded strategies use the ring
(``comm.reduce_scatter``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from clusterlm.comm.peers import Peers
from clusterlm.comm.ring import reduce_scatter


class RingReduceScatter(ReduceScatter):
    """FSDP2's ``ReduceScatter`` by the ring: rank i of the group ends with the sum of chunk i."""

    def __init__(self) -> None:
        self._peers: dict[dist.ProcessGroup, Peers] = {}

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op,
        async_op: bool = False,
    ) -> None:
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG) or async_op:
            raise ValueError(
                "the ring reduce-scatter sums synchronously; "
                f"FSDP asked for {op} (async {async_op})"
            )
        output_tensor.copy_(reduce_scatter(input_tensor, self._ring(group)))
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(group.size())

    def _ring(self, group: dist.ProcessGroup) -> Peers:
        """The group's ranks ordered so that group rank i ends holding segment i, as FSDP expects:
        the ring leaves position p with segment p + 1, so rank i sits at position i - 1."""
        if group not in self._peers:
            peers = Peers.of_group(group)
            rotated = peers.ranks[1:] + peers.ranks[:1]
            self._peers[group] = Peers(group, rotated, (peers.index - 1) % peers.size)
        return self._peers[group]


def use_ring_reduce_scatter(model: torch.nn.Module) -> None:
    """Every FSDP unit of ``model`` reduce-scatters its gradients by the ring."""
    comm = RingReduceScatter()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(comm)
