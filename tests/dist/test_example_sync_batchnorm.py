"""examples/sync_batchnorm.py trains on 2 and 4 gloo processes exactly as on one process.

The N-process runs (SyncBatchNorm + DDP, each rank on its slice of the global batch) are compared
with a one-process run with plain nn.BatchNorm1d on the whole global batch. Tolerance (fp32):
per-step losses and final parameters and running statistics to rtol 1e-5, atol 1e-6 (the runs
differ only in summation order); num_batches_tracked exactly. A control run with plain batch norm
on 2 processes must differ by over 100 times the tolerance: the comparison sees the synchronization.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from .helpers import run_distributed

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sync_batchnorm.py"
STEPS, GLOBAL_BATCH, SEED = 30, 64, 0
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _load_example() -> ModuleType:
    # examples/ is not a package: load the file by path (also in each spawned worker, which
    # imports this test module to find _train_on_ranks).
    spec = importlib.util.spec_from_file_location("example_sync_batchnorm", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def _train_on_ranks(rank: int, world_size: int, steps: int, sync_batchnorm: bool) -> Any:
    return example.train(steps, GLOBAL_BATCH, rank, world_size, SEED, sync_batchnorm=sync_batchnorm)


@cache
def _one_process() -> tuple[list[float], dict[str, torch.Tensor]]:
    return example.train(STEPS, GLOBAL_BATCH, 0, 1, SEED)


@pytest.mark.timeout(60)
def test_one_process_run_learns() -> None:
    losses, state_dict = _one_process()
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert example.accuracy(state_dict, SEED) > 0.7  # chance is 1 / 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sync_batchnorm_matches_one_process(world_size: int) -> None:
    expected_losses, expected_state = _one_process()
    per_rank = run_distributed(_train_on_ranks, world_size, STEPS, True, timeout=45)
    for rank, (losses, state_dict) in enumerate(per_rank):
        _assert_close(losses, expected_losses, f"rank {rank} losses")
        assert state_dict.keys() == expected_state.keys()
        for name, value in expected_state.items():
            _assert_close(state_dict[name], value, f"rank {rank} {name}")


def _assert_close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(60)
def test_plain_batchnorm_on_two_processes_differs() -> None:
    steps = 5  # enough for the losses to part by far more than the tolerance
    expected = torch.tensor(_one_process()[0][:steps])
    losses, _ = run_distributed(_train_on_ranks, 2, steps, False, timeout=45)[0]
    relative = ((torch.tensor(losses) - expected).abs() / expected.abs()).max().item()
    assert relative > 100 * TOLERANCE["rtol"], relative
