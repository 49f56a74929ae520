"""Tensor (+ sequence) parallel layouts train exactly like one process with the same global batch,
through the trainer: losses every step, validation loss, final weights (tolerances: training.py)."""

from __future__ import annotations

import pytest

from .training import MICRO, assert_equivalent, run

LLAMA = {"model__flavour": "llama", "model__n_head": 4, "model__n_kv_head": 2}
CASES = [
    # (name, processes, data-parallel ranks, settings)
    ("tp2", 2, 1, {"parallel__tp": 2}),
    ("tp2-sp", 2, 1, {"parallel__tp": 2, "parallel__sequence_parallel": True}),
    ("tp4-sp", 4, 1, {"parallel__tp": 4, "parallel__sequence_parallel": True, "model__n_head": 4}),
    ("tp2-llama", 2, 1, {"parallel__tp": 2, **LLAMA}),
    ("tp2xzero3-2", 4, 2, {"parallel__tp": 2, "parallel__data_parallel": "zero3"}),
    ("tp2-sp x zero2", 4, 2, {"parallel__tp": 2, "parallel__sequence_parallel": True, "parallel__data_parallel": "zero2"}),
]


@pytest.mark.parametrize("name,world_size,dp,settings", CASES, ids=[c[0] for c in CASES])
def test_tensor_parallel_equals_single_process(name, world_size, dp, settings, data_dir, reference, tmp_path):
    model = {k: v for k, v in settings.items() if k.startswith("model__")}
    candidate = run(data_dir, tmp_path, world_size, training__micro_batch_size=MICRO, **settings)
    assert_equivalent(reference(MICRO * dp, **model), candidate)
