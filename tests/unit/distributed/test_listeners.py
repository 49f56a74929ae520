"""Where the job's stores bind (``clusterlm.distributed.listeners``, ``clusterlm.launch.agent``):
checked on this process's own listening sockets, loopback only."""

import socket

import psutil
import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from clusterlm.distributed import listeners
from clusterlm.distributed.listeners import bind_host, confine_to_node, hosted_store, job_store
from clusterlm.launch.rendezvous import rendezvous_store


def listening(port: int) -> list[str]:
    """The local addresses this process listens on at ``port``."""
    return [
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def test_on_one_node_the_store_and_gloo_and_nccl_move_to_loopback():
    env = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node-a.example"}
    assert confine_to_node(env)
    assert (
        env["MASTER_ADDR"] == "127.0.0.1"
        and env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
    )
    chosen = {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "::1",
        "GLOO_SOCKET_IFNAME": "eth1",
    }
    assert (
        confine_to_node(chosen)
        and chosen["MASTER_ADDR"] == "::1"
        and chosen["GLOO_SOCKET_IFNAME"] == "eth1"
    )
    agent = {
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    assert (
        confine_to_node(agent) and agent["MASTER_ADDR"] == "n1"
    )  # the agent's store is where it is
    nodes = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    assert not confine_to_node(nodes) and nodes == {
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
    }


def test_a_multi_node_store_binds_its_address_unless_the_name_means_loopback_here(
    monkeypatch, capsys
):
    assert bind_host("10.0.0.1", spans_nodes=True) == "10.0.0.1"
    assert bind_host("localhost", spans_nodes=False) == "localhost"
    monkeypatch.setattr(
        listeners, "_addresses", lambda host: {"127.0.1.1"}
    )  # Debian's hostname line
    assert bind_host("node-a", spans_nodes=False) == "node-a"
    assert bind_host("node-a", spans_nodes=True) is None
    assert "listens on every interface" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_hosted_store_listens_on_its_address_only(host):
    try:
        socket.create_server(
            (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        ).close()
    except OSError:
        pytest.skip(f"this machine cannot listen on {host}")
    store = hosted_store(host, 0, host, timeout_s=10, wait_for_workers=False)
    store.set("k", "v")
    assert listening(store.port) == [host]


def test_rank_0_of_a_single_node_job_hosts_its_store_on_loopback(monkeypatch):
    for name, value in {
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    store = job_store(0, 1, timeout_s=10)
    assert listening(store.port) == ["127.0.0.1"]


def test_the_rendezvous_store_of_one_node_listens_on_loopback():
    params = RendezvousParameters("clusterlm", "127.0.0.1:0", "job", 1, 1, local_addr="127.0.0.1")
    store = rendezvous_store(params)
    assert listening(store.port) == ["127.0.0.1"]
