"""DDP communication hooks that reduce each gradient bucket with a chosen algorithm and compression.

DDP keeps its bucketing and its overlap of communication with the backward pass; only the
reduction of a bucket is replaced.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime.
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clusterlm.comm.allreduce import ALGORITHMS
from clusterlm.comm.compression import CompressionStats, Compressor, make_compressor


@dataclass
class CommHookState:
    algorithm: str
    compression: str
    compressor: Compressor

    @property
    def stats(self) -> CompressionStats:
        return self.compressor.stats


def register_comm_hook(
    ddp_model: DistributedDataParallel,
    algorithm: str = "native",
    compression: str = "none",
    *,
    compression_options: dict[str, Any] | None = None,
    **algorithm_options: Any,
) -> CommHookState:
    """Make ``ddp_model`` average each gradient bucket with ``algorithm`` and ``compression``.

    ``compression_options`` go to the compressor (``rank`` for powersgd, ``ratio`` for topk);
    the remaining keywords go to the algorithm. The returned state reports bytes sent.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"unknown all-reduce algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}"
        )
    compressor = make_compressor(
        compression, algorithm, ddp_model.process_group, compression_options, **algorithm_options
    )
    state = CommHookState(algorithm, compression, compressor)
    ddp_model.register_comm_hook(state, _reduce_bucket)
    return state


def _reduce_bucket(
    state: CommHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    # The point-to-point algorithms run synchronously here and hand DDP a completed future. On
    # gloo that costs no overlap DDP would otherwise get, since gloo runs one collective at a
    # time per group anyway; the backward pass still overlaps with the buckets not yet ready.
    buffer = bucket.buffer()
    state.compressor.reduce(buffer, [p.shape for p in bucket.parameters()], bucket.index())
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future
