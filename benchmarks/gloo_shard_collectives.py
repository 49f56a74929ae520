"""Gloo's all-reduce, all-gather and reduce-scatter of one tensor among local processes, by size
(benchmarks/moe-experts-ep4-cpu-xeon-2026-12-07.md): what FSDP's collectives cost on a CPU
beside the all-reduce sweep the planner's local link is fitted on.

``python benchmarks/gloo_shard_collectives.py PROCESSES``

Each size's collective is run twice untimed, then 5 times between barriers, one thread per
process; rank 0's mean per call is printed, with the payload (the whole tensor) over it.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from clusterlm.distributed.local_spawn import run_local

SIZES = [1 << 20, 4 << 20, 16 << 20, 28 << 20]


def _call(name: str, full: torch.Tensor, shard: torch.Tensor) -> None:
    if name == "all_reduce":
        dist.all_reduce(full)
    elif name == "all_gather":
        dist.all_gather_into_tensor(full, shard)
    else:
        dist.reduce_scatter_tensor(shard, full)


def _rank(rank: int, world: int, sizes: list[int]) -> dict[tuple[str, int], float]:
    torch.set_num_threads(1)
    seconds = {}
    for nbytes in sizes:
        n = nbytes // 4 // world * world
        full, shard = torch.randn(n), torch.randn(n // world)
        for name in ("all_reduce", "all_gather", "reduce_scatter"):
            for _ in range(2):
                _call(name, full, shard)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(5):
                _call(name, full, shard)
            dist.barrier()
            seconds[(name, nbytes)] = (time.perf_counter() - start) / 5
    return seconds


if __name__ == "__main__":
    measured = run_local(_rank, int(sys.argv[1]), SIZES, timeout=600)[0]
    for (name, nbytes), s in sorted(measured.items()):
        rate = nbytes / s / 1e9
        print(f"{name:15s} {nbytes / 2**20:5.0f} MiB {s * 1e3:8.2f} ms  {rate:6.2f} GB/s")
