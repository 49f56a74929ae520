"""The communication layer on CUDA tensors over NCCL.

NCCL refuses two ranks on one GPU, so with one device these run at world size 1: they catch what
only CUDA tensors expose (a buffer made on the wrong device, a future that does not know the
stream), while the multi-rank numerics are covered on gloo. With two or more GPUs they also run
on 2 ranks. Tolerance: 1e-5 absolute on parameters, as in the gloo hook tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from clusterlm.comm import ALGORITHMS, COMPRESSIONS, all_reduce, register_comm_hook

from .helpers import run_distributed
from .test_comm_hooks import _train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

COMPRESSION_OPTIONS = {"powersgd": {"rank": 2}, "topk": {"ratio": 0.1}}


def _on_cuda(rank: int, world_size: int) -> dict[str, float]:
    """Max difference from the library (all-reduce) or from plain DDP (training), per case."""
    differences = {}
    for algorithm in ALGORITHMS:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(1001, device="cuda", generator=torch.Generator("cuda").manual_seed(rank)).to(dtype)
            expected, ours = x.clone(), x.clone()
            dist.all_reduce(expected)
            all_reduce(ours, "sum", algorithm)
            differences[f"{algorithm} {dtype}"] = (ours.float() - expected.float()).abs().max().item()
    _, reference = _train(rank, 10, device="cuda")
    for algorithm in ALGORITHMS:
        _, params = _train(rank, 10, lambda ddp, a=algorithm: register_comm_hook(ddp, a), device="cuda")
        differences[f"ddp {algorithm}"] = max((p - r).abs().max().item() for p, r in zip(params, reference))
    for compression in COMPRESSIONS:
        def setup(ddp, c=compression, o=COMPRESSION_OPTIONS.get(compression, {})):
            register_comm_hook(ddp, "ring", c, compression_options=o)

        _, params = _train(rank, 10, setup, device="cuda")
        differences[f"ddp ring {compression} finite"] = 0.0 if all(p.isfinite().all() for p in params) else 1.0
    return differences


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_algorithm_and_compression_runs_on_cuda_tensors(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"NCCL needs one GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPUs")
    for differences in run_distributed(_on_cuda, world_size, backend="nccl", timeout=240):
        tolerances = {name: (2e-2 if "float16" in name else 1e-5) for name in differences}
        bad = {name: d for name, d in differences.items() if not d <= tolerances[name]}
        assert not bad, bad
