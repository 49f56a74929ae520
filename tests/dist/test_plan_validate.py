"""What ``plan --validate`` measures in real 2-process layouts, against exact counts.

zero3 (FSDP2) shards every parameter on dim 0 into ``torch.chunk`` pieces, rank 0 holding the
larger ones; zero1 (``ZeroRedundancyOptimizer``) keeps all weights and gradients and each
parameter's AdamW state on one rank. Fused AdamW adds a 4-byte step counter per parameter tensor.
Activations split with the batch: each rank saves the planner's count for its micro-batch, within
0.1% (a few hundred bytes of scalars and small vectors the formula leaves out). No timing is
asserted.
"""

from __future__ import annotations

import math

import pytest
import torch

from clusterlm.bench.layout_runs import case_config, measure_rank, prepare_data
from clusterlm.config import apply_overrides
from clusterlm.models.from_config import resolve_model_args
from clusterlm.data.manifest import load_manifest
from clusterlm.models.gpt import Transformer
from clusterlm.plan.memory import activation_bytes, logits_gradient_bytes
from clusterlm.plan.validation import CASES, GLOBAL_BATCH
from clusterlm.plan.workload import Workload

from .helpers import run_distributed

pytestmark = pytest.mark.timeout(60)
STEP_COUNTER_BYTES = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("validate"), chars=20_000)


def _case(name: str):
    return next(case for case in CASES if case.name == name)


def _parameters(cfg, vocab_size: int) -> list[torch.Tensor]:
    return list(Transformer(resolve_model_args(cfg, vocab_size)).parameters())


def _run(name: str, data_dir: str, out_dir: str):
    case = _case(name)
    cfg = case_config(case, data_dir, out_dir, peak_flops=1e10)
    ranks = run_distributed(measure_rank, case.nproc, cfg, 1, 0, timeout=45)
    return case, cfg, ranks


def _vocab(data_dir: str) -> int:
    return load_manifest(data_dir).vocab_size


def _predicted_activations(case, cfg, vocab: int) -> float:
    work = Workload(resolve_model_args(cfg, vocab), cfg.seq_len, GLOBAL_BATCH * cfg.seq_len, "fp32")
    return activation_bytes(work, case.layout, "first") - logits_gradient_bytes(work, case.layout)


def test_zero3_stores_rank_zero_chunks_of_every_tensor(data_dir, tmp_path):
    case, cfg, ranks = _run("2 zero3", data_dir, str(tmp_path))
    params = _parameters(cfg, _vocab(data_dir))
    rank0_elements = sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in params)
    assert ranks[0][0] == 16 * rank0_elements + STEP_COUNTER_BYTES * len(params)
    predicted = _predicted_activations(case, cfg, _vocab(data_dir))
    assert [r[1] for r in ranks] == [pytest.approx(predicted, rel=1e-3)] * 2


def test_zero1_keeps_each_optimizer_state_on_one_rank(data_dir, tmp_path):
    case, cfg, ranks = _run("2 zero1", data_dir, str(tmp_path))
    params = _parameters(cfg, _vocab(data_dir))
    elements = sum(p.numel() for p in params)
    replicated = 8 * elements  # weights and gradients on both ranks
    sharded = sum(r[0] - replicated for r in ranks)
    assert sharded == 8 * elements + STEP_COUNTER_BYTES * len(params)
    predicted = _predicted_activations(case, cfg, _vocab(data_dir))
    assert [r[1] for r in ranks] == [pytest.approx(predicted, rel=1e-3)] * 2


def _fsdp_gathers_rank(rank: int, world_size: int, cfg) -> dict[str, int]:
    """All-gathers per FSDP unit in one training step, from the profiler: "FSDP::all_gather" for
    the root, "FSDP::all_gather (layers.i)" for the unit of block i."""
    from torch.profiler import profile

    from clusterlm.train.session import build_session
    from clusterlm.train.trainer import train_step

    session = build_session(cfg)
    train_step(session)
    with profile() as prof:
        train_step(session)
    names = [e.name for e in prof.events() if e.name.startswith("FSDP::all_gather") and "copy" not in e.name]
    return {name: names.count(name) for name in set(names)}


