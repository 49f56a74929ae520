"""``parallel.data_parallel = ps``: a parameter server, asynchronous or with bounded staleness.

The last ``parallel.ps_servers`` ranks are servers; the others are workers, rank 0 among them.
The parameters are sharded across the servers by whole tensor (largest first, to the least
loaded); each server holds its shard's optimizer state and applies the optimizer at every push
(``clusterlm.parallel.ps_server``). A worker trains the plain model on its own data shard: its
optimizer's ``step`` pushes the gradients, with the step's learning rate, to every server and
receives the shard's current values back.

The workers never wait for one another except through the staleness bound, so the job has no
collective: rank 0 logs its own loss, evaluates and saves alone; a checkpoint holds the servers'
parameters and optimizer state, which rank 0 fetches when it saves, and every rank (servers
included) reads a checkpoint when it resumes. A step is one global batch: ``workers`` pushes
(under s = 0 a round), and the job ends when the servers have applied ``training.steps`` of
them, however the workers shared the work. Gradients are clipped per push, on the worker.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clusterlm.distributed.job_secret import SECRET_VARIABLE
from clusterlm.distributed.ps_rendezvous import PSRole
from clusterlm.distributed.signing import answer_challenge
from clusterlm.errors import UserError
from clusterlm.parallel.data_parallel import build_optimizer
from clusterlm.parallel.model import WholeModel
from clusterlm.parallel.ps_server import ParameterServer
from clusterlm.parallel.ps_wire import (
    HEADER,
    JOIN,
    PUSH,
    SNAPSHOT,
    flatten,
    message,
    pair_group,
    unflatten_into,
)
from clusterlm.parallel.state_dict import create_missing_state, load_training_state, training_state


def shard_by_tensor(model: nn.Module, servers: int) -> list[list[nn.Parameter]]:
    """Each server's parameters: whole tensors, largest first to the least-loaded server. Frozen
    parameters (fine-tuning's lower layers) stay with every rank: nothing ever updates them."""
    params = [p for p in model.parameters() if p.requires_grad]
    loads, owner = [0] * servers, {}
    for index in sorted(range(len(params)), key=lambda i: -params[i].numel()):
        server = loads.index(min(loads))
        owner[index] = server
        loads[server] += params[index].numel()
    return [[p for i, p in enumerate(params) if owner[i] == server] for server in range(servers)]


class ServerLinks:
    """A worker's connections to every server: push gradients, pull parameters, fetch state."""

    def __init__(self, role: PSRole, shards: list[list[nn.Parameter]]):
        self.shards, self.groups = shards, []
        for server in range(len(shards)):
            prefix = role.prefix(server)
            number = role.store.add(f"{prefix}/joins", 1)
            role.store.set(f"{prefix}/join/{number}", str(role.rank))
            key = f"{prefix}/pair/{number}"
            group = pair_group(role.store, key, 1, role.cfg.timeout_s)
            if not answer_challenge(group, role.secret, key):
                raise UserError(
                    f"parameter server {server} refused this worker, or could not prove it holds "
                    f"the job's secret: every rank of the job needs the same {SECRET_VARIABLE}"
                )
            self.groups.append(group)
        self.step = 0
        self.metrics: dict[str, float] = {}
        self._exchange(JOIN, 0.0, None)

    @torch.no_grad()
    def _exchange(self, kind: float, lr: float, payload: list[torch.Tensor] | None) -> None:
        """Send to every server, then read each one's reply: its step and statistics, and the
        current values of its shard, written into this worker's parameters."""
        sizes = [0] * len(self.groups) if payload is None else [part.numel() for part in payload]
        # Each server checks its shard's size.
        headers, sends = [message(kind, lr, size) for size in sizes], []
        for server, group in enumerate(self.groups):
            sends.append(group.send([headers[server]], 0, 0))
            if payload is not None:
                sends.append(group.send([payload[server]], 0, 0))
        replies = []
        for group, shard in zip(self.groups, self.shards, strict=True):
            reply, values = (
                torch.zeros(HEADER, dtype=torch.float64),
                torch.empty(sum(p.numel() for p in shard)),
            )
            group.recv([reply], 0, 0).wait()
            group.recv([values], 0, 0).wait()
            unflatten_into(values, shard)
            replies.append(reply.tolist())
        for work in sends:
            work.wait()
        self.step = int(min(r[0] for r in replies))
        pushes = replies[0][1]
        self.metrics = {
            "ps_pushes": pushes,
            "staleness_max": max(r[2] for r in replies),
            "staleness_mean": replies[0][3] / pushes if pushes else 0.0,
            "ps_live_workers": replies[0][4],
            "ps_server_busy_s": max(r[5] for r in replies),
            "ps_rejected_pushes": max(r[6] for r in replies),
            "ps_refused_peers": max(r[7] for r in replies),
        }

    def push(self, lr: float) -> None:
        grads = [
            flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in shard])
            for shard in self.shards
        ]
        self._exchange(PUSH, lr, grads)

    @torch.no_grad()
    def fetch_state(self, optimizer: torch.optim.Optimizer) -> None:
        """The servers' parameters and optimizer state, into this worker's model and ``optimizer``
        (a replica of the servers' optimizer kept for checkpoints)."""
        create_missing_state(optimizer)
        for group, shard in zip(self.groups, self.shards, strict=True):
            group.send([message(SNAPSHOT)], 0, 0).wait()
            size = torch.zeros(HEADER, dtype=torch.float64)
            group.recv([size], 0, 0).wait()
            flat = torch.empty(int(size[0]), dtype=torch.float64)
            group.recv([flat], 0, 0).wait()
            tensors: list[torch.Tensor] = list(shard)
            for param in shard:
                tensors += [value for _, value in sorted(optimizer.state[param].items())]
            unflatten_into(flat, tensors)


