"""SyncBatchNorm on 2 and 3 gloo processes equals nn.BatchNorm on the concatenated global batch.

Convention: each rank's loss is ``(output * probe).sum()`` over its own slice of one global probe,
so the global loss is the sum of the ranks' losses. Then every rank's input gradient must equal
the single-process input gradient of its slice, and the *sum over ranks* of the local
weight/bias gradients must equal the single-process weight/bias gradient.

Tolerances (fp32): outputs, gradients and running statistics to 1e-5 relative with a 1e-5
absolute floor (values are O(1)); they differ from the reference only in summation order. bf16
inputs: running statistics as fp32 (they are computed in fp32 from the same bf16 values), outputs
and input gradients to bf16 precision (2e-2). DDP training: per-step losses and final parameters
and buffers to 1e-5 relative, 1e-6 absolute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clusterlm.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

from .helpers import run_distributed

STEPS = 3
FP32 = {"rtol": 1e-5, "atol": 1e-5}
BF16 = {"rtol": 2e-2, "atol": 2e-2}


@dataclass(frozen=True)
class Case:
    name: str
    norm: type[nn.modules.batchnorm._BatchNorm]
    channels: int
    spatial: tuple[int, ...]
    batch_sizes: tuple[int, ...]  # per rank; uneven on purpose
    options: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32


CASES = {
    2: [
        Case("2d_input_rank_batch_of_1", nn.BatchNorm1d, 5, (), (1, 6)),
        Case("4d_input", nn.BatchNorm2d, 3, (4, 5), (3, 1)),
        Case("3d_input_cumulative_average", nn.BatchNorm1d, 4, (7,), (2, 5), {"momentum": None}),
        Case("5d_input_empty_rank", nn.BatchNorm3d, 2, (3, 2, 2), (0, 4)),
        Case("no_affine_no_running_stats", nn.BatchNorm2d, 3, (3, 3), (2, 3), {"affine": False, "track_running_stats": False}),
        Case("bf16_input", nn.BatchNorm2d, 3, (4, 4), (2, 3), dtype=torch.bfloat16),
    ],
    3: [
        Case("2d_input_rank_batch_of_1", nn.BatchNorm1d, 6, (), (1, 4, 2)),
        Case("4d_input_no_bias", nn.BatchNorm2d, 3, (3, 4), (2, 1, 3), {"bias": False}),
        Case("3d_input_empty_rank_cumulative_average", nn.BatchNorm1d, 4, (5,), (0, 3, 2), {"momentum": None}),
    ],
}


def _global_batch(case: Case, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, probe) of the whole global batch; a non-zero mean and scale per channel."""
    gen = torch.Generator().manual_seed(1000 * index + step)
    shape = (sum(case.batch_sizes), case.channels, *case.spatial)
    per_channel = (1, case.channels) + (1,) * len(case.spatial)
    scale = torch.rand(per_channel, generator=gen) + 0.5
    shift = torch.randn(per_channel, generator=gen) * 3
    x = (torch.randn(shape, generator=gen) * scale + shift).to(case.dtype)
    return x, torch.randn(shape, generator=gen)


