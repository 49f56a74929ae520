"""How the ranks of a parameter-server job meet: no process group, one store that workers and
servers exchange addresses through (``clusterlm.parallel.ps`` does the rest)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from clusterlm.config import ParallelConfig


@dataclass
class PSRole:
    """This rank's place in a parameter-server job and the store workers join servers through."""

    store: dist.Store
    rank: int
    workers: int
    cfg: ParallelConfig

    @property
    def is_server(self) -> bool:
        return self.rank >= self.workers

    def prefix(self, server: int) -> str:
        return f"server{server}"


def join_parameter_server_job(cfg: ParallelConfig, rank: int, world_size: int) -> PSRole:
    """Connect to the job's TCPStore (torchrun's, or hosted by rank 0 as ``env://`` does). Keys
    carry the launcher's restart count, so that a restarted job ignores the last attempt's."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                       timeout=timedelta(seconds=cfg.timeout_s)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return PSRole(dist.PrefixStore(f"clusterlm-ps/{attempt}", store), rank, world_size - cfg.ps_servers, cfg)
