"""mpirun's ranks: torchrun's variables from OpenMPI's or PMI's environment, and bad
environments."""

import pytest

from clusterlm.distributed import mpi_environment as mpi
from clusterlm.errors import UserError
from clusterlm.launch import LaunchOptions

OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_MCA_ess_base_jobid": "1234173953",
}
HYDRA = {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "4",
    "PMI_JOBID": "77",
}


def test_openmpi_on_one_node_meets_on_loopback_at_a_port_of_the_job():
    values = mpi.torch_variables(OPENMPI)
    assert values == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(mpi.port_for_job("1234173953")),
    }
    assert 10000 <= int(values["MASTER_PORT"]) < 30000


def test_pmi_across_nodes_takes_master_addr_and_keeps_a_given_port():
    values = mpi.torch_variables({**HYDRA, "MASTER_ADDR": "node17", "MASTER_PORT": "29511"})
    assert values["RANK"] == "5" and values["WORLD_SIZE"] == "8" and values["LOCAL_RANK"] == "1"
    assert (values["MASTER_ADDR"], values["MASTER_PORT"]) == ("node17", "29511")


def test_across_nodes_without_master_addr_is_one_clear_line():
    with pytest.raises(
        UserError, match=r"several nodes .* MASTER_ADDR is not set: pass rank 0's host"
    ):
        mpi.torch_variables(HYDRA)
    with pytest.raises(UserError, match="MASTER_ADDR"):  # how many ranks share the node is unknown
        mpi.torch_variables({k: v for k, v in OPENMPI.items() if k != "OMPI_COMM_WORLD_LOCAL_SIZE"})


def test_mpirun_without_the_rank_variables_is_one_clear_line():
    partial = {k: v for k, v in OPENMPI.items() if k != "OMPI_COMM_WORLD_RANK"}
    with pytest.raises(
        UserError, match="started by an MPI launcher .OpenMPI. but OMPI_COMM_WORLD_RANK is not set"
    ):
        mpi.torch_variables(partial)
    with pytest.raises(UserError, match="PMI_SIZE, MPI_LOCALRANKID is not set"):
        mpi.torch_variables({"PMI_RANK": "0"})
    with pytest.raises(UserError, match="OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE"):
        mpi.torch_variables({"PMIX_RANK": "0"})
    with pytest.raises(UserError, match="set MASTER_PORT"):
        mpi.torch_variables(
            {k: v for k, v in HYDRA.items() if k != "PMI_JOBID"} | {"MASTER_ADDR": "node1"}
        )


def test_torchrun_ranks_and_plain_processes_are_left_alone():
    assert (
        mpi.torch_variables({**HYDRA, "WORLD_SIZE": "4"}) == {}
    )  # torchrun under a PMI-enabled srun
    assert mpi.torch_variables({"PATH": "/bin"}) == {}
    assert not mpi.launched_by_mpi({"WORLD_SIZE": "2", **OPENMPI})


def test_ports_are_deterministic_and_match_the_sbatch_formula():
    assert (
        mpi.port_for_job("123456") == 10000 + 123456 % 20000
    )  # the batch script computes this in bash
    assert (
        mpi.port_for_job("prterun-vm-1@1")
        == mpi.port_for_job("prterun-vm-1@1")
        != mpi.port_for_job("prterun-vm-2@1")
    )


def test_an_mpirun_rank_is_a_rank_not_a_launcher(monkeypatch):
    for name in (
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LOCAL_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert LaunchOptions(nproc=2).launches
    for name, value in OPENMPI.items():
        monkeypatch.setenv(name, value)
    assert not LaunchOptions(nproc=2).launches
    env = dict(OPENMPI)
    assert (
        mpi.adopt_mpi_environment(env) and env["RANK"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    )
