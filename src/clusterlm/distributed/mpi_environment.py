"""mpirun as the launcher: the ranks it starts read torchrun's variables from MPI's environment.

``mpirun -np 4 clusterlm train ...`` starts four ranks that know their place only from the MPI
launcher's variables: OpenMPI's ``OMPI_COMM_WORLD_*`` or the PMI ones of MPICH's and Intel MPI's
Hydra (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``). ``torch.distributed`` reads RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, so this module derives those; MPI itself
only starts the processes, and the collectives stay gloo's or NCCL's.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from clusterlm.errors import UserError


@dataclass(frozen=True)
class MpiFamily:
    name: str
    rank: str
    size: str
    local_rank: str
    local_size: str  # ranks on this node: all of them means one node, so rank 0 is on 127.0.0.1
    job_id: tuple[str, ...]  # the first one set names the job (for a port every rank agrees on)

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.rank, self.size, self.local_rank)


FAMILIES = (
    MpiFamily(
        "OpenMPI",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"),
    ),
    MpiFamily("PMI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", ("PMI_JOBID",)),
)
# Ports below Linux's ephemeral range (32768 and up), so a derived port does not meet a client
# socket.
PORT_BASE, PORT_SPAN = 10000, 20000


def port_for_job(job_id: str) -> int:
    """The rendezvous port of a job, the same on every rank and node: a numeric id modulo the span
    (the sbatch script computes the same in bash), any other id through crc32."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + number % PORT_SPAN


def mpi_family(env: Mapping[str, str]) -> MpiFamily | None:
    """The MPI launcher that started this process, or None. A rank that already has torchrun's
    WORLD_SIZE is torchrun's, even when a PMI-enabled srun also set PMI variables around it."""
    if "WORLD_SIZE" in env:
        return None
    for family in FAMILIES:
        if any(name in env for name in family.markers):
            return family
    if "PMIX_RANK" in env:  # a PMIx launcher without OpenMPI's variables
        return FAMILIES[0]
    return None


def launched_by_mpi(env: Mapping[str, str] | None = None) -> bool:
    return mpi_family(os.environ if env is None else env) is not None


def torch_variables(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE when known), MASTER_ADDR, MASTER_PORT of
    an MPI rank; {} when no MPI launcher started this process."""
    family = mpi_family(env)
    if family is None:
        return {}
    missing = [name for name in family.markers if name not in env]
    if missing:
        raise UserError(
            f"started by an MPI launcher ({family.name}) but {', '.join(missing)} is not set; "
            "launch with OpenMPI's mpirun (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK) or a PMI launcher "
            "(PMI_RANK, PMI_SIZE, MPI_LOCALRANKID), or with torchrun"
        )
    values = {
        "RANK": env[family.rank],
        "WORLD_SIZE": env[family.size],
        "LOCAL_RANK": env[family.local_rank],
    }
    if family.local_size in env:
        values["LOCAL_WORLD_SIZE"] = env[family.local_size]
    values["MASTER_ADDR"] = _master_addr(env, family)
    values["MASTER_PORT"] = env.get("MASTER_PORT") or str(port_for_job(_job_id(env, family)))
    return values


def _master_addr(env: Mapping[str, str], family: MpiFamily) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if env.get(family.local_size) == env[family.size]:
        return "127.0.0.1"  # every rank on this node
    # Across nodes nothing in the environment names rank 0's host for sure (the mapping policy
    # places it), so the user says it.
    raise UserError(
        f"mpirun started {env[family.size]} ranks on several nodes "
        "(or did not say how many are on this one) and MASTER_ADDR is not set: pass rank 0's host, "
        "e.g. `mpirun -x MASTER_ADDR=<host of rank 0> ...` (OpenMPI) "
        "or `-genv MASTER_ADDR <host>` (Hydra)"
    )


def _job_id(env: Mapping[str, str], family: MpiFamily) -> str:
    for name in family.job_id:
        if env.get(name):
            return env[name]
    raise UserError(
        f"started by {family.name}'s launcher, which names no job ({' or '.join(family.job_id)}) "
        "to derive a rendezvous port from: set MASTER_PORT for every rank, "
        "e.g. `mpirun -x MASTER_PORT=29500`"
    )


def adopt_mpi_environment(env: MutableMapping[str, str] | None = None) -> bool:
    """Set torchrun's variables from MPI's in ``env`` (this process's environment by default),
    where ``torch.distributed``'s env:// rendezvous reads them; True when this is an MPI rank."""
    env = os.environ if env is None else env
    values = torch_variables(env)
    env.update(values)
    return bool(values)
