"""Every data-parallel strategy trains exactly like one process with the same global batch.

Real processes on gloo. Each run trains the tiny model for 20 steps; rank 0 logs the loss of every
step (averaged over ranks) and the final checkpoint is loaded into a single-process model, which
also checks resharding N ranks -> 1. Tolerances: see training.py (fp32: relative 1e-5).
"""

from __future__ import annotations

import json

import pytest

from clusterlm.parallel.data_parallel import expert_units, fsdp_units
from clusterlm import checkpoint

from .training import BASE, MICRO, STEPS, assert_equivalent, run

CASES = [
    ("ddp", 2, {}), ("zero1", 2, {}), ("zero2", 2, {}), ("zero3", 2, {}),
    ("hsdp", 2, {"parallel__dp_replicate": 2}),
    ("ddp", 4, {}), ("zero1", 4, {}), ("zero2", 4, {}), ("zero3", 4, {}),
    ("hsdp", 4, {"parallel__dp_replicate": 2}),
]


@pytest.mark.parametrize("strategy,world_size,extra", CASES, ids=[f"{s}-{n}" for s, n, _ in CASES])
def test_strategy_equals_single_process(strategy, world_size, extra, data_dir, reference, tmp_path):
    candidate = run(data_dir, tmp_path, world_size, parallel__data_parallel=strategy,
                    training__micro_batch_size=MICRO, **extra)
    assert_equivalent(reference(MICRO * world_size), candidate)


@pytest.mark.parametrize("strategy,world_size,extra", [
    ("ddp", 2, {}), ("zero2", 2, {}), ("zero3", 2, {"parallel__bucket_mb": 0.01}),
    ("hsdp", 4, {"parallel__dp_replicate": 2}),
])
def test_gradient_accumulation_equals_one_big_step(strategy, world_size, extra, data_dir, reference, tmp_path):
    """4 micro-steps on N ranks == 1 step on 1 rank with the 4N x batch: ddp all-reduces once,
    FSDP reduce-scatters every micro-step and hsdp all-reduces across replicas once; the FSDP
    units that keep their weights gathered (zero2's, zero3's root and last unit) keep them from
    one micro-step to the next, and the optimizer still steps the updated shards."""
    tokens = MICRO * 4 * world_size * BASE["model.block_size"]
    candidate = run(data_dir, tmp_path, world_size, parallel__data_parallel=strategy,
                    training__micro_batch_size=MICRO, training__tokens_per_step=tokens, **extra)
    assert_equivalent(reference(MICRO * 4 * world_size), candidate)


def test_resume_across_world_sizes_and_strategies(data_dir, reference, tmp_path):
    """4 ranks zero3 -> 2 ranks ddp -> 1 process -> 4 ranks zero1, 5 steps each, equal to 20 steps
    in one process; the loader's position carries over, so every step reads the samples the
    uninterrupted run reads (equal losses), and the counter ends at 20 global batches."""
    phases = [(4, "zero3", 1), (2, "ddp", 2), (1, "ddp", 4), (4, "zero1", 1)]
    for i, (world_size, strategy, micro) in enumerate(phases):
        losses, result = run(
            data_dir, tmp_path, world_size, parallel__data_parallel=strategy,
            training__micro_batch_size=micro, training__steps=5 * (i + 1), optim__decay_steps=STEPS,
            checkpoint__resume="auto",
        )
        state = checkpoint.resolve_resume("auto", tmp_path / "checkpoints").state
        assert state["loader"]["samples_consumed"] == 5 * (i + 1) * 4
    reference_losses, ref = reference(4)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    for name, tensor in ref["weights"].items():
        if not name.endswith("attn.wk.bias"):
            assert (result["weights"][name] - tensor).norm() <= 1e-5 * tensor.norm(), name


@pytest.mark.parametrize("algorithm", ["ring", "hierarchical"])
def test_ddp_with_our_all_reduce_equals_single_process(algorithm, data_dir, reference, tmp_path):
    candidate = run(data_dir, tmp_path, 4, parallel__data_parallel="ddp", training__micro_batch_size=MICRO,
                    comm__allreduce=algorithm)
    assert_equivalent(reference(MICRO * 4), candidate)


def test_compressed_gradients_still_train(data_dir, reference, tmp_path):
    """fp16 casting is near-exact; PowerSGD rank 2 trails by a bounded margin after 20 steps. The
    metrics report the bytes the gradient hooks sent and their compression ratio."""
    ref_losses, _ = reference(MICRO * 2)
    for compression, margin, ratio in (("fp16", 1e-3, 2.0), ("powersgd", 0.05, 4.0)):
        losses, _ = run(data_dir, tmp_path / compression, 2, parallel__data_parallel="ddp",
                        training__micro_batch_size=MICRO, comm__compression=compression, comm__powersgd_rank=2)
        assert losses[STEPS] < 0.9 * losses[1]
        assert losses[STEPS] == pytest.approx(ref_losses[STEPS], rel=margin), compression
        records = map(json.loads, (tmp_path / compression / "metrics.jsonl").read_text().splitlines())
        last = [r for r in records if r["kind"] == "train"][-1]
        assert last["comm_bytes_sent"] > 0 and last["comm_compression_ratio"] >= ratio, (compression, last)


def test_bf16_mixed_precision_matches_within_its_precision(data_dir, tmp_path):
    """bf16 compute, fp32 master weights and fp32 reduction: zero3 on 2 ranks vs one process in
    bf16. Tolerance: 1e-2 relative on every step's loss (bf16 keeps 8 bits of mantissa, so
    single operations differ by up to 2^-8 ~ 4e-3 between the two reduction orders)."""
    bf16 = {"training__precision": "bf16"}
    ref_losses, _ = run(data_dir, tmp_path / "one", 1, training__micro_batch_size=MICRO * 2, **bf16)
    losses, _ = run(data_dir, tmp_path / "zero3", 2, parallel__data_parallel="zero3",
                    training__micro_batch_size=MICRO, **bf16)
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-2), step


def test_zero3_with_cpu_offload_equals_single_process(data_dir, reference, tmp_path):
    candidate = run(data_dir, tmp_path, 2, parallel__data_parallel="zero3", parallel__cpu_offload=True,
                    training__micro_batch_size=MICRO)
    assert_equivalent(reference(MICRO * 2), candidate)


def test_fsdp_units_group_consecutive_blocks_up_to_the_bucket_size():
    """Blocks of 7 bytes with a 25-byte bucket form units of 4; blocks at least that size are
    units of their own; a model under the bucket is the root unit alone."""
    assert fsdp_units([7] * 12, 84, 25) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert fsdp_units([30] * 3, 90, 25) == [[0], [1], [2]]
    assert fsdp_units([7] * 3, 21, 25) == []


def test_expert_units_follow_the_blocks_rule_or_form_one_unit():
    """The routed experts' units group blocks by the blocks' rule over the ranks that share them;
    experts under the bucket in all, or held by one rank (nothing to shard or reduce), form one
    unit of all the MoE blocks rather than the root's."""
    assert expert_units([30] * 3, 2, 25) == [[0], [1], [2]]
    assert expert_units([7] * 6, 2, 25) == [[0, 1, 2, 3], [4, 5]]
    assert expert_units([7] * 3, 2, 25) == [[0, 1, 2]]
    assert expert_units([30] * 3, 1, 25) == [[0, 1, 2]]
