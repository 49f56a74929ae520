"""Where this process runs: its device, its rank and its place among the data-parallel ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from clusterlm.config import Config
from clusterlm.errors import UserError
from clusterlm.train.hardware import resolve_device


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: Config) -> Runtime:
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        raise UserError(
            f"launched with WORLD_SIZE={world_size}, but this build trains in one process; "
            "run `clusterlm train` without torchrun"
        )
    return Runtime(device=resolve_device(cfg.training.device))
