"""How long one MoE block's token exchanges take on gloo, three ways
(benchmarks/moe-ep4-overhead-cpu-epyc-zen5-2026-12-07.md).

``python benchmarks/ep_dispatch_probe.py ROWS PROCESSES``

Each of PROCESSES local processes holds ROWS rows of width 128 (fp32, one thread) and does, per
block, the exchanges of one way of sending tokens to their experts, each followed by four
192 x 192 matrix multiplies standing in for the work between them:

- ``all_to_all``: the trainer's; an all-to-all of the counts, then dispatch and combine forward
  and their gradients backward, each an all-to-all of the rows split evenly;
- ``padded_full``, ``padded_2x``: no counts, every rank sending a fixed number of rows to each
  other (all its rows: dropless whatever the routing; twice an even share: a capacity factor of 2);
- ``all_gather``: Megatron-LM's all-gather dispatcher; every rank gathers all the rows and
  reduce-scatters the experts' outputs, the reverse in backward.

Prints milliseconds per block on rank 0, the mean of 40 blocks after 5 of warm-up, each way timed
twice in turn.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH, PORT = 128, "29611"


def _ways(rows: int, world: int) -> dict[str, Callable[[], None]]:
    x, a = torch.randn(rows, WIDTH), torch.randn(192, 192)

    def work() -> None:
        for _ in range(4):
            a @ a

    def exchanges(send: Callable[[], None]) -> None:
        for _ in range(4):  # dispatch, combine; their gradients
            send()
            work()

    def all_to_all() -> None:
        counts = torch.ones(world, dtype=torch.long)
        dist.all_to_all_single(torch.empty_like(counts), counts)
        even = [rows // world] * world
        exchanges(lambda: dist.all_to_all_single(torch.empty_like(x), x, even, even))

    def padded(per_rank: int) -> Callable[[], None]:
        slots = torch.randn(world * per_rank, WIDTH)
        return lambda: exchanges(lambda: dist.all_to_all_single(torch.empty_like(slots), slots))

    def all_gather() -> None:
        gathered = torch.empty(world * rows, WIDTH)
        for step in range(4):
            if step % 2 == 0:
                dist.all_gather_into_tensor(gathered, x)
            else:
                dist.reduce_scatter_tensor(torch.empty_like(x), gathered)
            work()

    return {
        "all_to_all": all_to_all,
        "padded_full": padded(rows),
        "padded_2x": padded(2 * rows // world),
        "all_gather": all_gather,
    }


def _run(rank: int, world: int, rows: int, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    timed: dict[str, float] = {}
    ways = _ways(rows, world)
    for name, way in list(ways.items()) * 2:
        for _ in range(5):
            way()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(40):
            way()
        timed[name] = (time.perf_counter() - start) / 40 * 1e3
    if rank == 0:
        results.put(timed)
    dist.destroy_process_group()


if __name__ == "__main__":
    rows, world = int(sys.argv[1]), int(sys.argv[2])
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_run, args=(r, world, rows, results)) for r in range(world)]
    for worker in workers:
        worker.start()
    timed = results.get(timeout=600)
    for worker in workers:
        worker.join()
    figures = ", ".join(f"{name} {ms:.1f} ms" for name, ms in timed.items())
    print(f"{world} processes, {rows} rows: {figures}")
