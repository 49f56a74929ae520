"""Data-parallel training of a batch-norm classifier on CPU that matches one process exactly.

Batch norm normalizes with the statistics of its batch, so plain data parallelism changes the
model: each rank would normalize with the statistics of its own slice only. Converting the
``nn.BatchNorm1d`` layers with ``convert_sync_batchnorm`` makes every rank normalize with the
statistics of the global batch, so N processes train like one process on the whole batch.
(PyTorch's ``nn.SyncBatchNorm`` refuses CPU tensors; clusterlm's runs over gloo.)

    python examples/sync_batchnorm.py                         # one process
    torchrun --nproc-per-node 2 examples/sync_batchnorm.py    # two processes, same losses
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from clusterlm.parallel.sync_batchnorm import convert_sync_batchnorm

N_FEATURES, N_CLASSES, HIDDEN = 8, 4, 32
STEPS, GLOBAL_BATCH, SEED, LR = 100, 64, 0, 0.05
EVAL_STREAM = 1  # random streams: 0 draws cluster centres, 1 held-out points, 2 + step training


class Classifier(nn.Module):
    """An MLP, (Linear -> BatchNorm1d -> ReLU) twice then a linear head; no distribution in it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(N_FEATURES, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(HIDDEN, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def make_batch(size: int, seed: int, stream: int) -> tuple[Tensor, Tensor]:
    """``size`` labelled points, one Gaussian cluster per class; a function of (seed, stream)."""
    base = 1_000_003 * seed  # stream s of this seed draws from the generator seeded base + s
    centres = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(base))
    gen = torch.Generator().manual_seed(base + stream)
    labels = torch.randint(N_CLASSES, (size,), generator=gen)
    points = centres[labels] + 0.7 * torch.randn(size, N_FEATURES, generator=gen)
    # An offset and uneven feature scales: the kind of input batch norm is there to tame.
    return 3.0 + points * torch.logspace(-1, 1, N_FEATURES), labels


def train(
    steps: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
    *, sync_batchnorm: bool = True,
) -> tuple[list[float], dict[str, Tensor]]:  # fmt: skip
    """SGD on ``global_batch`` points a step, each rank taking its contiguous equal slice.

    Returns each step's loss (the mean over the global batch) and the final ``state_dict``, the
    same on every rank. With ``world_size > 1`` the default process group must exist.
    ``sync_batchnorm=False`` keeps plain batch norm, only to show that the result then changes.
    """
    if global_batch % world_size:
        raise ValueError(f"global_batch {global_batch} does not split over {world_size} ranks")
    torch.manual_seed(seed)  # identical initial weights on every rank
    model: nn.Module = Classifier()
    if world_size > 1:
        if sync_batchnorm:
            model = convert_sync_batchnorm(model)  # applied from outside: the model stays plain
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    share = global_batch // world_size
    mine = slice(rank * share, (rank + 1) * share)
    losses = []
    for step in range(steps):
        # Every rank draws the same global batch, so the data is a function of (seed, step).
        x, y = make_batch(global_batch, seed, stream=2 + step)
        loss = nn.functional.cross_entropy(model(x[mine]), y[mine])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(_global_mean(loss.detach(), world_size))
    module = model.module if isinstance(model, DistributedDataParallel) else model
    return losses, {name: value.detach().clone() for name, value in module.state_dict().items()}


def _global_mean(loss: Tensor, world_size: int) -> float:
    """Equal slices, so the mean of the ranks' mean losses is the mean over the global batch."""
    if world_size > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world_size
    return loss.item()


def accuracy(state_dict: dict[str, Tensor], seed: int, size: int = 1024) -> float:
    """Accuracy on held-out points, in eval mode (running statistics: no batch dependence)."""
    model = Classifier()
    model.load_state_dict(state_dict)  # a converted model's state_dict has the same keys
    x, y = make_batch(size, seed, EVAL_STREAM)
    with torch.no_grad():
        return (model.eval()(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without it, one process.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    try:
        losses, state_dict = train(STEPS, GLOBAL_BATCH, rank, world_size, SEED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"{world_size} process(es), global batch {GLOBAL_BATCH}")
        for step in [*range(0, STEPS, 10), STEPS - 1]:
            print(f"step {step:4d}  loss {losses[step]:.6f}")
        print(f"held-out accuracy {accuracy(state_dict, SEED):.3f} (chance {1 / N_CLASSES:.2f})")


if __name__ == "__main__":
    main()
