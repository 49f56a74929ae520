"""Context parallelism: every sequence split over the ranks of the mesh's ``cp`` dimension.

The ranks of a cp group read the same windows (the loader counts them as one data-parallel rank);
each keeps its zig-zag share of every window (chunks i and 2·cp−1−i of 2·cp), with the global
positions of those tokens, so rotary angles and learned positions are those of one process. The
layers' attention spans the group (``clusterlm.parallel.ring_attention``); everything else is per
token. Each rank's loss is the mean over its share, all shares are equal, and the cp ranks reduce
their gradients with the data-parallel ranks (``clusterlm.distributed.mesh``): the gradient is that
of the mean over the global tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

from clusterlm.config import Config
from clusterlm.data.packing import Packing
from clusterlm.models.gpt import Attention, Transformer
from clusterlm.parallel.packed_inputs import Inputs, ModelInputs
from clusterlm.parallel.ring_attention import (
    all_to_all_attention,
    ring_attention,
    zigzag_positions,
)

ATTENTION = {"ring": ring_attention, "all_to_all": all_to_all_attention}


def apply_context_parallel(model: nn.Module, group: ProcessGroup, kind: str) -> None:
    """Every attention layer of ``model`` attends across ``group`` (``parallel.cp_attention``),
    and a model (or pipeline stage) called without positions takes its tokens' global ones: a
    pipeline passes stage to stage only the hidden state."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)

    def global_positions(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if kwargs.get("positions") is None:
            share = zigzag_positions(args[0].size(1), rank, cp, args[0].device)
            kwargs = {**kwargs, "positions": share}
        return args, kwargs

    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = partial(ATTENTION[kind], group=group)
        if isinstance(module, Transformer):
            module.register_forward_pre_hook(global_positions, with_kwargs=True)


@dataclass(frozen=True)
class ContextParallelInputs(ModelInputs):
    """This rank's zig-zag share of a batch of whole windows, with its tokens' global (or
    per-document) positions and the mask its attention reads: the document ids of the whole
    windows for the ring, the whole windows' mask for all-to-all."""

    group: ProcessGroup | None = None
    kind: str = "ring"

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Inputs]:
        assert self.group is not None
        rank, cp = dist.get_rank(self.group), dist.get_world_size(self.group)
        share = zigzag_positions(x.size(1) // cp, rank, cp, x.device)
        documents = self.packing.documents(x)
        positions = self.packing.positions(documents)
        mask: Any = None
        if documents is not None and self.packing.document_masking:
            mask = documents if self.kind == "ring" else self.mask(documents)
        return (
            x[:, share],
            y[:, share],
            {"positions": share if positions is None else positions[:, share], "mask": mask},
        )

    def combine(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums over this rank's share -> over the whole windows, on every rank of the group."""
        sums = sums.clone()
        dist.all_reduce(sums, group=self.group)
        return sums


def model_inputs(
    cfg: Config, packing: Packing, device: torch.device, mesh: DeviceMesh | None
) -> ModelInputs:
    """What the model reads of each batch: flex attention's block mask on a GPU where attention
    has no dropout (flex has none; on a CPU it has no backward), else the boolean fallback; this
    rank's share of each sequence under context parallelism."""
    use_flex = device.type == "cuda" and cfg.model.dropout == 0
    if mesh is None or cfg.parallel.cp == 1:
        return ModelInputs(packing, use_flex)
    return ContextParallelInputs(
        packing, use_flex, mesh["cp"].get_group(), cfg.parallel.cp_attention
    )
