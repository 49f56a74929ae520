"""A rendezvous store that listens only where it should.

torch's c10d rendezvous backend starts its TCPStore on every interface of the node that hosts
it, and torchrun has no option to bind it. This module registers one more rendezvous backend
through torch's handler registry: ``--rdzv-backend=clusterlm``, the c10d backend whose hosting
node binds its store to the endpoint's host (loopback for a single-node job, the address every
node was given for a multi-node one; ``clusterlm.distributed.listeners``). Which node hosts
follows c10d's rules: ``--rdzv-conf is_host=1|0`` where given, else the node that the endpoint's
host names, falling back to a client when the port is taken. The launch agent
(``clusterlm.launch.agent``) registers it before it runs torchrun.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousHandler,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from clusterlm.distributed.listeners import bind_host, hosted_store, is_this_host, use_libuv

BACKEND = "clusterlm"
DEFAULT_PORT = 29400  # c10d's


def rendezvous_store(params: RendezvousParameters) -> dist.TCPStore:
    """The rendezvous store: hosted here, bound to the endpoint's host, or a client of it."""
    host, port = parse_rendezvous_endpoint(params.endpoint, default_port=DEFAULT_PORT)
    timeout_s = params.get_as_int("read_timeout", 60) or 60
    configured = params.get_as_bool("is_host")
    hosts = is_this_host(host) if configured is None else configured
    # A guessed host falls back to a client: another agent on this machine may host already.
    attempts = [True, False] if hosts and configured is None else [hosts]
    for index, serve in enumerate(attempts):
        try:
            if serve:
                return hosted_store(
                    host,
                    port,
                    bind_host(host, params.max_nodes > 1),
                    timeout_s,
                    wait_for_workers=False,
                )
            return dist.TCPStore(
                host,
                port,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
                use_libuv=use_libuv(),
            )
        except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
            if index == len(attempts) - 1:
                raise RendezvousConnectionError(
                    f"cannot reach or host the rendezvous store at {host}:{port}"
                ) from exc
    raise AssertionError("unreachable")


class BoundC10dBackend(C10dRendezvousBackend):
    """c10d's backend, unchanged, under this backend's name (torch checks that they match)."""

    @property
    def name(self) -> str:
        return BACKEND


def rendezvous_handler(params: RendezvousParameters) -> RendezvousHandler:
    store = rendezvous_store(params)
    return create_handler(store, BoundC10dBackend(store, params.run_id), params)


def register_bound_backend() -> None:
    """Make ``--rdzv-backend=clusterlm`` known to torchrun in this process."""
    rendezvous_handler_registry.register(BACKEND, rendezvous_handler)
