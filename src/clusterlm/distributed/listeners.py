"""Where the job's listening sockets bind.

torch's TCPStore server listens on every interface (the wildcard address) unless it is handed a
socket that is already bound (its ``master_listen_fd``); gloo's listeners bind the address of the
interface that GLOO_SOCKET_IFNAME names, else the address the host name resolves to. So:

* Every rank on one node (WORLD_SIZE = LOCAL_WORLD_SIZE): loopback. MASTER_ADDR becomes
  127.0.0.1, rank 0's store binds it, and gloo (and NCCL's bootstrap) use the loopback
  interface unless the user named interfaces (``confine_to_node``).
* Ranks on several nodes: the address the others are told to reach. Rank 0's store binds
  MASTER_ADDR (the rank-0 node's ``--local-addr``), the rendezvous store its endpoint's host
  (``clusterlm.launch.agent``). A host *name* that resolves to loopback on its own node while
  other nodes must reach it (a Debian-style ``127.0.1.1 <hostname>`` line) cannot be bound: the
  others reach that name at another address. There the store listens on every interface, as
  torch's own does, and says so on stderr (``bind_host``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import MutableMapping
from datetime import timedelta

import psutil
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), names[0])


def _addresses(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return set()
    return {str(info[4][0]).split("%")[0] for info in infos}


def _literal_loopback(host: str) -> bool:
    """A loopback address written out, or ``localhost``: this node whatever any resolver says."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    found = _addresses(host.strip("[]"))
    return bool(found) and all(ipaddress.ip_address(address).is_loopback for address in found)


def interface_of(host: str) -> str | None:
    """The network interface that holds one of ``host``'s addresses, or None."""
    wanted = _addresses(host.strip("[]"))
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.address.split("%")[0] in wanted for address in addresses):
            return name
    return None


def is_this_host(host: str) -> bool:
    """Whether ``host`` names this machine: a loopback address or one of its interfaces'."""
    return is_loopback(host) or interface_of(host) is not None


def bind_host(host: str, spans_nodes: bool) -> str | None:
    """The address a store that others reach at ``host`` binds: ``host`` itself, or None (every
    interface) for a host name that resolves to loopback here while other nodes must reach it."""
    if not spans_nodes or _is_ip(host) or _literal_loopback(host) or not is_loopback(host):
        return host
    print(
        f"warning: {host} resolves to a loopback address on this node, but ranks on other nodes "
        "reach it elsewhere: its store listens on every interface; give --local-addr "
        "(or MASTER_ADDR) as an address the other nodes use",
        file=sys.stderr,
        flush=True,
    )
    return None


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port) and listening."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As TCPStore's own: a restart rebinds at once.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def use_libuv() -> bool:
    """torch's choice of TCPStore server (``USE_LIBUV``, libuv by default)."""
    return os.environ.get("USE_LIBUV", "1") == "1"


def hosted_store(
    host: str,
    port: int,
    bind: str | None,
    timeout_s: float,
    world_size: int | None = None,
    wait_for_workers: bool = True,
) -> dist.TCPStore:
    """A TCPStore server that clients reach at ``host``:``port``, listening on ``bind`` only
    (every interface when None, as TCPStore does by itself). The store owns the socket."""
    fd = None
    if bind is not None:
        sock = listening_socket(bind, port)
        host, port, fd = bind.strip("[]"), sock.getsockname()[1], sock.detach()
    return dist.TCPStore(
        host,
        port,
        world_size,
        True,
        timedelta(seconds=timeout_s),
        wait_for_workers=wait_for_workers,
        master_listen_fd=fd,
        use_libuv=use_libuv(),
    )


def single_node(env: MutableMapping[str, str]) -> bool:
    """Whether the launcher says every rank runs on this node."""
    return bool(env.get("WORLD_SIZE")) and env.get("WORLD_SIZE") == env.get("LOCAL_WORLD_SIZE")


def confine_to_node(env: MutableMapping[str, str] | None = None) -> bool:
    """When every rank runs on this node, keep the job's sockets on loopback: rank 0's store
    (MASTER_ADDR, unless the launcher's agent hosts it), gloo's and NCCL's bootstrap listeners
    (unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set). True when it did."""
    env = os.environ if env is None else env
    if not single_node(env):
        return False
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not agent_store and not _literal_loopback(env.get("MASTER_ADDR", "")):
        env["MASTER_ADDR"] = LOOPBACK
    env.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    env.setdefault("NCCL_SOCKET_IFNAME", loopback_interface())
    return True


def job_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """What ``env://`` gives: the job's store at MASTER_ADDR:MASTER_PORT, hosted by rank 0 (or
    by the launcher's agent), but with rank 0's listener bound as this module says."""
    env = os.environ
    if rank != 0 or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store, _, _ = next(
            dist.rendezvous(
                "env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        )
        return store
    host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    spans_nodes = not single_node(env) and not _literal_loopback(host)
    return hosted_store(host, port, bind_host(host, spans_nodes), timeout_s, world_size)
