"""Elastic ranges (--nnodes MIN:MAX) and multi-node rendezvous options, checked before any
launch."""

import pytest

from clusterlm.config import build_config
from clusterlm.errors import UserError
from clusterlm.launch import LaunchOptions
from clusterlm.launch.elastic import check_sizes, node_range
from clusterlm.launch.torchrun import job_environment, torchrun_command

TINY = {
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 16,
    "training.micro_batch_size": 2,
}


@pytest.mark.parametrize("text,expected", [("2", (2, 2)), ("1:2", (1, 2)), ("3:3", (3, 3))])
def test_node_range(text, expected):
    assert node_range(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("2:1", "MIN is larger than MAX; use MIN:MAX with MIN <= MAX, e.g. 1:2"),
        ("0:2", "needs at least 1 node"),
        ("a:b", "takes N or MIN:MAX"),
    ],
)
def test_impossible_ranges_are_one_line(text, message):
    with pytest.raises(UserError, match=message):
        node_range(text)


def test_every_size_of_the_range_is_checked_with_a_fixed_global_batch():
    # 2 processes per node on 1..3 nodes: 2, 4, 6 processes; 64 sequences of 16 tokens split
    # over 2 and 4 data-parallel ranks but not over 6.
    cfg = build_config(None, {**TINY, "training.tokens_per_step": 2 * 16 * 4})
    assert check_sizes(cfg, 2, "1:2") == [2, 4]
    with pytest.raises(
        UserError, match="lets the group run on 6 processes, where training.tokens_per_step"
    ):
        check_sizes(cfg, 2, "1:3")
    with pytest.raises(
        UserError, match="needs training.tokens_per_step, so the global batch stays the same"
    ):
        check_sizes(build_config(None, TINY), 2, "1:2")
    assert check_sizes(build_config(None, TINY), 2, "2") == [4]  # a fixed size needs no fixed batch


def test_the_node_at_the_rendezvous_address_hosts_the_rendezvous():
    opts = LaunchOptions(
        nproc=2,
        nnodes="1:2",
        rdzv_endpoint="10.0.0.1:29400",
        rdzv_id="job7",
        local_addr="10.0.0.1",
        rdzv_conf="last_call_timeout=5",
    )
    command = torchrun_command(
        opts, ["train", "--nnodes", "1:2", "--local-addr", "10.0.0.1", "--steps=3"]
    )
    assert "--rdzv-conf=last_call_timeout=5,is_host=1" in command
    assert {
        "--rdzv-backend=clusterlm",
        "--rdzv-id=job7",
        "--local-addr=10.0.0.1",
        "--nnodes=1:2",
    } <= set(command)
    assert command[1:3] == [
        "-m",
        "clusterlm.launch.agent",
    ]  # torchrun, with the backend that binds its store
    assert command[-2:] == ["train", "--steps=3"]  # launcher options are not passed to the ranks
    other = torchrun_command(
        LaunchOptions(2, "1:2", "10.0.0.1:29400", local_addr="10.0.0.2"), ["train"]
    )
    assert not any(arg.startswith("--rdzv-conf") for arg in other)


def test_a_multi_node_job_needs_a_reachable_rendezvous_port():
    with pytest.raises(UserError, match="needs --rdzv-endpoint HOST:PORT"):
        torchrun_command(LaunchOptions(nproc=2, nnodes="2"), ["train"])


def test_a_single_node_job_meets_on_loopback_through_the_binding_backend():
    command = torchrun_command(LaunchOptions(nproc=2), ["train", "--nproc", "2"])
    assert {
        "--rdzv-backend=clusterlm",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
    } <= set(command)
    assert (
        "--standalone" not in command
    )  # torchrun's own standalone store listens on every interface


def test_every_job_gets_a_secret_in_its_environment_and_a_multi_node_ps_job_must_share_one():
    one_node = LaunchOptions(nproc=2)
    first, second = job_environment(one_node, {}, True), job_environment(one_node, {}, True)
    assert (
        len(first["CLUSTERLM_JOB_SECRET"]) == 64
        and first["CLUSTERLM_JOB_SECRET"] != second["CLUSTERLM_JOB_SECRET"]
    )
    assert first["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    nodes = LaunchOptions(
        nproc=2, nnodes="2", rdzv_endpoint="127.0.0.1:29400", local_addr="127.0.0.1"
    )
    given = job_environment(nodes, {"CLUSTERLM_JOB_SECRET": "s" * 64}, True)
    assert given["CLUSTERLM_JOB_SECRET"] == "s" * 64 and given["GLOO_SOCKET_IFNAME"] == "lo"
    assert job_environment(nodes, {}, False)[
        "CLUSTERLM_JOB_SECRET"
    ]  # unused outside ps: any will do
    with pytest.raises(UserError, match="needs the same CLUSTERLM_JOB_SECRET on every node"):
        job_environment(nodes, {}, True)
