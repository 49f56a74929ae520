"""Expert parallelism trains exactly as one process.

Real processes on gloo (timeouts in ``training.train_run``), against the single-process reference
of ``test_moe_training`` (one process accumulating the micro-batches the data-parallel ranks
hold): every step's loss and the validation losses at 1e-5, the weights as in
``training.assert_equivalent``, the aux-free routing biases exactly. The final weights are read
from the run's checkpoint by one process, so every case also loads a checkpoint saved with the
experts split over ep ranks into a model holding them all (ep1).
"""

from __future__ import annotations

import pytest
import torch

from .helpers import run_distributed
from .test_moe_training import AUX_FREE, reference, split_biases
from .training import MICRO, STEPS, assert_equivalent, run

EP_CASES = [
    ("ep2", 2, 2, {"parallel__ep": 2, "parallel__data_parallel": "zero2"}),
    ("ep4", 4, 4, {"parallel__ep": 4, "parallel__data_parallel": "zero2"}),
    ("ep2xzero3", 4, 4, {"parallel__ep": 2, "parallel__data_parallel": "zero3", "parallel__bucket_mb": 0.01}),
    ("ep2xtp2", 4, 2, {"parallel__ep": 2, "parallel__tp": 2, "parallel__data_parallel": "zero2"}),
    ("ep2xhsdp", 4, 4, {"parallel__ep": 2, "parallel__data_parallel": "hsdp", "parallel__dp_replicate": 2}),
    ("ep2xzero3-ac", 2, 2, {"parallel__ep": 2, "parallel__data_parallel": "zero3", "training__activation_checkpointing": "full"}),
    ("pp2", 2, 1, {"parallel__pp": 2, "parallel__pp_microbatches": 2}),
    ("pp2xep2", 4, 2, {"parallel__pp": 2, "parallel__pp_microbatches": 2, "parallel__ep": 2, "parallel__data_parallel": "zero2"}),
]


@pytest.mark.parametrize("name,world_size,dp,settings", EP_CASES, ids=[c[0] for c in EP_CASES])
def test_expert_parallel_equals_single_process(name, world_size, dp, settings, data_dir, tmp_path_factory, tmp_path):
    candidate = run(data_dir, tmp_path, world_size, training__micro_batch_size=MICRO, **AUX_FREE, **settings)
    expected, expected_biases = split_biases(reference(data_dir, tmp_path_factory, dp, AUX_FREE))
    got, biases = split_biases(candidate)
    assert_equivalent(expected, got)
    assert biases.keys() == expected_biases.keys()
    for key, bias in expected_biases.items():
        torch.testing.assert_close(biases[key], bias, rtol=0, atol=1e-6, msg=key)
    assert any(bias.abs().sum() > 0 for bias in biases.values())


def _dispatch_rank(rank: int, world_size: int) -> None:
    """Rank ``rank``'s tokens through experts split over all ranks, against the whole experts on
    every rank's tokens: outputs, the tokens' gradients and each rank's share of the weights'; the
    work given to run alongside comes back with its gradient."""
    import copy
    import weakref

    from clusterlm.distributed.mesh import build_mesh
    from clusterlm.models.moe import GroupedExperts
    from clusterlm.parallel.expert_parallel import apply_expert_parallel

    torch.manual_seed(0)
    experts, local = 8, 8 // world_size
    whole = GroupedExperts(6, 10, experts)
    for weight in whole.parameters():
        torch.nn.init.normal_(weight, std=0.3)
    split = copy.deepcopy(whole)
    # Every rank's tokens, sorted by expert; some experts get none.
    batches = []
    for _ in range(world_size):
        counts = torch.randint(0, 4, (experts,))
        batches.append((torch.randn(int(counts.sum()), 6, requires_grad=True), counts))
    probes = [torch.randn(int(c.sum()), 6) for _, c in batches]
    expected = [whole(tokens, counts)[0] for tokens, counts in batches]
    sum((out * probe).sum() for out, probe in zip(expected, probes, strict=True)).backward()

    mesh = build_mesh(torch.device("cpu"), pp=1, replicate=1, shard=world_size, tp=1)
    apply_expert_parallel(split, mesh, world_size)
    tokens, counts = batches[rank][0].detach().clone().requires_grad_(), batches[rank][1]
    beside = torch.randn(3, requires_grad=True)  # work run while the tokens travel
    out, alongside = split(tokens, counts, lambda: beside * 2)
    (out * probes[rank]).sum().backward()
    alongside.sum().backward()
    torch.testing.assert_close(beside.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(out, expected[rank].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens.grad, batches[rank][0].grad, rtol=1e-5, atol=1e-6)
    for name, weight in split.named_parameters():
        mine = getattr(whole, name).grad[rank * local : (rank + 1) * local]
        torch.testing.assert_close(weight.grad.to_local(), mine, rtol=1e-5, atol=1e-6, msg=name)
    # Nothing of the exchanges outlives the step (no reference cycle through autograd's graph).
    arrived = weakref.ref(out)
    del out
    assert arrived() is None


@pytest.mark.parametrize("world_size", [2, 4])
def test_dispatch_and_combine_match_the_whole_experts_forward_and_backward(world_size):
    run_distributed(_dispatch_rank, world_size, timeout=120)


def test_resume_across_expert_parallel_degrees(data_dir, tmp_path_factory, tmp_path):
    """ep4 on 4 ranks -> ep2 x zero3 on 2 ranks -> one process, through checkpoints (weights,
    optimizer state and routing biases resharded across ep), equal to the uninterrupted run."""
    phases = [(4, "zero2", 4, MICRO, 7), (2, "zero3", 2, 2 * MICRO, 14), (1, "ddp", 1, 4 * MICRO, STEPS)]
    for world_size, strategy, ep, micro, steps in phases:
        losses, result = run(
            data_dir, tmp_path, world_size, parallel__data_parallel=strategy, parallel__ep=ep,
            training__micro_batch_size=micro, training__steps=steps, optim__decay_steps=STEPS,
            checkpoint__resume="auto", **AUX_FREE,
        )
    expected, expected_biases = split_biases(reference(data_dir, tmp_path_factory, 4, AUX_FREE))
    got, biases = split_biases((losses, result))
    assert got[0] == pytest.approx(expected[0], rel=1e-5)
    for name, tensor in expected[1]["weights"].items():
        if not name.endswith("attn.wk.bias"):
            assert (got[1]["weights"][name] - tensor).norm() <= 2e-5 * tensor.norm(), name
    for key, bias in expected_biases.items():
        torch.testing.assert_close(biases[key], bias, rtol=0, atol=1e-6, msg=key)
