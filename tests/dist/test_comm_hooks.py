"""DDP with our communication hooks trains like plain DDP; compression converges.

Tolerances: with uncompressed hooks the parameters after 10 SGD steps match plain DDP to
1e-5 (absolute, parameters are O(0.1-1)): only the summation order of float32 gradients differs.
Compressed hooks must reach a loss within 10% of the uncompressed run after 40 steps, and our
PowerSGD within 2% of torch's powerSGD_hook with the same rank (different random starts, so not
equal).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_powersgd
from torch.nn.parallel import DistributedDataParallel

from clusterlm.comm import ALGORITHMS, register_comm_hook
from clusterlm.comm.compression import make_compressor

from .helpers import run_distributed

HOOK_OPTIONS = {"ring": {"chunk_bytes": 256}, "hierarchical": {"local_size": 2}, "parameter_server": {"num_servers": 2}}


def _train(rank: int, steps: int, setup=None, device: str = "cpu") -> tuple[float, list[torch.Tensor]]:
    """SGD on a fixed regression task; each rank sees its own data. Returns (last loss, params)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
    # a tiny bucket cap gives several buckets, so bucket indices and rebuilds are exercised
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    if setup is not None:
        setup(ddp)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    target_map = torch.randn(16, 4, generator=torch.Generator().manual_seed(7)).to(device)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=data).to(device)
        loss = torch.nn.functional.mse_loss(ddp(x), torch.tanh(x @ target_map))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = loss.detach().clone()
    dist.all_reduce(final)
    return final.item() / dist.get_world_size(), [p.detach().clone() for p in model.parameters()]


def _algorithms_match_plain_ddp(rank: int, world_size: int) -> dict[str, float]:
    _, reference = _train(rank, 10)
    max_differences = {}
    for algorithm in ALGORITHMS:
        options = HOOK_OPTIONS.get(algorithm, {})
        _, params = _train(rank, 10, lambda ddp, a=algorithm, o=options: register_comm_hook(ddp, a, **o))
        max_differences[algorithm] = max((p - r).abs().max().item() for p, r in zip(params, reference, strict=True))
    return max_differences


def test_every_algorithm_trains_like_plain_ddp_on_2_and_4_ranks():
    for world_size in (2, 4):
        for differences in run_distributed(_algorithms_match_plain_ddp, world_size, timeout=120):
            assert all(d <= 1e-5 for d in differences.values()), (world_size, differences)


def _compressed_losses(rank: int, world_size: int) -> dict[str, tuple[float, float]]:
    """Final loss and compression ratio for each compression (reduced with the ring)."""
    steps = 40
    results = {"none": (_train(rank, steps)[0], 1.0)}
    hook_states = {}
    for compression, options in [("fp16", {}), ("bf16", {}), ("powersgd", {"rank": 2}), ("topk", {"ratio": 0.1})]:

        def setup(ddp, c=compression, o=options):
            hook_states[c] = register_comm_hook(ddp, "ring", c, compression_options=o)

        loss, _ = _train(rank, steps, setup)
        results[compression] = (loss, hook_states[compression].stats.compression_ratio)

    def torch_hook(ddp):
        state = torch_powersgd.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, torch_powersgd.powerSGD_hook)

    results["torch powerSGD_hook"] = (_train(rank, steps, torch_hook)[0], float("nan"))
    return results


def test_compression_converges_and_reports_its_ratio():
    results = run_distributed(_compressed_losses, 2, timeout=120)[0]
    uncompressed = results["none"][0]
    for name, (loss, _) in results.items():
        assert loss <= 1.1 * uncompressed, (name, results)
    assert abs(results["powersgd"][0] / results["torch powerSGD_hook"][0] - 1) < 0.02, results
    assert results["fp16"][1] == results["bf16"][1] == 2.0
    assert results["powersgd"][1] > 2.0
    assert 4.0 <= results["topk"][1] <= 5.0  # 10% of the entries, each a 4-byte value + 4-byte index


def _low_rank_average(rank: int, world_size: int) -> float:
    # Every rank's matrix lies in the same 2-D column space, so their sum has rank 2 and a
    # rank-2 PowerSGD average is exact (up to float32 rounding) from the first step.
    basis = torch.randn(24, 2, generator=torch.Generator().manual_seed(0))
    local = basis @ torch.randn(2, 10, generator=torch.Generator().manual_seed(1 + rank))
    bias = torch.randn(10, generator=torch.Generator().manual_seed(50 + rank))
    expected = torch.cat([local.reshape(-1), bias])
    dist.all_reduce(expected)
    expected /= world_size
    buffer = torch.cat([local.reshape(-1), bias])
    compressor = make_compressor("powersgd", "halving_doubling", compression_options={"rank": 2})
    compressor.reduce(buffer, [local.shape, bias.shape], key=0)
    return (buffer - expected).abs().max().item()


def test_powersgd_is_exact_when_the_gradient_sum_is_low_rank():
    assert max(run_distributed(_low_rank_average, 3)) < 1e-5
