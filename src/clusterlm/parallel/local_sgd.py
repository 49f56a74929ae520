"""Communication-light data parallelism: local SGD and DiLoCo.

Each data-parallel rank trains its own replica with its own optimizer and no gradient
communication; every ``parallel.local_steps`` (H) optimizer steps the replicas synchronize with
one all-reduce of the parameters:

- ``local_sgd``: the replicas are replaced by their average (Stich, "Local SGD converges fast and
  communicates little", 2019). With H = 1 and SGD this is synchronous data parallelism.
- ``diloco``: the averaged pseudo-gradient ``anchor - mean(replicas)`` drives an outer Nesterov SGD
  on the anchor, the parameters the window started from; every replica then restarts from the new
  anchor (Douillard et al., "DiLoCo", 2023: inner AdamW, outer lr 0.7, momentum 0.9).

Between synchronizations the replicas differ. A checkpoint therefore holds each replica with its
optimizer state under ``replica.<rank>``, the DiLoCo anchor and outer momentum under ``outer``,
and under ``model`` the replicas' average, which is what evaluation and generation load. It
resumes exactly on the same number of ranks; a checkpoint of a synchronous layout starts every
replica from its model and optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clusterlm.errors import UserError
from clusterlm.parallel.model import WholeModel
from clusterlm.parallel.state_dict import load_training_state, training_state


def _average(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """The mean of each tensor over ``group``'s ranks, in one all-reduce; new tensors."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    if group is not None:
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
    return [
        piece.view_as(t).to(t.dtype)
        for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


class LocalSGDModel(WholeModel):
    """A replica per rank, synchronized every ``local_steps`` steps (see the module docstring)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        local_steps: int,
        outer: dict[str, float] | None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.group, self.local_steps = group, local_steps
        self.rank = dist.get_rank(group) if group is not None else 0
        self.replicas = dist.get_world_size(group) if group is not None else 1
        self.names, self.params = zip(*self.parts[0].named_parameters(), strict=True)
        self.outer: torch.optim.SGD | None = None
        self.synchronizations = 0
        if outer is not None:
            self.anchor = [nn.Parameter(p.detach().clone()) for p in self.params]
            self.outer = torch.optim.SGD(
                self.anchor, lr=outer["lr"], momentum=outer["momentum"], nesterov=True
            )
            for a in self.anchor:  # a zero buffer steps exactly like SGD's first-step copy
                self.outer.state[a]["momentum_buffer"] = torch.zeros_like(a)

    def after_step(self, step: int) -> int:
        if step % self.local_steps == 0:
            self.synchronize()
        return step

    @torch.no_grad()
    def synchronize(self) -> None:
        averaged = _average(list(self.params), self.group)
        if self.outer is None:
            for param, mean in zip(self.params, averaged, strict=True):
                param.copy_(mean)
        else:
            for anchor, mean in zip(self.anchor, averaged, strict=True):
                anchor.grad = anchor.detach() - mean  # the pseudo-gradient
            self.outer.step()
            for param, anchor in zip(self.params, self.anchor, strict=True):
                param.copy_(anchor)
        self.synchronizations += 1

    def comm_metrics(self) -> dict[str, float]:
        return {"synchronizations": float(self.synchronizations)}

    def _outer_state(self) -> dict[str, Any]:
        if self.outer is None:
            return {}
        return {
            "anchor": dict(zip(self.names, self.anchor, strict=True)),
            "momentum": {
                n: self.outer.state[a]["momentum_buffer"]
                for n, a in zip(self.names, self.anchor, strict=True)
            },
        }

    def state_dict(self, optimizers: list[torch.optim.Optimizer] | None = None) -> dict[str, Any]:
        own = training_state(self.parts, optimizers)
        names = list(own["model"])
        state = {
            "model": dict(
                zip(names, _average([own["model"][n] for n in names], self.group), strict=True)
            ),
            "replica": {str(self.rank): own},
        }
        if self.outer is not None:
            state["outer"] = self._outer_state()
        return state

    def load_state_dict(
        self, reader: Any, optimizers: list[torch.optim.Optimizer] | None = None
    ) -> None:
        keys = reader.keys
        saved = {int(k.split(".")[1]) for k in keys if k.startswith("replica.")}
        if not saved or optimizers is None:  # a synchronous layout's checkpoint, or inference
            super().load_state_dict(reader, optimizers)
            if self.outer is not None:
                for anchor, param in zip(self.anchor, self.params, strict=True):
                    anchor.data.copy_(param.detach())
            return
        if saved != set(range(self.replicas)):
            raise UserError(
                f"the checkpoint holds {len(saved)} local replicas "
                f"but this job has {self.replicas}; "
                f"resume it on {len(saved)} data-parallel ranks"
            )
        prefix = f"replica.{self.rank}."
        own_keys = {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}
        outer = self._outer_state()

        def read(own: dict[str, Any]) -> None:
            reader.read({"replica": {str(self.rank): own}, **({"outer": outer} if outer else {})})

        load_training_state(self.parts, optimizers, read, own_keys)
