"""Smoke test of `clusterlm bench compare-deepspeed` (a benchmark command: nothing here is timed):
DeepSpeed ZeRO-1 and clusterlm zero1 each train a tiny model for one step on 2 processes and report
tokens/s and memory per rank, then both train in the same processes in paired rounds. Skipped where the optional extra `.[compare]` is not installed."""

from __future__ import annotations

import pytest

from clusterlm.bench.compare_deepspeed import compare, report
from clusterlm.config import build_config

pytest.importorskip("deepspeed", reason="the optional extra .[compare] (DeepSpeed) is not installed")


@pytest.mark.timeout(400)
def test_deepspeed_and_clusterlm_zero1_run_side_by_side(data_dir):
    cfg = build_config(None, {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 16, "model.block_size": 16,
                              "training.micro_batch_size": 2, "data.dir": str(data_dir)})
    results, paired = compare(cfg, nproc=2, stages=[1], warmup=0, steps=1, rounds=1, timeout=300, paired_rounds=2)
    assert [(r.framework, r.stage) for r in results] == [("deepspeed", 1), ("clusterlm", 1)]
    assert all(r.tokens_per_s > 0 and len(r.memory_bytes) == 2 for r in results)
    assert list(paired) == [1] and len(paired[1]) == 2 and all(ratio > 0 for ratio in paired[1])
    summary = report(results, paired, 2)[-1]
    assert "ZeRO-1 on 2 processes: clusterlm / DeepSpeed tokens/s" in summary and "2 paired rounds" in summary
