"""How the ranks of a parameter-server job meet: no process group, one store that workers and
servers exchange addresses through (``clusterlm.parallel.ps`` does the rest).

The store is the job's (``clusterlm.distributed.listeners.job_store``), which anyone who can
reach its port can read and write; so every value the job writes there is signed with the job's
secret and checked when read (``clusterlm.distributed.signing``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from clusterlm.config import ParallelConfig
from clusterlm.distributed.job_secret import job_secret
from clusterlm.distributed.listeners import job_store
from clusterlm.distributed.signing import SignedStore


@dataclass
class PSRole:
    """This rank's place in a parameter-server job and the store workers join servers through."""

    store: SignedStore
    rank: int
    workers: int
    cfg: ParallelConfig

    @property
    def is_server(self) -> bool:
        return self.rank >= self.workers

    @property
    def secret(self) -> bytes:
        return self.store.secret

    def prefix(self, server: int) -> str:
        return f"server{server}"


def join_parameter_server_job(cfg: ParallelConfig, rank: int, world_size: int) -> PSRole:
    """Connect to the job's TCPStore (hosted by rank 0 as ``env://`` does, or by the launcher).
    Keys carry the launcher's restart count, so that a restarted job ignores the last attempt's."""
    secret = job_secret()  # before any connection: a job without one fails here, on every rank
    store = job_store(rank, world_size, cfg.timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return PSRole(
        SignedStore(store, secret, f"clusterlm-ps/{attempt}/"),
        rank,
        world_size - cfg.ps_servers,
        cfg,
    )