def _run_case(
    case: Case,
    index: int,
    make_norm: Callable[..., nn.Module],
    rank_slice: slice | None,
    eval_guard: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> dict[str, Any]:
    """Train-mode steps then an eval step; ``rank_slice`` None means the whole global batch."""
    torch.manual_seed(index)
    norm = make_norm(case.channels, **case.options)
    if norm.weight is not None:  # non-trivial affine parameters
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            if norm.bias is not None:
                norm.bias.uniform_(-1, 1)
    steps = []
    for step in range(STEPS):
        x, probe = _global_batch(case, index, step)
        if rank_slice is not None:
            x, probe = x[rank_slice], probe[rank_slice]
        x.requires_grad_(True)
        norm.zero_grad()
        out = norm(x)
        (out.float() * probe).sum().backward()
        steps.append({
            "out": out.detach().float(),
            "grad_input": x.grad.float(),
            "grad_weight": None if norm.weight is None else norm.weight.grad.clone(),
            "grad_bias": None if norm.bias is None else norm.bias.grad.clone(),
        })
    norm.eval()
    x_eval, _ = _global_batch(case, index, STEPS)
    if rank_slice is not None:
        x_eval = x_eval[rank_slice]
    with eval_guard():
        eval_out = norm(x_eval).detach().float()
    return {"steps": steps, "eval_out": eval_out, "buffers": dict(norm.named_buffers())}


def _rank_slice(batch_sizes: tuple[int, ...], rank: int) -> slice:
    start = sum(batch_sizes[:rank])
    return slice(start, start + batch_sizes[rank])


@contextmanager
def _no_communication() -> Iterator[None]:
    """Make every all_reduce call fail, to prove that eval mode does not communicate."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("eval mode must not communicate")

    original, dist.all_reduce = dist.all_reduce, refuse
    try:
        yield
    finally:
        dist.all_reduce = original


def _sync_batchnorm_cases(rank: int, world_size: int) -> dict[str, Any]:
    results = {
        case.name: _run_case(case, index, SyncBatchNorm, _rank_slice(case.batch_sizes, rank), _no_communication)
        for index, case in enumerate(CASES[world_size])
    }
    if world_size == 3:
        results["subgroups"] = _subgroups(rank)
    return results


def _subgroups(rank: int) -> dict[str, torch.Tensor]:
    """Ranks 0 and 1 synchronize with each other; rank 2 is alone in its group (no sync)."""
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])
    norm = SyncBatchNorm(3, process_group=pair if rank < 2 else alone)
    x = torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(5))
    out = norm(x[3 * rank : 3 * rank + 3])
    return {"out": out.detach(), "running_var": norm.running_var.clone()}


def _assert_matches_reference(world_size: int, per_rank: list[dict[str, Any]]) -> None:
    for index, case in enumerate(CASES[world_size]):
        reference = _run_case(case, index, case.norm, None)
        tolerance = BF16 if case.dtype == torch.bfloat16 else FP32
        for step, expected in enumerate(reference["steps"]):
            for rank, results in enumerate(per_rank):
                actual, where = results[case.name]["steps"][step], _rank_slice(case.batch_sizes, rank)
                context = f"{case.name} step {step} rank {rank}"
                torch.testing.assert_close(actual["out"], expected["out"][where], **tolerance, msg=lambda m, c=context: f"{c} output: {m}")
                torch.testing.assert_close(actual["grad_input"], expected["grad_input"][where], **tolerance, msg=lambda m, c=context: f"{c} grad_input: {m}")
            for name in ("grad_weight", "grad_bias"):
                if expected[name] is None:
                    assert all(r[case.name]["steps"][step][name] is None for r in per_rank)
                    continue
                summed = sum(r[case.name]["steps"][step][name] for r in per_rank)
                torch.testing.assert_close(summed, expected[name], **tolerance, msg=lambda m, c=f"{case.name} step {step} {name}": f"{c}: {m}")
        for rank, results in enumerate(per_rank):
            actual = results[case.name]
            for name, buffer in reference["buffers"].items():
                torch.testing.assert_close(actual["buffers"][name], buffer, **FP32, msg=lambda m, c=f"{case.name} rank {rank} {name}": f"{c}: {m}")
            where = _rank_slice(case.batch_sizes, rank)
            expected_eval = reference["eval_out"][where]
            if not case.options.get("track_running_stats", True):
                # No running statistics: eval normalizes each rank's batch by its own statistics
                # (no communication), as nn.SyncBatchNorm does. This case has no affine parameters.
                x_eval, _ = _global_batch(case, index, STEPS)
                expected_eval = case.norm(case.channels, **case.options).eval()(x_eval[where])
            torch.testing.assert_close(actual["eval_out"], expected_eval, **tolerance)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_batchnorm_matches_batchnorm_on_the_global_batch(world_size: int) -> None:
    per_rank = run_distributed(_sync_batchnorm_cases, world_size, timeout=60)
    _assert_matches_reference(world_size, per_rank)
    if world_size == 3:
        x = torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(5))
        pair, alone = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        expected = [*pair(x[:6]).split(3), alone(x[6:])]
        for rank, results in enumerate(per_rank):
            torch.testing.assert_close(results["subgroups"]["out"], expected[rank].detach(), **FP32)
        torch.testing.assert_close(per_rank[0]["subgroups"]["running_var"], pair.running_var, **FP32)
        torch.testing.assert_close(per_rank[2]["subgroups"]["running_var"], alone.running_var, **FP32)


# --- DDP: a converted model trains like nn.BatchNorm on the full batch in one process ---------

DDP_STEPS, GLOBAL_BATCH = 5, 8


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2),
    )  # fmt: skip


def _train(model: nn.Module, rank: int, world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """SGD with momentum on a regression task; each rank takes its equal share of the batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    share = GLOBAL_BATCH // world_size
    losses = []
    for step in range(DDP_STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=gen) * 2 + 1
        target = torch.randn(GLOBAL_BATCH, 2, generator=gen)
        mine = slice(rank * share, (rank + 1) * share)
        loss = nn.functional.mse_loss(model(x[mine]), target[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        global_loss = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _ddp_with_sync_batchnorm(rank: int, world_size: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = DistributedDataParallel(convert_sync_batchnorm(_make_model()))
    return _train(model, rank, world_size)


def test_ddp_with_converted_model_matches_single_process_batchnorm() -> None:
    expected_losses, expected_state = _train(_make_model(), rank=0, world_size=1)
    for losses, state in run_distributed(_ddp_with_sync_batchnorm, 2, timeout=60):
        torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
        assert state.keys() == expected_state.keys()
        for name, value in expected_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
