"""Collectives built on torch.distributed point-to-point ops, compression, and DDP hooks.

``all_reduce(tensor, op, algorithm, group, **options)`` runs any of ``ALGORITHMS``;
``register_comm_hook(ddp_model, algorithm, compression)`` puts one behind DDP's gradient buckets.
"""

from clusterlm.comm.allreduce import ALGORITHMS, all_reduce
from clusterlm.comm.compression import COMPRESSIONS, CompressionStats
from clusterlm.comm.hooks import CommHookState, register_comm_hook

__all__ = [
    "ALGORITHMS",
    "COMPRESSIONS",
    "CommHookState",
    "CompressionStats",
    "all_reduce",
    "register_comm_hook",
]