class PushOptimizer:
    """What the loop steps on a worker: ``step`` pushes the gradients with the learning rate the
    loop set, and pulls fresh parameters. ``replica`` is an optimizer of the servers' kind, whose
    state is filled from the servers for a checkpoint."""

    def __init__(self, replica: torch.optim.Optimizer, links: ServerLinks):
        self.replica, self.links = replica, links
        self.param_groups = replica.param_groups

    def step(self) -> None:
        self.links.push(self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.replica.zero_grad(set_to_none=set_to_none)


class PSWorkerModel(WholeModel):
    """A worker: the whole model, trained on its own data, its optimizer on the servers."""

    def __init__(self, role: PSRole, **kwargs: Any):
        super().__init__(**kwargs)
        self.links = ServerLinks(role, shard_by_tensor(self.parts[0], role.cfg.ps_servers))

    def build_optimizers(self, recipe: Any) -> list[Any]:
        return [PushOptimizer(build_optimizer(recipe(self.parts[0]), False), self.links)]

    def after_step(self, step: int) -> int:
        return self.links.step

    def state_dict(self, optimizers: list[Any] | None = None) -> dict[str, Any]:
        if not optimizers:
            return training_state(self.parts, None)
        self.links.fetch_state(optimizers[0].replica)
        return training_state(self.parts, [optimizers[0].replica])

    def load_state_dict(self, reader: Any, optimizers: list[Any] | None = None) -> None:
        replicas = [optimizer.replica for optimizer in optimizers] if optimizers else None
        load_training_state(self.parts, replicas, reader.read, reader.keys)

    def comm_metrics(self) -> dict[str, float]:
        return self.links.metrics


class PSServerModel(WholeModel):
    """A server: the whole model and optimizer (read whole from a checkpoint), of which it updates
    and serves its shard."""

    serves = True

    def __init__(self, role: PSRole, **kwargs: Any):
        super().__init__(**kwargs)
        self.role = role

    def serve(
        self, optimizers: list[torch.optim.Optimizer], total_steps: int, start_step: int
    ) -> dict[str, Any]:
        role, p = self.role, self.role.cfg
        index = role.rank - role.workers
        shard = shard_by_tensor(self.parts[0], p.ps_servers)[index]
        server = ParameterServer(
            shard, optimizers[0], p.ps_staleness, role.workers, total_steps, start_step
        )
        server.serve(role.store, role.prefix(index), p.timeout_s, p.ps_lease_s)
        return {
            "rank": role.rank,
            "step": server.step,
            "pushes": server.stats.pushes,
            "staleness_max": server.stats.staleness_max,
            "rejected_pushes": server.stats.rejected,
            "refused_peers": server.stats.refused,
        }


def parameter_server_model(role: PSRole, **kwargs: Any) -> WholeModel:
    return PSServerModel(role, **kwargs) if role.is_server else PSWorkerModel(role, **kwargs)