@pytest.mark.parametrize("parallel,micro_batch", [
    ({"data_parallel": "zero3", "bucket_mb": 0.01}, 6),
    ({"data_parallel": "zero3"}, 6),
    ({"data_parallel": "zero2", "bucket_mb": 0.01}, 6),
    ({"data_parallel": "zero3", "bucket_mb": 0.01}, 2),
    ({"data_parallel": "zero2", "bucket_mb": 0.01}, 2),
    ({"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 3, "data_parallel": "zero3", "bucket_mb": 0.01}, 6),
], ids=["zero3-per-block", "zero3-root", "zero2-per-block", "zero3-per-block-3-micro-batches",
        "zero2-per-block-3-micro-batches", "pp2-zero3-per-block"])
def test_the_planner_counts_the_gathers_fsdp_makes(parallel, micro_batch, data_dir, tmp_path):
    """Per unit, the all-gathers of a step the planner counts (``plan.fsdp.gathers``) are those the
    trainer makes: zero3 keeps the last unit's and the root's weights for backward, and the units
    that keep them keep them through all of a step's micro-batches."""
    from clusterlm.plan.fsdp import gathers, stage_units
    from clusterlm.plan.layout import layout_from_config
    from clusterlm.plan.fsdp import parameter_tensors
    from clusterlm.plan.validation import ValidationCase

    nproc = 2 * int(parallel.get("pp", 1))
    case = ValidationCase("gathers", nproc, parallel)
    cfg = case_config(case, data_dir, str(tmp_path), peak_flops=1e10)
    cfg = apply_overrides(cfg, {"training.micro_batch_size": micro_batch,
                                "training.tokens_per_step": GLOBAL_BATCH * cfg.seq_len})
    layout = layout_from_config(cfg, nproc)
    ranks = run_distributed(_fsdp_gathers_rank, nproc, cfg, timeout=50)
    args = resolve_model_args(cfg, _vocab(data_dir))
    work = Workload(args, cfg.seq_len, GLOBAL_BATCH * cfg.seq_len, "fp32")
    for rank, counted in enumerate(ranks):
        pp_rank = rank // 2  # pp is the outermost mesh dimension
        units = stage_units(work, layout, pp_rank, parameter_tensors(args))
        first_block = pp_rank * (args.n_layer // layout.pp)
        names = [f"FSDP::all_gather (layers.{first_block + i})" for i in range(len(units) - 1)] + ["FSDP::all_gather"]
        assert {name: sum(gathers(unit, layout)) for name, unit in zip(names, units, strict=True)} == counted


@pytest.mark.parametrize(
    "nproc,parallel",
    [
        (4, {"data_parallel": "zero3", "ep": 2, "bucket_mb": 0.01}),
        (4, {"data_parallel": "zero3", "ep": 2}),
        (2, {"data_parallel": "zero3", "ep": 2, "bucket_mb": 0.01}),
        (4, {"data_parallel": "zero2", "ep": 2, "bucket_mb": 0.01}),
    ],
    ids=["ep2-zero3-per-block", "ep2-zero3-one-unit", "ep2-alone-one-unit", "ep2-zero2-per-block"],
)
def test_the_planner_counts_the_expert_units_fsdp_makes(nproc, parallel, data_dir, tmp_path):
    """The routed experts' FSDP units (``expert_units``) and their all-gathers per step, as the
    planner counts them (``plan.fsdp.stage_units``, ``gathers``) and as the trainer makes them:
    a unit per MoE block when the blocks' experts reach ``bucket_mb``, otherwise one for all the
    blocks. Where the expert-data-parallel group is one rank FSDP makes no all-gather, but still
    copies each tensor into its unsharded parameter: the planner keeps that one unit, for its
    tensor passes, and prices no bytes for it."""
    from clusterlm.plan.fsdp import gathers, parameter_tensors, stage_units
    from clusterlm.plan.layout import layout_from_config
    from clusterlm.plan.validation import MOE_MODEL, ValidationCase

    case = ValidationCase("experts", nproc, parallel, model=MOE_MODEL)
    cfg = case_config(case, data_dir, str(tmp_path), peak_flops=1e10)
    cfg = apply_overrides(
        cfg,
        {
            "training.micro_batch_size": GLOBAL_BATCH // nproc,
            "training.tokens_per_step": GLOBAL_BATCH * cfg.seq_len,
        },
    )
    layout = layout_from_config(cfg, nproc)
    counted = run_distributed(_fsdp_gathers_rank, nproc, cfg, timeout=50)[0]
    expert_gathers = sorted(n for name, n in counted.items() if "experts" in name)
    args = resolve_model_args(cfg, _vocab(data_dir))
    work = Workload(args, cfg.seq_len, GLOBAL_BATCH * cfg.seq_len, "fp32")
    units = [u for u in stage_units(work, layout, 0, parameter_tensors(args)) if u.experts]
    if nproc == 2:  # ep2 alone: each expert-data-parallel group is one rank, with no collective
        assert expert_gathers == [] and len(units) == 1
        return
    assert sorted(sum(gathers(unit, layout)) for unit in units) == expert_gathers
    assert len(units) == (args.n_layer if parallel.get("bucket_mb") == 0.01 else 1)


def test_the_expert_parallel_imbalance_is_measured_over_the_timed_steps(data_dir, tmp_path):
    """Every rank reads the same loads (summed over the ranks); on ep 2 the busiest rank holds at
    most all of them: twice the mean."""
    case = _case("2 ep2 zero2 moe")
    cfg = case_config(case, data_dir, str(tmp_path), peak_flops=1e10)
    ranks = run_distributed(measure_rank, case.nproc, cfg, 1, 2, timeout=45)
    (imbalance,) = {rank[3] for rank in ranks}
    assert 1.0 <= imbalance <= 2.0
