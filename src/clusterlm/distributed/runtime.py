"""Where this process runs: its device, its rank, the device mesh, and its data-parallel place.

A job launched by torchrun (or `clusterlm train --nproc N`, or mpirun) joins the process group
from the launcher's environment (gloo on CPU, NCCL on CUDA) and builds one ``DeviceMesh``. A
plain single-process run has no process group and no mesh; the rest of the code treats it as the
degree-1 case of the same layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from clusterlm.config import Config
from clusterlm.config.degrees import check_layout
from clusterlm.distributed.launch_variables import launch_position
from clusterlm.distributed.listeners import confine_to_node, job_store
from clusterlm.distributed.mesh import build_mesh
from clusterlm.distributed.mpi_environment import adopt_mpi_environment
from clusterlm.distributed.ps_rendezvous import PSRole, join_parameter_server_job
from clusterlm.errors import UserError
from clusterlm.hardware import resolve_device

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    mesh: DeviceMesh | None = None
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ps: PSRole | None = None  # this rank's role in a parameter-server job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """Whether the ranks run every step together, joined by collectives. A parameter server's
        workers do not: each goes at its own pace, and rank 0 alone evaluates and saves."""
        return self.ps is None

    @property
    def reports(self) -> bool:
        """Whether this rank takes part in evaluations and checkpoints."""
        return self.lockstep or self.is_main


def _check_launch_environment() -> None:
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun, mpirun or "
            "`clusterlm train --nproc N`"
        )


def _join_process_group(device: torch.device, timeout_s: float) -> None:
    """``env://``'s rendezvous, through a store whose listener binds as ``listeners`` says."""
    if dist.is_initialized():  # already joined by the caller (tests, notebooks)
        return
    _check_launch_environment()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = job_store(rank, world_size, timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )


def setup_runtime(cfg: Config) -> Runtime:
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = resolve_device(cfg.training.device)
    adopt_mpi_environment()  # an mpirun rank: torchrun's variables from OpenMPI's or PMI's
    confine_to_node()  # every rank on this node: the store, gloo and NCCL on loopback
    _, world_size, local_rank = launch_position()
    world_size = dist.get_world_size() if dist.is_initialized() else world_size
    replicate, shard = check_layout(cfg, world_size)  # before any process waits for another
    if cfg.parallel.data_parallel == "ps":
        return _parameter_server_runtime(cfg, device, world_size)
    if world_size == 1 and not dist.is_initialized():
        return Runtime(device=device)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(
                f"local rank {local_rank} has no GPU of its own: this node has {gpus}; "
                f"launch at most {gpus} processes per node (--nproc {gpus}) "
                "or train on CPU (--training.device cpu)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    _join_process_group(device, cfg.parallel.timeout_s)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    mesh = build_mesh(device, pp, replicate, shard, tp, cfg.parallel.cp)
    dp_rank = mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard")
    return Runtime(
        device,
        dist.get_rank(),
        dist.get_world_size(),
        dp_rank,
        replicate * shard,
        mesh,
        tp_rank=mesh.get_local_rank("tp"),
        tp_size=tp,
        pp_rank=mesh.get_local_rank("pp"),
        pp_size=pp,
    )


def _parameter_server_runtime(cfg: Config, device: torch.device, world_size: int) -> Runtime:
    """No process group: workers and servers talk point to point
    (``clusterlm.distributed.ps_rendezvous``)."""
    if world_size > 1:
        _check_launch_environment()
    rank = launch_position()[0]
    role = join_parameter_server_job(cfg.parallel, rank, world_size)
    return Runtime(
        device, rank, world_size, dp_rank=min(rank, role.workers - 1), dp_size=role.workers, ps=role
    )


def describe_layout(cfg: Config, runtime: Runtime) -> str:
    if runtime.world_size == 1:
        return "1 process"
    p = cfg.parallel
    dp = f"dp {runtime.dp_size} ({p.data_parallel})" if runtime.dp_size > 1 else "dp 1"
    pp = f"pp {p.pp} ({p.pp_schedule})" if p.pp > 1 else "pp 1"
    tp = f"tp {p.tp}" + (" + sp" if p.sequence_parallel else "")
    cp = f" x cp {p.cp} ({p.cp_attention})" if p.cp > 1 else ""
    ep = f", experts over ep {p.ep}" if p.ep > 1 else ""
    return f"{runtime.world_size} processes: {pp} x {dp}{cp} x {tp}{ep}"


def average_across_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Mean of a scalar over all ranks (for reporting; every rank gets it)."""
    if runtime.world_size == 1 or not runtime.lockstep:
        return value
    value = value.detach().clone().float()
    dist.all_reduce(value)
    return value / runtime.world_size


def leave_process_group() -> None:
    """Destroy the process group, if any, so that the job ends without the backend's warnings."""
    if dist.is_initialized():
        dist.destroy_process_group()
