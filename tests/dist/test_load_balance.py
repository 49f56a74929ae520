"""Load balancing keeps the numerics: ranks holding different numbers of a step's micro-batches
train exactly like one process on the same global batch (fp32, relative 1e-5: training.py).

With the assignment measured every log step (here every step) and rank 1 slowed 2x
(``training.slow_ranks``) it moves while the run trains; a fixed uneven one (zero3, where the
ranks gather parameters once per step) is checked in the checkpoint. Either way every step reads the step's samples and weights each micro-batch
equally, so the losses, validation losses and weights equal the single-process run's.
"""

from __future__ import annotations

import json

import pytest

from .training import BASE, MICRO, assert_equivalent, run

ACCUM = 4  # micro-batches per rank without balancing: 8 in a step over 2 ranks
TOKENS = MICRO * ACCUM * 2 * BASE["model.block_size"]


@pytest.mark.parametrize("strategy,counts,slow", [("ddp", "", "1:2"), ("zero3", "6,2", "")],
                         ids=["ddp-measured", "zero3-fixed"])
def test_balanced_ranks_equal_single_process(strategy, counts, slow, data_dir, reference, tmp_path):
    candidate = run(data_dir, tmp_path, 2, parallel__data_parallel=strategy, parallel__load_balance=True,
                    parallel__load_balance_counts=counts, training__slow_ranks=slow,
                    training__micro_batch_size=MICRO, training__tokens_per_step=TOKENS)
    assert_equivalent(reference(MICRO * ACCUM * 2), candidate)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assignments = [r["micro_batches_per_rank"] for r in records if r["kind"] == "train"]
    assert all(len(a) == 2 and sum(a) == 2 * ACCUM and min(a) >= 1 for a in assignments)
    if counts:
        assert assignments[-1] == [6, 2]
        saved = json.loads(next((tmp_path / "checkpoints").glob("step_*/trainer.json")).read_text())
        assert saved["micro_batches_per_rank"] == [6, 2]
