"""Smoke test of `clusterlm bench compare-deepspeed` (a benchmark command: nothing here is timed):
DeepSpeed ZeRO-k and clusterlm zero-k each train a tiny model for one step on 2 processes (one
micro-batch a step, and three) and report tokens/s and memory per rank, then both train in the same
processes in paired rounds. Skipped where the optional extra `.[compare]` is not installed."""

from __future__ import annotations

import pytest

from clusterlm.bench.compare_deepspeed import compare, report
from clusterlm.config import build_config

pytest.importorskip("deepspeed", reason="the optional extra .[compare] (DeepSpeed) is not installed")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage,accumulation", [(1, 1), (2, 3)])
def test_deepspeed_and_clusterlm_run_side_by_side(stage, accumulation, data_dir):
    cfg = build_config(None, {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
                              "training.micro_batch_size": 2, "data.dir": str(data_dir)})
    results, paired = compare(cfg, nproc=2, stages=[stage], warmup=0, steps=1, rounds=1, timeout=300,
                              paired_rounds=2, accumulation=accumulation)
    assert [(r.framework, r.stage) for r in results] == [("deepspeed", stage), ("clusterlm", stage)]
    assert all(r.tokens_per_s > 0 and len(r.memory_bytes) == 2 for r in results)
    assert {r.tokens_per_step for r in results} == {2 * 16 * 2 * accumulation}
    assert list(paired) == [stage] and len(paired[stage]) == 2 and all(ratio > 0 for ratio in paired[stage])
    summary = report(results, paired, 2, accumulation)[-1]
    steps = f", {accumulation} micro-batches a step" if accumulation > 1 else ""
    assert f"ZeRO-{stage} on 2 processes{steps}: clusterlm / DeepSpeed tokens/s" in summary
    assert "2 paired rounds" in summary
